"""The ProsQA recipes in examples/: each parses into a TrainConfig with the settings it promises."""
from pathlib import Path

import pytest

from coconut_engine.trainer import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize("name", ["prosqa_gpt2_gpu", "prosqa_qwen25_05b_gpu"])
def test_gpu_recipes_are_the_paper_settings_on_the_prosqa_distribution(name):
    cfg = TrainConfig.from_yaml(EXAMPLES / f"{name}.yaml")
    assert (cfg.c_thought, cfg.max_latent_stage, cfg.epochs_per_stage, cfg.num_epochs) == (1, 6, 5, 50)
    assert (cfg.batch_size, cfg.lr, cfg.mode, cfg.pad_latent_to_max, cfg.reset_optimizer) == (128, 1e-4, "coconut", True, True)
    assert cfg.task_config == {"distribution": "prosqa"} and cfg.train_path is None
    assert cfg.stage_of(cfg.num_epochs - 1) >= cfg.max_latent_stage  # the curriculum reaches its last stage


@pytest.mark.parametrize("name, distribution", [("prosqa_real_cpu", "prosqa"), ("prosqa_smollm2_cpu", "prosqa_small")])
def test_cpu_recipes_train_on_the_prosqa_distribution_through_every_stage(name, distribution):
    cfg = TrainConfig.from_yaml(EXAMPLES / f"{name}.yaml")
    assert cfg.task_config == {"distribution": distribution} and cfg.mode == "coconut"
    assert cfg.stage_of(cfg.num_epochs - 1) >= cfg.max_latent_stage


def test_the_smollm2_recipe_draws_fresh_questions_and_keeps_its_cot_checkpoint():
    cfg = TrainConfig.from_yaml(EXAMPLES / "prosqa_smollm2_cpu.yaml")
    assert cfg.task_fresh_each_epoch and cfg.train_path is None and not cfg.model.startswith("builtin:")
    assert cfg.keep_checkpoints >= cfg.num_epochs and cfg.stage_of(cfg.stage0_epochs - 1) == 0
    no_cot = TrainConfig.from_yaml(EXAMPLES / "prosqa_smollm2_cpu.yaml", {"mode": "no_cot", "stage0_epochs": None})
    assert no_cot.stage_of(no_cot.num_epochs - 1) == 0


def test_the_real_cpu_recipe_keeps_the_cot_checkpoint_and_its_baseline_override_parses():
    cfg = TrainConfig.from_yaml(EXAMPLES / "prosqa_real_cpu.yaml")
    assert cfg.keep_checkpoints >= cfg.num_epochs  # stage 0's last checkpoint is the CoT model
    no_cot = TrainConfig.from_yaml(EXAMPLES / "prosqa_real_cpu.yaml", {"mode": "no_cot", "stage0_epochs": None})
    assert no_cot.stage_of(no_cot.num_epochs - 1) == 0


def test_the_real_cpu_recipe_starts_from_the_last_checkpoint_of_its_warmup():
    warmup = TrainConfig.from_yaml(EXAMPLES / "prosqa_real_cpu_warmup.yaml")
    assert warmup.mode == "cot" and warmup.task_config == {"distribution": "prosqa_small"}
    assert warmup.model.startswith("builtin:") and warmup.train_path is None
    cfg = TrainConfig.from_yaml(EXAMPLES / "prosqa_real_cpu.yaml")
    assert cfg.model == f"{warmup.save_dir}/checkpoint-{warmup.num_epochs:04d}"
    no_cot_warmup = TrainConfig.from_yaml(EXAMPLES / "prosqa_real_cpu_warmup.yaml", {"mode": "no_cot"})
    assert no_cot_warmup.stage_of(no_cot_warmup.num_epochs - 1) == 0


def test_the_smollm2_real_recipe_starts_from_the_cot_model_of_the_short_recipe():
    short = TrainConfig.from_yaml(EXAMPLES / "prosqa_smollm2_cpu.yaml")
    cfg = TrainConfig.from_yaml(EXAMPLES / "prosqa_smollm2_real_cpu.yaml")
    assert cfg.model == f"{short.save_dir}/checkpoint-{short.stage0_epochs:04d}"  # stage 0's last epoch
    assert cfg.task_config == {"distribution": "prosqa"} and cfg.task_fresh_each_epoch and cfg.bf16
    assert cfg.stage_of(cfg.num_epochs - 1) == cfg.max_latent_stage == 6 and cfg.keep_checkpoints >= cfg.num_epochs
