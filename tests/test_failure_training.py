"""Issue 18, training and checkpoints: non-finite guards, config ranges by key, the save folder,
resume compatibility, stale temporaries, the atomic task tokenizer, over-long records."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from coconut_engine.checkpoint import checkpoint_dirs, load_checkpoint, remove_stale_tmp
from coconut_engine.coconut import CoconutModel
from coconut_engine.errors import CheckpointError
from coconut_engine.loader import load_model
from coconut_engine.train_checks import SAFE_RESUME_KEYS
from coconut_engine.trainer import TrainConfig, Trainer, TrainingError
from test_trainer import TASK, tiny


def test_non_finite_weights_after_an_epochs_last_step_are_not_saved(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, num_epochs=2, epochs_per_stage=2))  # 3 steps per epoch
    step = torch.optim.AdamW.step  # patched on the class: reset_optimizer makes a new optimizer every epoch

    def nan_on_step_six(*args, **kwargs):
        out = step(*args, **kwargs)
        if trainer.global_step == 5:  # this is step 6: the last of epoch 2; its loss was finite
            with torch.no_grad():
                trainer.decoder.final_norm.weight[0] = float("nan")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_on_step_six)
    with pytest.raises(TrainingError, match=r"parameter final_norm\.weight holds NaN or Inf after epoch 2: not "
                                            r"saved; the last good checkpoint is .*checkpoint-0001"):
        trainer.run()
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-0001"]
    decoder, *_ = load_checkpoint(checkpoint_dirs(tmp_path / "run")[0])
    assert all(torch.isfinite(p).all() for p in decoder.parameters())


def test_nan_validation_loss_is_not_saved(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, num_epochs=1))
    forward = CoconutModel.forward

    def nan_when_validating(self, samples, mode="paged", reduction="mean", **kwargs):
        loss = forward(self, samples, mode=mode, reduction=reduction, **kwargs)
        return loss if torch.is_grad_enabled() else loss * float("inf")

    monkeypatch.setattr(CoconutModel, "forward", nan_when_validating)
    with pytest.raises(TrainingError, match=r"validation loss is inf after epoch 1: not saved; the last good "
                                            r"checkpoint is none"):
        trainer.run()
    assert checkpoint_dirs(tmp_path / "run") == []


class _InfGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def test_non_finite_gradient_norm_stops_before_the_update(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, num_epochs=2, epochs_per_stage=1))
    forward = CoconutModel.forward

    def inf_gradient_in_epoch_two(self, samples, mode="paged", reduction="mean", **kwargs):
        loss = forward(self, samples, mode=mode, reduction=reduction, **kwargs)
        return _InfGradient.apply(loss) if trainer.global_step >= 3 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(CoconutModel, "forward", inf_gradient_in_epoch_two)
    with pytest.raises(TrainingError, match=r"gradient norm is (nan|inf) at epoch 2, step 4: training stopped "
                                            r"before the update; the last good checkpoint is .*checkpoint-0001"):
        trainer.run()
    assert all(torch.isfinite(p).all() for p in trainer.decoder.parameters())


@pytest.mark.parametrize("values,message", [
    ({"max_grad_norm": -1.0}, r"max_grad_norm must be finite and > 0.0, got -1.0"),
    ({"max_grad_norm": 0}, r"max_grad_norm must be finite and > 0.0, got 0"),
    ({"page_size": 0}, r"page_size must be >= 1, got 0"),
    ({"weight_decay": -0.1}, r"weight_decay must be finite and >= 0.0, got -0.1"),
    ({"num_epochs": 2.5}, r"num_epochs must be int, got float 2.5"),
    ({"max_eval_questions": 0}, r"max_eval_questions must be >= 1, got 0"),
    ({"batch_size": True}, r"batch_size must be int, got bool True"),
    ({"lr": float("inf")}, r"lr must be finite and > 0.0 and <= 1000.0, got inf"),
    ({"lr": 1e38}, r"lr must be finite and > 0.0 and <= 1000.0, got 1e\+38"),
    ({"keep_checkpoints": -1}, r"keep_checkpoints must be >= 0"),
    ({"device": "gpu9"}, r"device 'gpu9' is not a torch device"),
    ({"device": "meta"}, r"device 'meta': a meta device holds no data"),
    ({"attention_backend": "cuda"}, r"attention_backend 'cuda' is not one of"),
    ({"task_config": {"num_nodes": 3}}, r"task_config \{'num_nodes': 3\}: .*num_nodes"),
    ({"model": "builtin:gpt5"}, r"model 'builtin:gpt5': unknown builtin model"),
    ({"name": 7}, r"name must be str, got int 7"),
    ({"resume": True, "overwrite": True}, r"resume and overwrite exclude each other"),
])
def test_config_values_are_range_checked_by_key(values, message):
    with pytest.raises(TrainingError, match=r"^my\.yaml: " + message):
        TrainConfig.from_dict(values, source="my.yaml")


def test_folder_as_train_path_and_yaml_types(tmp_path):
    with pytest.raises(TrainingError, match=r"train_path '.*' is a folder"):
        TrainConfig(train_path=str(tmp_path), val_path=str(tmp_path / "v.json"))
    path = tmp_path / "c.yaml"
    path.write_text("num_epochs: 2.5\n")
    with pytest.raises(TrainingError, match=rf"^{path}: num_epochs must be int, got float 2.5"):
        TrainConfig.from_yaml(path)


def test_paths_the_system_refuses_are_errors_naming_the_key(tmp_path):
    too_long = "x" * 5000  # is_dir / exists raise OSError (ENAMETOOLONG) instead of answering False
    with pytest.raises(TrainingError, match=r"train_path 'x{80}\.\.\.' is not a usable path"):
        TrainConfig(train_path=too_long)
    with pytest.raises(TrainingError, match=r"save_dir 'x{80}\.\.\.' is not a usable path"):
        Trainer(tiny(tmp_path, save_dir=too_long))


def test_fresh_run_refuses_a_non_empty_save_folder_unless_overwrite(tmp_path):
    Trainer(tiny(tmp_path, num_epochs=2, epochs_per_stage=1)).run()
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-0001", "checkpoint-0002"]
    (tmp_path / "run" / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match=r"save_dir .*run is not empty \(checkpoint-0001, .*overwrite: true"):
        Trainer(tiny(tmp_path, num_epochs=1, task_seed=5))
    trainer = Trainer(tiny(tmp_path, num_epochs=1, task_seed=5, overwrite=True))
    trainer.run()
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-0001"]
    assert (tmp_path / "run" / "notes.txt").read_text() == "mine"  # only the run's own outputs are removed
    records = json.loads((tmp_path / "run" / "data" / "val.json").read_text())
    assert records[0]["question"] == trainer.val_records[0].question  # new data, not the old run's


def test_resume_refuses_config_changes_that_break_the_run(tmp_path):
    Trainer(tiny(tmp_path, num_epochs=1)).run()
    with pytest.raises(TrainingError, match=r"changes the run \(c_thought: 1 -> 2; lr: 0\.003 -> 0\.01\)"):
        Trainer(tiny(tmp_path, num_epochs=2, resume=True, lr=1e-2, c_thought=2))
    with pytest.raises(TrainingError, match=r"model: 'builtin:gpt2-micro' -> 'builtin:gpt2-tiny'"):
        Trainer(tiny(tmp_path, num_epochs=2, resume=True, model="builtin:gpt2-tiny"))
    resumed = Trainer(tiny(tmp_path, num_epochs=3, resume=True, keep_checkpoints=5, eval_max_new_tokens=4))
    assert resumed.epochs_done == 1
    assert {"num_epochs", "keep_checkpoints", "eval_max_new_tokens"} <= SAFE_RESUME_KEYS


def test_resume_accepts_the_same_files_named_another_way(tmp_path, monkeypatch):
    """A run started with absolute paths resumes from a relative save_dir and tokenizer path naming
    the same files (it was refused: the strings differ), and one started with relative paths resumes
    from another directory with absolute ones; another file, even of the same relative name, is refused."""
    Trainer(tiny(tmp_path, "a", num_epochs=1)).run()
    Trainer(tiny(tmp_path, num_epochs=1, tokenizer=str(tmp_path / "a" / "tokenizer"))).run()
    monkeypatch.chdir(tmp_path)
    resumed = Trainer(tiny(Path("."), num_epochs=2, resume=True, tokenizer="a/tokenizer"))
    assert resumed.epochs_done == 1
    with pytest.raises(TrainingError, match=r"changes the run \(tokenizer: '.*a/tokenizer' -> 'run/tokenizer'\)"):
        Trainer(tiny(Path("."), num_epochs=2, resume=True, tokenizer="run/tokenizer"))

    Trainer(tiny(Path("."), "rel", num_epochs=1, tokenizer="a/tokenizer")).run()  # relative, from tmp_path
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "a" / "tokenizer", elsewhere / "a" / "tokenizer")  # same relative name, other file
    monkeypatch.chdir(elsewhere)
    resumed = Trainer(tiny(tmp_path, "rel", num_epochs=2, resume=True, tokenizer=str(tmp_path / "a" / "tokenizer")))
    assert resumed.epochs_done == 1
    with pytest.raises(TrainingError, match=r"changes the run \(tokenizer: 'a/tokenizer' -> '.*elsewhere/a/tokenizer'\)"):
        Trainer(tiny(tmp_path, "rel", num_epochs=2, resume=True, tokenizer=str(elsewhere / "a" / "tokenizer")))


def test_stale_temporaries_of_crashed_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    root = tmp_path / "run"
    (root / "data").mkdir(parents=True)
    crashed = root / f".checkpoint-0003.tmp-{dead_pid}"
    crashed.mkdir()
    (crashed / "model.safetensors").write_bytes(b"partial")
    (root / "data" / f".train.json.tmp-{dead_pid}").write_text("[")
    live = root / f".checkpoint-0004.tmp-{os.getppid()}"
    live.mkdir()
    trainer = Trainer(tiny(tmp_path, num_epochs=1, resume=True))
    trainer.run()
    assert not crashed.exists() and not (root / "data" / f".train.json.tmp-{dead_pid}").exists()
    assert live.exists()  # a live process's temporary stays
    assert remove_stale_tmp(root) == []


def test_resume_rewrites_metrics_a_stopped_process_left_behind(tmp_path, monkeypatch):
    """Stopped after a checkpoint but before its metrics.jsonl and chart: a resume of the finished run
    trains nothing, and still writes them from the checkpoint's history."""
    import coconut_engine.trainer as trainer_module

    def stop(*args, **kwargs):
        raise KeyboardInterrupt

    Trainer(tiny(tmp_path, num_epochs=1)).run()
    trainer = Trainer(tiny(tmp_path, num_epochs=2, resume=True))
    monkeypatch.setattr(trainer_module, "_atomic_text", stop)  # metrics.jsonl's write, after the checkpoint
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    monkeypatch.undo()
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert (tmp_path / "run" / "checkpoint-0002").is_dir()
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1]
    assert Trainer(tiny(tmp_path, num_epochs=2, resume=True)).run()[-1]["epoch"] == 2
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [1, 2]


