"""The main job (`coconut-engine train` without arguments): Coconut learning a built-in task on CPU.

It generates a ProsQA-style task, trains a tokenizer and a small GPT-2-architecture model from
scratch through the Coconut curriculum (stage 0 is chain-of-thought, then stages 1..K replace the
reasoning steps with continuous thoughts), trains the no-CoT baseline from the same start, and
prints held-out accuracy per stage with the number of generated tokens per answer. The settings
are tuned to finish within 10 minutes on a 2-core machine.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .trainer import TrainConfig, Trainer, evaluate

# The tuned defaults (see README for the measured table).
TASK = {"num_concepts": 7, "extra_edges": 2, "person_facts": 0, "min_steps": 2, "max_steps": 3, "concept_pool": 24}
COMMON = dict(model="builtin:gpt2-tiny", batch_size=32, lr=2e-3, weight_decay=0.01, max_latent_stage=3,
              c_thought=1, eval_max_new_tokens=40, reset_optimizer="stage", task_train_size=6000, task_val_size=200, task_config=TASK)
COCONUT_EPOCHS = {"cot": 6, "per_stage": 2}
NO_COT_EPOCHS = 12  # as many epochs as the whole Coconut curriculum
PROSQA_VALID = Path(os.environ.get("COCONUT_PROSQA_VALID", "../shared/data/prosqa_valid.json"))


def default_configs(save_dir: str | Path, scale: float = 1.0, progress: bool = True) -> tuple[TrainConfig, TrainConfig]:
    """The Coconut run and the no-CoT baseline; `scale` < 1 shrinks data and epochs (for tests)."""
    save_dir = Path(save_dir)
    common = dict(COMMON, progress=progress, overwrite=True)  # a re-run of the main job replaces the last one
    common["task_train_size"] = max(64, int(common["task_train_size"] * scale))
    common["task_val_size"] = max(16, int(common["task_val_size"] * scale))
    cot_epochs = max(1, round(COCONUT_EPOCHS["cot"] * scale))
    per_stage = max(1, round(COCONUT_EPOCHS["per_stage"] * scale))
    coconut = TrainConfig(name="coconut", save_dir=str(save_dir / "coconut"), mode="coconut", stage0_epochs=cot_epochs,
                          epochs_per_stage=per_stage, num_epochs=cot_epochs + per_stage * common["max_latent_stage"],
                          **common)
    data, tokenizer = Path(coconut.save_dir) / "data", Path(coconut.save_dir) / "tokenizer"
    no_cot = TrainConfig(name="no-cot", save_dir=str(save_dir / "no_cot"), mode="no_cot",
                         num_epochs=max(1, round(NO_COT_EPOCHS * scale)), train_path=str(data / "train.json"),
                         val_path=str(data / "val.json"), tokenizer=str(tokenizer), **common)
    return coconut, no_cot


def run_main_job(save_dir: str | Path = "runs/default", scale: float = 1.0, progress: bool = True) -> dict:
    """Train Coconut and the no-CoT baseline (which reuses Coconut's data and tokenizer); print and
    return the accuracy table."""
    save_dir = Path(save_dir)
    started = time.perf_counter()
    coconut_cfg, no_cot_cfg = default_configs(save_dir, scale, progress)
    trainer = Trainer(coconut_cfg)
    history = trainer.run()
    no_cot_history = Trainer(no_cot_cfg).run()

    rows = [{"method": "no-CoT", "stage": "-", "thoughts": 0, **_pick(no_cot_history[-1])}]
    for stage in sorted({m["stage"] for m in history}):
        last = [m for m in history if m["stage"] == stage][-1]
        label = "CoT (stage 0)" if stage == 0 else f"Coconut stage {stage}"
        rows.append({"method": label, "stage": stage, "thoughts": last["thoughts_per_answer"], **_pick(last)})
    result = {"rows": rows, "seconds": time.perf_counter() - started}
    if PROSQA_VALID.is_file():
        from .data import load_records

        records = load_records(PROSQA_VALID)
        real = evaluate(trainer.decoder, trainer.tokenizer, trainer.tokens, records, history[-1]["stage"],
                        trainer.rules, coconut_cfg.eval_max_new_tokens)
        result["prosqa_valid_accuracy"] = real["accuracy"]
        result["prosqa_valid_failed"] = len(real["errors"])  # counted as wrong in the accuracy: say so
        result["prosqa_valid_questions"] = len(records)
        result["prosqa_valid_first_error"] = real["errors"][0] if real["errors"] else None
    result["seconds"] = time.perf_counter() - started
    table = format_table(result)
    print(table)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "results.md").write_text(table + "\n")
    (save_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _pick(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "tokens_per_answer": m["tokens_per_answer"], "val_loss": m["val_loss"]}


def format_table(result: dict) -> str:
    lines = ["| method | thoughts | held-out accuracy | generated tokens / answer |", "|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['method']} | {r['thoughts']:.1f} | {r['accuracy']:.3f} | {r['tokens_per_answer']:.1f} |")
    lines.append("")
    lines.append("Chance (picking one of the two options in the right format) is 0.5.")
    if "prosqa_valid_accuracy" in result:
        lines.append(f"Final Coconut model on the real ProsQA validation split ({PROSQA_VALID}): "
                     f"{result['prosqa_valid_accuracy']:.3f} (out of distribution: longer graphs, unseen names).")
        if result.get("prosqa_valid_failed"):
            lines.append(f"{result['prosqa_valid_failed']} of {result['prosqa_valid_questions']} ProsQA requests "
                         f"failed and count as wrong (first: {result['prosqa_valid_first_error']}).")
    lines.append(f"Wall time: {result['seconds']:.0f} s.")
    return "\n".join(lines)
