"""The main job (`coconut-engine train` without arguments): Coconut learning a built-in task on CPU.

Two tasks (`run_main_job(task=...)`, `coconut-engine train --task NAME`):

- `small` (the default): a ProsQA-style task (7-node graphs over a 24-name concept pool, 2-3
  reasoning steps). It generates the task, trains a tokenizer and a small GPT-2-architecture model
  from scratch through the Coconut curriculum (stage 0 is chain-of-thought, then stages 1..3
  replace the reasoning steps with continuous thoughts), trains the no-CoT baseline from the same
  start, and prints held-out accuracy per stage with the number of generated tokens per answer.
  Tuned to finish within 10 minutes on a 2-core machine; the real ProsQA validation split (when
  the file is there) is scored once, with the final Coconut model, and requests that fail (a real
  question can exceed the model's positions with this task's tokenizer) count as wrong and are
  reported.
- `prosqa`: questions generated from ProsQA's own distribution (`tasks/prosqa_distribution.py`),
  a rotary-position model, each run warmed up on small ProsQA graphs (`Warmup`), the same
  curriculum plus a last stage that drops every step (keeping 3 thoughts, as the official code does
  past its last stage), and the real split scored at the end of every stage (`StageEndScoring`).
  It answers in the right form but not yet above chance on the real split (README).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import NamedTuple

from .checkpoint import checkpoint_name
from .data import Record, load_records
from .train_checks import prepare_save_dir
from .trainer import TrainConfig, Trainer, TrainingError, evaluate


class Warmup(NamedTuple):
    """Epochs on easier questions before a run's own data: each method first learns the answer's
    format (copying the person and an option out of the question) on small graphs, where a step
    costs a quarter of a full-size one, then goes on from that checkpoint."""

    task_config: dict  # ProsQAConfig fields of the warm-up questions
    task_train_size: int
    epochs: int


class JobSettings(NamedTuple):
    common: dict  # TrainConfig keys shared by the Coconut run and the no-CoT baseline
    coconut_epochs: dict  # {"cot": stage-0 epochs, "per_stage": epochs of each latent stage}
    no_cot_epochs: int
    all_latent_stage: bool  # one more stage past max_latent_stage that drops every step
    score_every_stage: bool  # the real split at the end of every stage (else once, the final Coconut model)
    warmup: Warmup | None = None  # the Coconut run warms up with CoT, the no-CoT baseline with no-CoT


# The default task (README, "The main job": the table measured with these settings).
TASK = {"num_concepts": 7, "extra_edges": 2, "person_facts": 0, "min_steps": 2, "max_steps": 3, "concept_pool": 24}
COMMON = dict(model="builtin:gpt2-tiny", batch_size=32, lr=2e-3, weight_decay=0.01, max_latent_stage=3,
              c_thought=1, eval_max_new_tokens=40, reset_optimizer="stage", task_train_size=6000, task_val_size=200,
              task_config=TASK)
COCONUT_EPOCHS = {"cot": 6, "per_stage": 2}
NO_COT_EPOCHS = 12  # as many epochs as the whole Coconut curriculum

# The ProsQA-distribution task (`--task prosqa`): a rotary-position model (copying from the question
# by relative offset is what a from-scratch model learns first) warmed up on small ProsQA graphs.
PROSQA_TASK = {"distribution": "prosqa"}
PROSQA_COMMON = dict(COMMON, model="builtin:llama-tiny", eval_max_new_tokens=64, task_train_size=1500,
                     task_val_size=100, task_config=PROSQA_TASK)
PROSQA_COCONUT_EPOCHS = {"cot": 1, "per_stage": 1}
PROSQA_NO_COT_EPOCHS = 5  # as many as the curriculum after its warm-up
PROSQA_WARMUP = Warmup({"distribution": "prosqa_small"}, task_train_size=6000, epochs=4)

MAIN_JOBS = {
    "small": JobSettings(COMMON, COCONUT_EPOCHS, NO_COT_EPOCHS, all_latent_stage=False, score_every_stage=False),
    "prosqa": JobSettings(PROSQA_COMMON, PROSQA_COCONUT_EPOCHS, PROSQA_NO_COT_EPOCHS, all_latent_stage=True,
                          score_every_stage=True, warmup=PROSQA_WARMUP),
}
# The real ProsQA validation split: $COCONUT_PROSQA_VALID where set, else `PROSQA_VALID` from the working
# directory (the repository root, with shared/ beside the checkout), else beside this checkout's root.
PROSQA_VALID_ENV = "COCONUT_PROSQA_VALID"
PROSQA_VALID = Path("../shared/data/prosqa_valid.json")


def real_split_path(real_split: str | Path | None = None) -> tuple[Path, bool]:
    """The real split to score and whether the user named it (`real_split`, else $COCONUT_PROSQA_VALID):
    a named path must be a file; the default is looked up from the working directory, then from the
    checkout this package runs from."""
    if real_split is not None:
        return Path(real_split), True
    if os.environ.get(PROSQA_VALID_ENV):
        return Path(os.environ[PROSQA_VALID_ENV]), True
    if PROSQA_VALID.is_absolute() or PROSQA_VALID.is_file():
        return PROSQA_VALID, False
    beside_checkout = Path(__file__).resolve().parent.parent / PROSQA_VALID
    return (beside_checkout if beside_checkout.is_file() else PROSQA_VALID), False


class StageEndScoring(Trainer):
    """A Trainer that also scores a fixed question set (the real split) at the last epoch of each
    stage; the metrics gain `real_accuracy` and `real_tokens_per_answer` there."""

    def __init__(self, config: TrainConfig, records: list[Record] | None):
        self.scored_records = records
        super().__init__(config)

    def _evaluate(self, epoch: int, model) -> dict:
        result = super()._evaluate(epoch, model)
        cfg = self.cfg
        last_of_stage = epoch + 1 == cfg.num_epochs or cfg.stage_of(epoch + 1) != cfg.stage_of(epoch)
        if self.scored_records and last_of_stage:
            real = evaluate(model.decoder, self.tokenizer, self.tokens, self.scored_records, cfg.stage_of(epoch),
                            self.rules, cfg.max_new_tokens(), cfg.page_size,
                            thought_transform=model.thought_transform)
            if real["errors"]:
                raise TrainingError(f"scoring the fixed question set after epoch {epoch + 1}: "
                                    f"{len(real['errors'])} request(s) failed, first: {real['errors'][0]}")
            result["real_accuracy"] = real["accuracy"]
            result["real_tokens_per_answer"] = real["tokens_per_answer"]
        return result


def _settings(task: str) -> JobSettings:
    if task not in MAIN_JOBS:
        raise TrainingError(f"main job: unknown task {task!r} (known: {', '.join(MAIN_JOBS)})")
    return MAIN_JOBS[task]


class MainJobRuns(NamedTuple):
    """The runs of a main job, in the order they train; the warm-ups are None for a task without one."""

    coconut_warmup: TrainConfig | None  # CoT on the warm-up questions
    coconut: TrainConfig  # the curriculum, from the warm-up's last checkpoint
    no_cot_warmup: TrainConfig | None  # no-CoT on the same warm-up questions, from the same initial weights
    no_cot: TrainConfig  # the baseline on the Coconut run's data and tokenizer


def default_configs(save_dir: str | Path, scale: float = 1.0, progress: bool = True,
                    task: str = "small", resume: bool = False) -> MainJobRuns:
    """The runs of a task of `MAIN_JOBS`; `scale` < 1 shrinks data and epochs (for tests). A re-run of
    the main job replaces the last one's outputs; with `resume` every run continues from its newest
    complete checkpoint instead (a finished run trains nothing more)."""
    settings = _settings(task)
    save_dir = Path(save_dir)
    common = dict(settings.common, progress=progress, **({"resume": True} if resume else {"overwrite": True}))
    common["task_train_size"] = max(64, int(common["task_train_size"] * scale))
    common["task_val_size"] = max(16, int(common["task_val_size"] * scale))
    cot_epochs = max(1, round(settings.coconut_epochs["cot"] * scale))
    per_stage = max(1, round(settings.coconut_epochs["per_stage"] * scale))
    stages = common["max_latent_stage"] + (1 if settings.all_latent_stage else 0)
    no_cot_epochs = max(1, round(settings.no_cot_epochs * scale))
    coconut_warmup = no_cot_warmup = None
    coconut_start, no_cot_start = {}, {}
    if settings.warmup is not None:
        warm = settings.warmup
        warm_epochs = max(1, round(warm.epochs * scale))
        warm_common = dict(common, task_config=warm.task_config,
                           task_train_size=max(64, int(warm.task_train_size * scale)))
        coconut_warmup = TrainConfig(name="coconut-warmup", save_dir=str(save_dir / "coconut_warmup"), mode="cot",
                                     num_epochs=warm_epochs, **warm_common)
        warm_data = Path(coconut_warmup.save_dir) / "data"
        no_cot_warmup = TrainConfig(name="no-cot-warmup", save_dir=str(save_dir / "no_cot_warmup"), mode="no_cot",
                                    num_epochs=warm_epochs, train_path=str(warm_data / "train.json"),
                                    val_path=str(warm_data / "val.json"),
                                    tokenizer=str(Path(coconut_warmup.save_dir) / "tokenizer"), **warm_common)
        last = checkpoint_name(warm_epochs)
        coconut_start = {"model": str(Path(coconut_warmup.save_dir) / last)}
        no_cot_start = {"model": str(Path(no_cot_warmup.save_dir) / last)}
    coconut = TrainConfig(name="coconut", save_dir=str(save_dir / "coconut"), mode="coconut", stage0_epochs=cot_epochs,
                          epochs_per_stage=per_stage, num_epochs=cot_epochs + per_stage * stages,
                          **{**common, **coconut_start})
    data = Path(coconut.save_dir) / "data"
    # a warmed-up baseline reads the tokenizer from its warm-up checkpoint, which holds the same one
    tokenizer = {} if no_cot_start else {"tokenizer": str(Path(coconut.save_dir) / "tokenizer")}
    no_cot = TrainConfig(name="no-cot", save_dir=str(save_dir / "no_cot"), mode="no_cot", num_epochs=no_cot_epochs,
                         train_path=str(data / "train.json"), val_path=str(data / "val.json"),
                         **{**common, **no_cot_start, **tokenizer})
    return MainJobRuns(coconut_warmup, coconut, no_cot_warmup, no_cot)


def clear_earlier_outputs(runs: MainJobRuns) -> None:
    """Remove what an earlier main job left in every run's folder before the first run trains, so that
    an interrupted fresh job never leaves a later run's folder holding the job before it (which a
    `resume` would take as that run's progress). Only run outputs go (`prepare_save_dir`)."""
    for cfg in runs:
        if cfg is not None:
            prepare_save_dir(cfg, TrainingError)