def test_task_tokenizer_is_written_atomically(tmp_path, monkeypatch):
    import coconut_engine.tasks.tokenizer as task_tokenizer

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(task_tokenizer.json, "dumps", crash)  # after tokenizer.json, before its config
    with pytest.raises(KeyboardInterrupt):
        Trainer(tiny(tmp_path, num_epochs=1))
    assert not (tmp_path / "run" / "tokenizer").exists()
    monkeypatch.undo()
    trainer = Trainer(tiny(tmp_path, num_epochs=1, resume=True))  # the crashed run's folder resumes cleanly
    assert trainer.tokenizer.eos_token_id is not None


def long_record_files(tmp_path):
    from coconut_engine.tasks import ProsQAConfig, generate_prosqa

    records = generate_prosqa(24, ProsQAConfig(**TASK), seed=0)
    records[3] = dict(records[3], question=" ".join(f"w{i}" for i in range(1200)))
    train, val = tmp_path / "train.json", tmp_path / "val.json"
    train.write_text(json.dumps(records[4:] + records[:4]))
    val.write_text(json.dumps(records[4:12]))
    return train, val


def test_records_longer_than_the_positions_are_errors_or_dropped(tmp_path, capsys):
    train, val = long_record_files(tmp_path)
    with pytest.raises(TrainingError, match=rf"{train}: record 23 needs \d+ positions, more than the model's "
                                            r"max_position_embeddings=1024 \(1 record\(s\) too long"):
        Trainer(tiny(tmp_path, train_path=str(train), val_path=str(val)))
    trainer = Trainer(tiny(tmp_path, "dropped", train_path=str(train), val_path=str(val), drop_long_records=True,
                           num_epochs=1))
    assert len(trainer.train_records) == 23
    assert f"{train}: dropped 1 of 24 records longer than 1024 positions (first: record 23" in capsys.readouterr().out
    trainer.run()


