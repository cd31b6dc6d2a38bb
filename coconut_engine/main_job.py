"""The main job (`coconut-engine train` without arguments): Coconut learning ProsQA on CPU.

It generates questions from ProsQA's own distribution (`tasks/prosqa_distribution.py`), trains a
tokenizer and a small GPT-2-architecture model from scratch through the Coconut curriculum (stage
0 is chain-of-thought, stages 1..K replace the first 1..K reasoning steps with continuous thoughts,
and stage K+1 drops every step, keeping K thoughts, as the official code does past its last stage),
trains the no-CoT baseline from the same start, and prints accuracy per stage on its own held-out
questions and on the real ProsQA validation split (when the file is there), with the number of
generated tokens per answer. The settings are sized by the measured step cost to finish within
10 minutes on an idle 2-core machine; they are a first choice, not tuned (see README).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .data import Record, load_records
from .trainer import TrainConfig, Trainer, TrainingError, evaluate

# The defaults (README, "The main job": what was measured with them).
TASK = {"distribution": "prosqa"}
COMMON = dict(model="builtin:gpt2-tiny", batch_size=32, lr=2e-3, weight_decay=0.01, max_latent_stage=3,
              c_thought=1, eval_max_new_tokens=64, reset_optimizer="stage", task_train_size=1500, task_val_size=100,
              task_config=TASK)
COCONUT_EPOCHS = {"cot": 3, "per_stage": 1}
NO_COT_EPOCHS = 6
PROSQA_VALID = Path(os.environ.get("COCONUT_PROSQA_VALID", "../shared/data/prosqa_valid.json"))


class StageEndScoring(Trainer):
    """A Trainer that also scores a fixed question set (the real split) at the last epoch of each
    stage; the metrics gain `real_accuracy` and `real_tokens_per_answer` there."""

    def __init__(self, config: TrainConfig, records: list[Record] | None):
        self.scored_records = records
        super().__init__(config)

    def _evaluate(self, epoch: int, decoder) -> dict:
        result = super()._evaluate(epoch, decoder)
        cfg = self.cfg
        last_of_stage = epoch + 1 == cfg.num_epochs or cfg.stage_of(epoch + 1) != cfg.stage_of(epoch)
        if self.scored_records and last_of_stage:
            real = evaluate(decoder, self.tokenizer, self.tokens, self.scored_records, cfg.stage_of(epoch),
                            self.rules, cfg.max_new_tokens(), cfg.page_size,
                            thought_transform=self.model.thought_transform)
            if real["errors"]:
                raise TrainingError(f"scoring the fixed question set after epoch {epoch + 1}: "
                                    f"{len(real['errors'])} request(s) failed, first: {real['errors'][0]}")
            result["real_accuracy"] = real["accuracy"]
            result["real_tokens_per_answer"] = real["tokens_per_answer"]
        return result


def default_configs(save_dir: str | Path, scale: float = 1.0, progress: bool = True) -> tuple[TrainConfig, TrainConfig]:
    """The Coconut run and the no-CoT baseline; `scale` < 1 shrinks data and epochs (for tests)."""
    save_dir = Path(save_dir)
    common = dict(COMMON, progress=progress, overwrite=True)  # a re-run of the main job replaces the last one
    common["task_train_size"] = max(64, int(common["task_train_size"] * scale))
    common["task_val_size"] = max(16, int(common["task_val_size"] * scale))
    cot_epochs = max(1, round(COCONUT_EPOCHS["cot"] * scale))
    per_stage = max(1, round(COCONUT_EPOCHS["per_stage"] * scale))
    stages = common["max_latent_stage"] + 1  # the last one: every step latent
    coconut = TrainConfig(name="coconut", save_dir=str(save_dir / "coconut"), mode="coconut", stage0_epochs=cot_epochs,
                          epochs_per_stage=per_stage, num_epochs=cot_epochs + per_stage * stages, **common)
    data, tokenizer = Path(coconut.save_dir) / "data", Path(coconut.save_dir) / "tokenizer"
    no_cot = TrainConfig(name="no-cot", save_dir=str(save_dir / "no_cot"), mode="no_cot",
                         num_epochs=max(1, round(NO_COT_EPOCHS * scale)), train_path=str(data / "train.json"),
                         val_path=str(data / "val.json"), tokenizer=str(tokenizer), **common)
    return coconut, no_cot


def run_main_job(save_dir: str | Path = "runs/default", scale: float = 1.0, progress: bool = True,
                 real_split: str | Path | None = None) -> dict:
    """Train Coconut and the no-CoT baseline (which reuses Coconut's data and tokenizer); print and
    return the accuracy table. `real_split` (default `PROSQA_VALID`, skipped when absent) is scored
    at the end of every stage."""
    save_dir = Path(save_dir)
    real_path = Path(real_split) if real_split is not None else PROSQA_VALID
    real = load_records(real_path) if real_path.is_file() else None
    started, cpu_started = time.perf_counter(), time.process_time()
    coconut_cfg, no_cot_cfg = default_configs(save_dir, scale, progress)
    history = StageEndScoring(coconut_cfg, real).run()
    coconut_seconds = time.perf_counter() - started
    no_cot_history = StageEndScoring(no_cot_cfg, real).run()

    rows = [{"method": "no-CoT", "stage": "-", "thoughts": 0, **_pick(no_cot_history[-1])}]
    for stage in sorted({m["stage"] for m in history}):
        last = [m for m in history if m["stage"] == stage][-1]
        label = "CoT (stage 0)" if stage == 0 else f"Coconut stage {stage}"
        if stage > COMMON["max_latent_stage"]:
            label += " (all steps latent)"
        rows.append({"method": label, "stage": stage, "thoughts": last["thoughts_per_answer"], **_pick(last)})
    result = {"rows": rows, "real_split": str(real_path) if real else None,
              "seconds": time.perf_counter() - started, "cpu_seconds": time.process_time() - cpu_started,
              "phases": {"coconut": coconut_seconds, "no_cot": time.perf_counter() - started - coconut_seconds,
                         "training": sum(m["train_seconds"] for m in history + no_cot_history)}}
    table = format_table(result)
    print(table)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "results.md").write_text(table + "\n")
    (save_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _pick(m: dict) -> dict:
    keys = ("accuracy", "tokens_per_answer", "val_loss", "real_accuracy", "real_tokens_per_answer")
    return {k: m[k] for k in keys if k in m}


def format_table(result: dict) -> str:
    """The results as a markdown table with the timing lines under it."""
    real = result.get("real_split")
    head = "| method | thoughts | held-out accuracy |" + (" real ProsQA valid accuracy |" if real else "")
    lines = [head + " generated tokens / answer |", "|---|---:|---:|" + ("---:|" if real else "") + "---:|"]
    for r in result["rows"]:
        cells = [r["method"], f"{r['thoughts']:.1f}", f"{r['accuracy']:.3f}"]
        if real:
            cells.append(f"{r['real_accuracy']:.3f}")
        cells.append(f"{r['tokens_per_answer']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Chance (picking one of the two options in the right format) is 0.5.")
    if real:
        lines.append(f"Real split: {real} (300 questions never trained on; the training questions are generated).")
    phases = result["phases"]
    lines.append(f"Wall time: {result['seconds']:.0f} s (Coconut run {phases['coconut']:.0f} s, no-CoT run "
                 f"{phases['no_cot']:.0f} s, of which training steps {phases['training']:.0f} s); "
                 f"process CPU time {result['cpu_seconds']:.0f} s.")
    return "\n".join(lines)