def run_main_job(save_dir: str | Path = "runs/default", scale: float = 1.0, progress: bool = True,
                 real_split: str | Path | None = None, task: str = "small", resume: bool = False) -> dict:
    """Train Coconut and the no-CoT baseline (which reuses Coconut's data and tokenizer) on a task of
    `MAIN_JOBS`, each after its warm-up where the task has one; print and return the accuracy table.
    `resume` continues an interrupted job in `save_dir` from each run's newest complete checkpoint
    (same task and scale: a run whose settings differ is refused, naming them); without it the job
    starts over, replacing the earlier job's outputs.
    `real_split` (default: `real_split_path`; a default that is absent is skipped with a printed line,
    a named path that is not a file is an error) is scored with the final Coconut model
    (task `small`: failed requests count as wrong and are reported) or at the end of every stage of
    both runs (task `prosqa`)."""
    settings = _settings(task)
    save_dir = Path(save_dir)
    real_path, named = real_split_path(real_split)
    if named and not real_path.is_file():
        source = "real_split" if real_split is not None else f"${PROSQA_VALID_ENV}"
        raise TrainingError(f"main job: the real split to score ({source}), {real_path.resolve()}, is not a file")
    real = load_records(real_path) if real_path.is_file() else None
    missing = None if real else str(real_path.resolve())
    if missing:  # said before the run, not only after it
        print(f"The real ProsQA validation split is not scored: {missing} is not a file "
              f"(set {PROSQA_VALID_ENV} to its path).", flush=True)
    started, cpu_started = time.perf_counter(), time.process_time()
    runs = default_configs(save_dir, scale, progress, task, resume)
    if not resume:
        clear_earlier_outputs(runs)
    coconut_cfg = runs.coconut
    staged = real if settings.score_every_stage else None
    warmup_history = Trainer(runs.coconut_warmup).run() if runs.coconut_warmup else []
    trainer = StageEndScoring(coconut_cfg, staged)
    history = trainer.run()
    coconut_seconds = time.perf_counter() - started
    if runs.no_cot_warmup:
        warmup_history += Trainer(runs.no_cot_warmup).run()
    no_cot_history = StageEndScoring(runs.no_cot, staged).run()
    no_cot_seconds = time.perf_counter() - started - coconut_seconds

    rows = [{"method": "no-CoT", "stage": "-", "thoughts": 0, **_pick(no_cot_history[-1])}]
    for stage in sorted({m["stage"] for m in history}):
        last = [m for m in history if m["stage"] == stage][-1]
        label = "CoT (stage 0)" if stage == 0 else f"Coconut stage {stage}"
        if stage > coconut_cfg.max_latent_stage:
            label += " (all steps latent)"
        rows.append({"method": label, "stage": stage, "thoughts": last["thoughts_per_answer"], **_pick(last)})
    result = {"task": task, "rows": rows, "real_split": str(real_path) if real and staged else None,
              "real_split_missing": missing}
    if real and not staged:  # once, the final Coconut model; a failed request counts as wrong: say so
        scored = evaluate(trainer.decoder, trainer.tokenizer, trainer.tokens, real, history[-1]["stage"],
                          trainer.rules, coconut_cfg.max_new_tokens(), coconut_cfg.page_size,
                          thought_transform=trainer.model.thought_transform)
        result["prosqa_valid"] = str(real_path)
        result["prosqa_valid_accuracy"] = scored["accuracy"]
        result["prosqa_valid_failed"] = len(scored["errors"])
        result["prosqa_valid_questions"] = len(real)
        result["prosqa_valid_first_error"] = scored["errors"][0] if scored["errors"] else None
    result.update(seconds=time.perf_counter() - started, cpu_seconds=time.process_time() - cpu_started,
                  phases={"coconut": coconut_seconds, "no_cot": no_cot_seconds,
                          "training": sum(m["train_seconds"] for m in warmup_history + history + no_cot_history)})
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
    real = result.get("real_split")  # scored per stage: a column
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
    if "prosqa_valid_accuracy" in result:
        lines.append(f"Final Coconut model on the real ProsQA validation split ({result['prosqa_valid']}): "
                     f"{result['prosqa_valid_accuracy']:.3f} (out of distribution: longer graphs, unseen names).")
        if result.get("prosqa_valid_failed"):
            lines.append(f"{result['prosqa_valid_failed']} of {result['prosqa_valid_questions']} ProsQA requests "
                         f"failed and count as wrong (first: {result['prosqa_valid_first_error']}).")
    if result.get("real_split_missing"):
        lines.append(f"Real ProsQA validation split not scored: {result['real_split_missing']} is not a file "
                     f"(set {PROSQA_VALID_ENV} to its path).")
    phases = result["phases"]
    lines.append(f"Wall time: {result['seconds']:.0f} s (Coconut run {phases['coconut']:.0f} s, no-CoT run "
                 f"{phases['no_cot']:.0f} s, of which training steps {phases['training']:.0f} s); "
                 f"process CPU time {result['cpu_seconds']:.0f} s.")
    return "\n".join(lines)