def test_malformed_checkpoint_state_files_are_named(tmp_path):
    Trainer(tiny(tmp_path, num_epochs=1)).run()
    checkpoint = checkpoint_dirs(tmp_path / "run")[-1]
    state = checkpoint / "trainer_state.json"
    state.write_text(json.dumps({"history": []}))
    with pytest.raises(TrainingError, match=r"trainer_state\.json: cannot resume from it \(KeyError\('epochs_done'\)"):
        Trainer(tiny(tmp_path, num_epochs=2, resume=True))
    state.write_text("{half")
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: not valid JSON"):
        load_checkpoint(checkpoint)
    coconut = checkpoint / "coconut.json"
    coconut.write_text(json.dumps({**json.loads(coconut.read_text()), "special_tokens": {"bot": "x", "thought": 1,
                                                                                          "eot": 2}}))
    with pytest.raises(CheckpointError, match=r"coconut\.json: special token bot='x' is outside"):
        load_checkpoint(checkpoint)


@pytest.mark.parametrize("values,message", [
    ({"task_config": {"num_concepts": 7.5}}, r"task_config\.num_concepts must be an integer >= 0, got float 7\.5"),
    ({"task_config": {"num_concepts": "abc"}}, r"task_config\.num_concepts must be an integer >= 0, got str 'abc'"),
    ({"task_config": {"extra_edges": -1}}, r"task_config\.extra_edges must be an integer >= 0, got int -1"),
    ({"task_config": {"concept_pool": True}}, r"task_config\.concept_pool must be an integer >= 0 or null"),
    ({"seed": 2**70}, r"seed must be in \[-2\*\*63, 2\*\*64\), got 1180591620717411303424"),
])
def test_task_config_values_and_the_seed_are_checked_by_key(values, message):
    # before: accepted, then a TypeError inside the task generator or torch.manual_seed
    with pytest.raises(TrainingError, match=r"^my\.yaml: " + message):
        TrainConfig.from_dict(values, source="my.yaml")
    TrainConfig.from_dict({"task_config": {"concept_pool": None, "num_concepts": 9}, "seed": -1})


