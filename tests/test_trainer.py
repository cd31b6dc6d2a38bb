"""Trainer: resume gives identical weights, atomic checkpoints, fresh-process eval, DDP, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from coconut_engine.checkpoint import checkpoint_dirs, load_checkpoint, read_coconut_info, save_checkpoint
from coconut_engine.coconut import CoconutModel
from coconut_engine.errors import CheckpointError
from coconut_engine.loader import load_model
from coconut_engine.trainer import TrainConfig, Trainer, TrainingError

TASK = {"num_concepts": 6, "extra_edges": 1, "person_facts": 0, "min_steps": 2, "max_steps": 2, "concept_pool": 12}


def tiny(tmp_path, name="run", **overrides):
    values = dict(save_dir=str(tmp_path / name), model="builtin:gpt2-micro", task_train_size=40, task_val_size=8,
                  batch_size=16, num_epochs=3, epochs_per_stage=2, max_latent_stage=2, lr=3e-3,
                  eval_max_new_tokens=6, attention_backend="torch", progress=False, task_config=TASK)
    values.update(overrides)
    return TrainConfig(**values)


def weights(decoder):
    return {n: p.detach().clone() for n, p in decoder.named_parameters()}


def test_resume_after_a_kill_gives_identical_weights(tmp_path, monkeypatch):
    straight = Trainer(tiny(tmp_path, "a"))
    history = straight.run()
    assert [m["stage"] for m in history] == [0, 0, 1]

    killed = Trainer(tiny(tmp_path, "b"))
    step = torch.optim.AdamW.step  # patched on the class: reset_optimizer makes a new optimizer every epoch
    calls = {"n": 0}

    def step_then_die(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 2, second step: after checkpoint-0001 was written
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_die)
    with pytest.raises(KeyboardInterrupt):
        killed.run()
    assert [p.name for p in checkpoint_dirs(tmp_path / "b")] == ["checkpoint-0001"]
    resumed = Trainer(tiny(tmp_path, "b", resume=True))
    assert resumed.epochs_done == 1 and resumed.resumed_from.name == "checkpoint-0001"
    resumed_history = resumed.run()
    a, b = weights(straight.decoder), weights(resumed.decoder)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert [m["train_loss"] for m in resumed_history] == [m["train_loss"] for m in history]
    assert [m["accuracy"] for m in resumed_history] == [m["accuracy"] for m in history]


def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=1))
    trainer.run()
    good = checkpoint_dirs(tmp_path / "run")[-1]

    def crash(_tmp):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path / "run", 2, trainer.decoder, trainer.tokenizer, trainer.tokens,
                        trainer.coconut_info(0), trainer.optimizer, {"epochs_done": 2}, before_rename=crash)
    assert checkpoint_dirs(tmp_path / "run") == [good]
    decoder, *_ = load_checkpoint(good)
    assert all(torch.equal(p, q) for p, q in zip(decoder.parameters(), trainer.decoder.parameters()))
    resumed = Trainer(tiny(tmp_path, num_epochs=2, resume=True))
    assert resumed.epochs_done == 1


def test_checkpoint_eval_in_a_fresh_process_matches_training(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=3))
    history = trainer.run()
    checkpoint = checkpoint_dirs(tmp_path / "run")[-1]
    out = tmp_path / "gens.jsonl"
    proc = subprocess.run([sys.executable, "-m", "coconut_engine.cli", "eval", "--model", str(checkpoint), "--data",
                           str(tmp_path / "run" / "data" / "val.json"), "--max-new-tokens", "6", "--backend", "torch",
                           "--output", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["accuracy"] == history[-1]["accuracy"] and summary["stage"] == 1
    generations = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["output"] for g in generations] == [g["output"] for g in trainer.last_generations]
    # and transformers loads the checkpoint's weights
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
    assert hf.config.vocab_size == trainer.decoder.config.vocab_size


def test_ddp_two_ranks_equal_one_process_with_the_combined_batch(tmp_path):
    # On the CPU (gloo) on a CUDA host too: there rank k would take cuda:k, and a one-GPU machine has no cuda:1.
    single = Trainer(tiny(tmp_path, "single", num_epochs=1, device="cpu"))
    single.run()
    cfg = tiny(tmp_path, "ddp", num_epochs=1, device="cpu")
    args = []
    for key in ("save_dir", "model", "task_train_size", "task_val_size", "batch_size", "num_epochs", "epochs_per_stage",
                "max_latent_stage", "lr", "eval_max_new_tokens", "attention_backend", "device"):
        args += [f"--{key}", str(getattr(cfg, key))]
    args += ["--task_config", json.dumps(TASK), "--progress", "false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "coconut_engine.cli", "train", *args], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = load_model(checkpoint_dirs(tmp_path / "ddp")[-1])
    for (name, p), q in zip(single.decoder.named_parameters(), ddp.parameters()):
        torch.testing.assert_close(q, p.detach(), atol=1e-5, rtol=0, msg=name)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = Trainer(tiny(tmp_path, num_epochs=2, epochs_per_stage=1))
    forward = CoconutModel.forward

    def nan_in_epoch_two(self, samples, mode="paged", reduction="mean", **kwargs):
        loss = forward(self, samples, mode=mode, reduction=reduction, **kwargs)
        # training steps only: a NaN validation loss is refused before saving (test_failure_training)
        return loss * float("nan") if trainer.global_step >= 3 and torch.is_grad_enabled() else loss

    monkeypatch.setattr(CoconutModel, "forward", nan_in_epoch_two)
    with pytest.raises(TrainingError, match=r"loss is nan at epoch 2.*checkpoint-0001"):
        trainer.run()
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["checkpoint-0001"]


def test_bad_configs_and_model_directories(tmp_path):
    with pytest.raises(TrainingError, match=r"unknown key\(s\) \['learning_rate'\]"):
        TrainConfig.from_dict({"learning_rate": 1e-4})
    with pytest.raises(TrainingError, match="pad_latent_to_max has no meaning in mode cot"):
        TrainConfig(mode="cot", pad_latent_to_max=True)
    with pytest.raises(TrainingError, match="uniform_prob=0.3 has no meaning in mode no_cot"):
        TrainConfig(mode="no_cot", uniform_prob=0.3)
    with pytest.raises(TrainingError, match="give both train_path and val_path"):
        TrainConfig(train_path="a.json")
    with pytest.raises(TrainingError, match="lr='fast' is not a valid float"):
        TrainConfig.from_dict({"lr": "fast"})
    assert TrainConfig.from_dict({"lr": "3e-4", "bf16": "true", "max_batch_tokens": "none"}).lr == 3e-4
    # a mapping on the command line: JSON, or YAML as the config files write it (it was JSON only)
    for text in ('{"distribution": "prosqa_small", "min_steps": 1}', "{distribution: prosqa_small, min_steps: 1}"):
        assert TrainConfig.from_dict({"task_config": text}).task_config == {"distribution": "prosqa_small",
                                                                             "min_steps": 1}
    # JSON is read as JSON (a tab between tokens is not YAML)
    assert TrainConfig.from_dict({"task_config": '{"num_concepts":\t8}'}).task_config == {"num_concepts": 8}
    for text in ("[1, 2]", "{a: [", "prosqa"):
        with pytest.raises(TrainingError, match=r"task_config=.* is not a valid dict \| None \(a mapping, e\.g\."):
            TrainConfig.from_dict({"task_config": text})
    with pytest.raises(CheckpointError, match="no Coconut special tokens"):
        read_coconut_info(tmp_path)
    trainer = Trainer(tiny(tmp_path, num_epochs=1))
    trainer.run()
    with pytest.raises(TrainingError, match="trained in mode 'coconut', config says 'pause_as_thought'"):
        Trainer(tiny(tmp_path, num_epochs=2, resume=True, mode="pause_as_thought"))


def test_yaml_config_with_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("c_thought: 2\nlr: 0.0001\nmode: coconut\nbatch_size: 128\n")
    cfg = TrainConfig.from_yaml(path, {"lr": "0.001", "num_epochs": "7"})
    assert (cfg.c_thought, cfg.lr, cfg.num_epochs, cfg.batch_size) == (2, 1e-3, 7, 128)
    path.write_text("- not a mapping\n")
    with pytest.raises(TrainingError, match="expected a mapping"):
        TrainConfig.from_yaml(path)


def test_stage_schedule():
    cfg = TrainConfig(epochs_per_stage=2, stage0_epochs=3)
    assert [cfg.stage_of(e) for e in range(8)] == [0, 0, 0, 1, 1, 2, 2, 3]
    assert [TrainConfig(epochs_per_stage=5).stage_of(e) for e in (0, 4, 5, 12)] == [0, 0, 1, 2]
    assert TrainConfig(mode="cot").stage_of(30) == 0


@pytest.mark.parametrize("name", ["gpt2-micro", "llama-tiny"])
def test_builtin_models_build_with_the_task_vocabulary_and_save_loadable_checkpoints(tmp_path, name):
    """A builtin shape of either family trains from scratch on the built-in task; its checkpoint
    loads back (config.json names the family) with the same weights."""
    cfg = TrainConfig(save_dir=str(tmp_path), model=f"builtin:{name}", task_train_size=8, task_val_size=2, batch_size=8,
                      num_epochs=1, mode="no_cot", lr=1e-3, eval_max_new_tokens=4, attention_backend="torch",
                      progress=False, task_config={"num_concepts": 6, "max_steps": 2, "concept_pool": 12})
    trainer = Trainer(cfg)
    trainer.run()
    family = "llama" if name.startswith("llama") else "gpt2"
    assert trainer.decoder.config.model_type == family
    assert trainer.decoder.config.vocab_size == len(trainer.tokenizer)
    final = checkpoint_dirs(tmp_path)[-1]
    assert json.loads((final / "config.json").read_text())["model_type"] == family
    loaded = load_model(final, attention_backend="torch")
    for (key, a), b in zip(trainer.decoder.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), key
