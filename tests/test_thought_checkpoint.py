"""The thought transform in checkpoints: every variant round-trips through safetensors named in
coconut.json; a trained run's transform reaches eval (--dump) and generate (--show-thoughts) in a fresh
process; bad transform files are named."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from coconut_engine.checkpoint import checkpoint_dirs, checkpoint_thought_transform, load_checkpoint
from coconut_engine.cli import main
from coconut_engine.errors import CheckpointError
from coconut_engine.thoughts import (THOUGHT_TRANSFORMS, TRANSFORM_FILE, load_thought_transform,
                                     save_thought_transform)
from coconut_engine.trainer import Trainer, TrainingError, evaluate
from test_trainer import tiny

EMBED = torch.randn(40, 16)


def perturbed(kind):
    from coconut_engine.thoughts import build_thought_transform

    transform = build_thought_transform(kind, EMBED)
    with torch.no_grad():
        for p in transform.parameters():
            p.add_(torch.randn_like(p))
    return transform


@pytest.mark.parametrize("kind", sorted(THOUGHT_TRANSFORMS))
def test_every_variant_round_trips(tmp_path, kind):
    transform = perturbed(kind)
    entry = save_thought_transform(transform, tmp_path)
    assert entry["kind"] == kind and (("file" in entry) == (kind != "identity"))
    loaded = load_thought_transform(tmp_path, json.loads(json.dumps(entry)), EMBED)
    assert type(loaded) is type(transform)
    for (name, p), (name2, q) in zip(transform.state_dict().items(), loaded.state_dict().items()):
        assert name == name2 and torch.equal(p, q)
    hidden = torch.randn(3, 16)
    torch.testing.assert_close(loaded(hidden, EMBED[5]), transform(hidden, EMBED[5]), rtol=0, atol=0)


def test_bad_transform_entries_and_files_are_named(tmp_path):
    entry = save_thought_transform(perturbed("gated"), tmp_path)
    with pytest.raises(CheckpointError, match="coconut.json.*'kind' one of"):
        load_thought_transform(tmp_path, {"kind": "mlp"}, EMBED)
    with pytest.raises(CheckpointError, match="names no parameter file"):
        load_thought_transform(tmp_path, {"kind": "gated"}, EMBED)
    with pytest.raises(CheckpointError, match=r"thought_transform.safetensors: tensor 'gate.weight' has shape"):
        load_thought_transform(tmp_path, entry, torch.randn(40, 8))
    state = load_file(tmp_path / TRANSFORM_FILE)
    del state["gain"]
    save_file(state, tmp_path / TRANSFORM_FILE)
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \['gain'\]"):
        load_thought_transform(tmp_path, entry, EMBED)
    (tmp_path / TRANSFORM_FILE).write_bytes(b"\x00" * 5)
    with pytest.raises(CheckpointError, match="thought_transform.safetensors: cannot read"):
        load_thought_transform(tmp_path, entry, EMBED)


def test_trained_transform_reaches_eval_and_generate(tmp_path, capsys, monkeypatch):
    """A run with the linear transform and the halting loss trains the transform and saves it; eval
    from the checkpoint with --dump sees the same thoughts (norms, nearest tokens, p(<eot>)) and
    answers as the trainer's own model; generate --show-thoughts prints them; resuming with another
    variant is refused."""
    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    trainer = Trainer(tiny(tmp_path, num_epochs=2, epochs_per_stage=1, thought_transform="linear",
                           eot_loss_weight=0.5))
    trainer.run()
    transform = trainer.model.thought_transform
    assert not torch.equal(transform.proj.weight, torch.eye(transform.proj.weight.shape[0]))  # it trained
    checkpoint = checkpoint_dirs(tmp_path / "run")[-1]
    decoder, tokenizer, tokens, info, _ = load_checkpoint(checkpoint)
    assert info["thought_transform"] == {"kind": "linear", "file": TRANSFORM_FILE}
    loaded = checkpoint_thought_transform(checkpoint, info, decoder)
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), transform.parameters()))

    data = tmp_path / "run" / "data" / "val.json"
    want = evaluate(trainer.decoder, trainer.tokenizer, trainer.tokens, trainer.val_records, 1, trainer.rules, 6,
                    thought_transform=transform, return_thoughts=True)
    dump = tmp_path / "dump.jsonl"
    assert main(["eval", "--model", str(checkpoint), "--data", str(data), "--max-new-tokens", "6", "--backend",
                 "torch", "--dump", str(dump)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["accuracy"] == want["accuracy"]
    rows = [json.loads(line) for line in dump.read_text().splitlines()]
    assert len(rows) == len(want["generations"])
    for row, g in zip(rows, want["generations"]):
        assert row["output"] == g["output"] and row["thoughts"] == g["thoughts"] == 1
        got, ref = row["thought_traces"][0], g["thought_traces"][0]
        assert got["norm"] == pytest.approx(ref["norm"], rel=1e-5)
        assert got["p_eot"] == pytest.approx(ref["p_eot"], rel=1e-4, abs=1e-7)
        assert [t[0] for t in got["top_tokens"]] == [t[0] for t in ref["top_tokens"]]

    question = trainer.val_records[0].question + "\n"
    assert main(["generate", "--model", str(checkpoint), "--num-thoughts", "2", "--max-new-tokens", "4",
                 "--backend", "torch", "--show-thoughts", question]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("]")[0] for line in lines[:2]] == ["[thought 1", "[thought 2"]
    assert "p(<eot>)" in lines[0] and "nearest:" in lines[0]
    assert main(["generate", "--model", str(checkpoint), "--num-thoughts", "auto", "--max-thoughts", "0",
                 "--max-new-tokens", "2", "--backend", "torch", question]) == 0
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(checkpoint), "--num-thoughts", "many", question])
    assert "expected an integer >= 0 or 'auto', got 'many'" in capsys.readouterr().err

    with pytest.raises(TrainingError, match="trained with thought_transform 'linear', config says 'gated'"):
        Trainer(tiny(tmp_path, num_epochs=4, thought_transform="gated", resume=True))


def test_malformed_entries_and_non_finite_tensors_are_named(tmp_path):
    """A coconut.json entry whose kind or file is not a string is a CheckpointError naming
    coconut.json (it was a TypeError), as is a file outside the checkpoint folder (as for a sharded
    model's index: nothing outside the folder is opened); a transform tensor holding NaN / Inf or integers is one naming
    the file and the tensor (as the model's own weights are), not loaded silently."""
    transform = perturbed("linear")
    entry = save_thought_transform(transform, tmp_path)
    for bad in ({"kind": ["linear"]}, {"kind": None}, {"kind": "linear", "file": None},
                {"kind": "linear", "file": 5}, {"kind": "linear", "file": ""},
                {"kind": "linear", "file": "../" + TRANSFORM_FILE}, {"kind": "linear", "file": "/etc/passwd"}):
        with pytest.raises(CheckpointError, match="coconut.json: 'thought_transform'"):
            load_thought_transform(tmp_path, bad, EMBED)
    state = {k: v.clone() for k, v in transform.state_dict().items()}
    state["proj.weight"][3, 4] = float("nan")
    save_file(state, tmp_path / TRANSFORM_FILE)
    with pytest.raises(CheckpointError, match=r"thought_transform.safetensors: tensor 'proj.weight' holds NaN or Inf"):
        load_thought_transform(tmp_path, entry, EMBED)
    save_file({k: v.to(torch.int64) for k, v in transform.state_dict().items()}, tmp_path / TRANSFORM_FILE)
    with pytest.raises(CheckpointError, match=r"tensor 'proj.(weight|bias)' has dtype torch.int64"):
        load_thought_transform(tmp_path, entry, EMBED)