def test_overwrite_removes_only_what_a_run_writes(tmp_path):
    from coconut_engine.train_checks import prepare_save_dir

    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "train.json").write_text("[]")
    (run / "data" / "mine.csv").write_text("x")
    (run / "checkpoint-notes.txt").write_text("mine")
    (run / "checkpoint-0003").mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(TrainingError, match=r"overwrite would remove .*data, which holds files a run does not "
                                            r"write \(mine\.csv\)"):
        Trainer(tiny(tmp_path, overwrite=True))
    assert (run / "data" / "mine.csv").exists() and (run / "checkpoint-0003").exists()  # nothing removed
    (run / "data" / "mine.csv").unlink()
    prepare_save_dir(tiny(tmp_path, overwrite=True), TrainingError)
    assert sorted(p.name for p in run.iterdir()) == ["checkpoint-notes.txt"]  # not a checkpoint: kept


def test_resume_names_a_malformed_run_config(tmp_path):
    Trainer(tiny(tmp_path, num_epochs=1)).run()
    state = checkpoint_dirs(tmp_path / "run")[-1] / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "config": ["lr", 1]}))
    with pytest.raises(TrainingError, match=r"trainer_state\.json: 'config' must be an object, got list"):
        Trainer(tiny(tmp_path, num_epochs=2, resume=True))


def test_a_record_too_long_only_for_evaluation_names_eval_max_new_tokens(tmp_path):
    # every sample fits; the evaluation prompt + eval_max_new_tokens does not: say which key makes it long
    with pytest.raises(TrainingError, match=r"val\.json: record 0 needs \d+ positions \(its evaluation prompt and "
                                            r"thoughts \+ eval_max_new_tokens=1100\), more than the model's "
                                            r"max_position_embeddings=1024"):
        Trainer(tiny(tmp_path, eval_max_new_tokens=1100))


def test_non_finite_thought_transform_is_not_saved(tmp_path, monkeypatch):
    """The thought transform's parameters are saved with the weights, so a NaN in them stops the run
    before the checkpoint as one in the decoder does (at stage 0 no thought uses the transform, so
    the validation loss stays finite and the checkpoint was written, with a transform file that
    loading then refuses)."""
    trainer = Trainer(tiny(tmp_path, num_epochs=2, epochs_per_stage=2, thought_transform="linear"))
    step = torch.optim.AdamW.step

    def nan_on_step_six(*args, **kwargs):
        out = step(*args, **kwargs)
        if trainer.global_step == 5:  # the last step of epoch 2 (stage 0)
            with torch.no_grad():
                trainer.model.thought_transform.proj.bias[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", nan_on_step_six)
    with pytest.raises(TrainingError, match=r"parameter thought_transform\.proj\.bias holds NaN or Inf after epoch 2"):
        trainer.run()
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-0001"]
