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

import hashlib
import json
import os
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .checkpoint import checkpoint_dirs, checkpoint_name, read_trainer_state
from .data import Record, load_records
from .distributed import DistEnv
from .train_checks import check_backend_runs, remove_paths, run_outputs
from .trainer import TrainConfig, Trainer, TrainingError, check_resume_config, evaluate
from .validation import is_integer


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
    stage; the metrics gain `real_accuracy` and `real_tokens_per_answer` there. With a `split`
    (`ScoredSplit`, also where no file is scored) every stage end records which split it was, so a
    resumed job can refuse to put two splits' scores in one column."""

    def __init__(self, config: TrainConfig, records: list[Record] | None, split: "ScoredSplit | None" = None):
        self.scored_records = records
        self.split = split
        super().__init__(config)

    def _evaluate(self, epoch: int, model) -> dict:
        result = super()._evaluate(epoch, model)
        cfg = self.cfg
        last_of_stage = epoch + 1 == cfg.num_epochs or cfg.stage_of(epoch + 1) != cfg.stage_of(epoch)
        if self.split is not None and last_of_stage:
            result.update(real_split=self.split.path, real_split_sha256=self.split.sha256)
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


class ScoredSplit(NamedTuple):
    """The split a job scores at every stage end: its path and the SHA-256 of its bytes (both None where
    no split is scored)."""

    path: str | None
    sha256: str | None

    @classmethod
    def of(cls, path: Path | None) -> "ScoredSplit":
        return cls(None, None) if path is None else cls(str(path), hashlib.sha256(path.read_bytes()).hexdigest())


def clear_outputs(runs: list[TrainConfig]) -> None:
    """Remove the run outputs (checkpoints, metrics, generated data and tokenizer) from the folders of
    `runs`, every folder checked before anything is removed: one holding files a run does not write is
    an error naming it, and nothing is cleared."""
    remove_paths([path for cfg in runs for path in run_outputs(cfg, TrainingError)])


def runs_to_start_over(runs: MainJobRuns, split: ScoredSplit | None) -> list[TrainConfig]:
    """For a resumed job, before anything trains: check each run's newest checkpoint against the run's
    config (and against `split`, for a job that scores one at every stage end) and return the runs
    that must start over: from the first one without a complete checkpoint on (its data or tokenizer
    may be another job's), or the runs after the first unfinished one (they cannot have started)."""
    ordered = [cfg for cfg in runs if cfg is not None]
    states = []
    for cfg in ordered:  # every run with a checkpoint, also those after a gap: none is cleared unchecked
        found = checkpoint_dirs(cfg.save_dir)
        state = read_trainer_state(found[-1]) if found else None
        if state is not None:
            check_resume_config(found[-1], state, cfg)
            if split is not None:
                _check_scored_split(found[-1], state, split)
        states.append(state)
    for i, (cfg, state) in enumerate(zip(ordered, states)):
        if state is None:
            return ordered[i:]
        if not (is_integer(state.get("epochs_done")) and state["epochs_done"] >= cfg.num_epochs):
            return ordered[i + 1:]
    return []


def _check_scored_split(checkpoint: Path, state: dict, split: ScoredSplit) -> None:
    history = state.get("history")
    for m in history if isinstance(history, list) else []:
        if isinstance(m, dict) and "real_split_sha256" in m and m["real_split_sha256"] != split.sha256:
            before = f"{m.get('real_split')} (SHA-256 {str(m['real_split_sha256'])[:12]})" \
                if m["real_split_sha256"] else "no split"
            now = f"{split.path} (SHA-256 {split.sha256[:12]})" if split.sha256 else "no split"
            raise TrainingError(f"{checkpoint}: its stages were scored on {before}, this job would score {now}: "
                                f"resume with the same split (${PROSQA_VALID_ENV}) or start the job over")


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
    coconut_cfg = runs.coconut
    staged = real if settings.score_every_stage else None
    split = ScoredSplit.of(real_path if real else None) if settings.score_every_stage else None
    device = torch.device(coconut_cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # before anything is cleared: a backend this machine cannot run stops the job first
    check_backend_runs(coconut_cfg.attention_backend, device, "main job: attention backend", TrainingError)
    start_over = runs_to_start_over(runs, split) if resume else [cfg for cfg in runs if cfg is not None]
    if DistEnv.from_environment().is_main:  # under torchrun one rank clears; the others wait in the Trainer
        clear_outputs(start_over)
        if not resume:
            for name in ("results.md", "results.json"):
                (save_dir / name).unlink(missing_ok=True)
    trained: list[dict] = []  # the epochs this process trains (a resumed job's earlier ones are not timed here)
    warmup_history = _train(Trainer(runs.coconut_warmup), trained) if runs.coconut_warmup else []
    trainer = StageEndScoring(coconut_cfg, staged, split)
    history = _train(trainer, trained)
    coconut_seconds = time.perf_counter() - started
    if runs.no_cot_warmup:
        warmup_history += _train(Trainer(runs.no_cot_warmup), trained)
    no_cot_history = _train(StageEndScoring(runs.no_cot, staged, split), trained)
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
                          "training": sum(m["train_seconds"] for m in trained)},
                  resumed_epochs=len(warmup_history + history + no_cot_history) - len(trained))
    table = format_table(result)
    print(table)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "results.md").write_text(table + "\n")
    (save_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _train(trainer: Trainer, trained: list[dict]) -> list[dict]:
    """Run `trainer`; returns its whole history and appends the epochs it trained now to `trained`."""
    before = len(trainer.history)
    history = trainer.run()
    trained.extend(history[before:])
    return history


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
    resumed = result.get("resumed_epochs", 0)
    lines.append(f"Wall time{' of this process' if resumed else ''}: {result['seconds']:.0f} s (Coconut run "
                 f"{phases['coconut']:.0f} s, no-CoT run {phases['no_cot']:.0f} s, of which training steps "
                 f"{phases['training']:.0f} s); process CPU time {result['cpu_seconds']:.0f} s."
                 + (f" Resumed: {resumed} epoch(s) trained by an earlier process are not in these times." if resumed
                    else ""))
    return "\n".join(lines)
