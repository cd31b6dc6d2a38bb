"""Score any model: eval / compare_models on checkpoints and plain HF directories (--method, --stage);
generate defaults to a checkpoint's trained thoughts; CUDA by default when present."""
import json
import runpy
import shutil
import sys

import pytest
import torch

from coconut_engine import cli, scoring
from coconut_engine.checkpoint import checkpoint_dirs
from coconut_engine.tasks import train_task_tokenizer
from coconut_engine.trainer import Trainer
from test_trainer import tiny
from tiny_models import build_hf_model

RECORDS = [{"question": "Every wumpus is a yumpus. Tom is a wumpus. Is Tom a yumpus?",
            "steps": ["Tom is a wumpus.", "Every wumpus is a yumpus."], "answer": "Tom is a yumpus."},
           {"question": "Sam is a zumpus. Is Sam a zumpus?", "steps": ["Sam is a zumpus."], "answer": "Yes."}]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Coconut checkpoint trained to stage 1 (one thought)."""
    root = tmp_path_factory.mktemp("scoring")
    Trainer(tiny(root, num_epochs=3, epochs_per_stage=2, max_eval_questions=2)).run()
    return checkpoint_dirs(root / "run")[-1]


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """An untouched base model: a tiny HF GPT-2 with its tokenizer and no coconut.json."""
    root = tmp_path_factory.mktemp("plain")
    build_hf_model("gpt2", root / "base", vocab_size=300, eos_token_id=0, bos_token_id=0)
    train_task_tokenizer([r["question"] + " " + " ".join(r["steps"]) for r in RECORDS] * 3, root / "tok",
                         vocab_size=290)
    shutil.copytree(root / "tok", root / "base", dirs_exist_ok=True)
    data = root / "val.json"
    data.write_text(json.dumps(RECORDS))
    return root / "base", data


def run_cli(capsys, *args):
    assert cli.main([str(a) for a in args]) == 0
    return capsys.readouterr().out


def test_eval_a_plain_model_directory_with_a_method_and_stage(plain, capsys):
    base, data = plain
    with pytest.raises(SystemExit, match="plain model directory.*give the method"):
        cli.main(["eval", "--model", str(base), "--data", str(data), "--backend", "torch"])
    out = run_cli(capsys, "eval", "--model", base, "--data", data, "--method", "coconut", "--stage", "2",
                  "--max-new-tokens", "3", "--backend", "torch")
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["method"], result["stage"], result["questions"]) == ("coconut", 2, 2)
    assert result["thoughts_per_answer"] == 1.5  # capped at each question's steps (2 and 1), as official
    out = run_cli(capsys, "eval", "--model", base, "--data", data, "--method", "coconut", "--stage", "2",
                  "--pad-latent-to-max", "--max-new-tokens", "3", "--backend", "torch")
    assert json.loads(out.strip().splitlines()[-1])["thoughts_per_answer"] == 2.0
    out = run_cli(capsys, "eval", "--model", base, "--data", data, "--method", "cot", "--max-new-tokens", "3",
                  "--backend", "torch")
    result = json.loads(out.strip().splitlines()[-1])
    assert (result["method"], result["thoughts_per_answer"], result["tokens_per_answer"]) == ("cot", 0.0, 3.0)
    assert not (base / "coconut.json").exists()  # the directory is left as it was


def test_eval_a_checkpoint_at_its_own_and_other_stages(trained, plain, capsys):
    _, data = plain
    out = run_cli(capsys, "eval", "--model", trained, "--data", data, "--max-new-tokens", "3", "--backend", "torch")
    assert json.loads(out.strip().splitlines()[-1])["stage"] == 1
    out = run_cli(capsys, "eval", "--model", trained, "--data", data, "--method", "no_cot", "--max-new-tokens", "3",
                  "--backend", "torch")
    assert json.loads(out.strip().splitlines()[-1])["method"] == "no_cot"
    # a stage means thoughts: with a method that feeds none it was ignored (and reported as stage 0)
    with pytest.raises(SystemExit, match="stage 2 given, but cot scoring has no stages"):
        cli.main(["eval", "--model", str(trained), "--data", str(data), "--method", "cot", "--stage", "2"])
    with pytest.raises(scoring.CheckpointError, match="stage 1 given, but no_cot scoring"):  # before any load
        scoring.load_for_scoring(trained.parent / "missing", method="no_cot", stage=1)
    out = run_cli(capsys, "eval", "--model", trained, "--data", data, "--method", "cot", "--stage", "0",
                  "--max-new-tokens", "3", "--backend", "torch")
    assert json.loads(out.strip().splitlines()[-1])["stage"] == 0


def test_a_stage_with_a_checkpoint_trained_without_thoughts_is_refused(trained, tmp_path):
    no_cot = tmp_path / "no_cot"
    shutil.copytree(trained, no_cot)
    info = json.loads((no_cot / "coconut.json").read_text())
    (no_cot / "coconut.json").write_text(json.dumps({**info, "mode": "no_cot", "stage": 0}))
    assert scoring.load_for_scoring(no_cot, attention_backend="torch").stage == 0
    with pytest.raises(scoring.CheckpointError, match="stage 2 given, but no_cot scoring has no stages"):
        scoring.load_for_scoring(no_cot, stage=2, attention_backend="torch")


def test_compare_models_accepts_plain_directories_and_methods(trained, plain, capsys, monkeypatch):
    base, data = plain
    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    monkeypatch.setattr(sys, "argv", ["compare_models.py", f"{base}@coconut:1", f"{trained}@cot", str(trained),
                                      "--data", str(data), "--questions", "1", "--max-new-tokens", "3"])
    runpy.run_path("examples/compare_models.py", run_name="__main__")
    out = capsys.readouterr().out
    assert "base: coconut stage 1" in out and f"{trained.name}: cot " in out and f"{trained.name}: coconut stage 1" in out


def test_generate_defaults_to_the_checkpoints_trained_thoughts(trained, tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    run_cli(capsys, "generate", "--model", trained, "--max-new-tokens", "2", "--backend", "torch",
            "--output", out, "Is Tom a yumpus?\n")
    assert json.loads(out.read_text())["num_thoughts"] == 1  # stage 1, c_thought 1
    run_cli(capsys, "generate", "--model", trained, "--max-new-tokens", "2", "--backend", "torch",
            "--num-thoughts", "0", "--output", out, "Is Tom a yumpus?\n")
    assert json.loads(out.read_text())["num_thoughts"] == 0


def test_eval_and_generate_pick_cuda_when_present(trained, plain, monkeypatch):
    _, data = plain
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert scoring.default_device(None) == "cuda" and scoring.default_device("cpu") == "cpu"
    seen = []

    def no_gpu_here(path, device, attention_backend):
        seen.append(device)
        raise scoring.CheckpointError("stop")

    monkeypatch.setattr(scoring, "load_checkpoint", no_gpu_here)
    with pytest.raises(SystemExit, match="stop"):
        cli.main(["eval", "--model", str(trained), "--data", str(data)])
    assert seen == ["cuda"]
