"""The multi-stage Coconut trainer: curriculum, evaluation, checkpoints that resume, DDP / FSDP2 via torchrun.

`TrainConfig` uses the official key names where they exist. `batch_size` is the global number of
samples per optimizer step: under torchrun each rank takes every world_size-th sample of the batch,
the loss is the summed token cross-entropy divided by the label count of the whole batch, and the
gradients are summed across ranks (DDP or FSDP2, `distributed.py`), so N processes compute exactly
what one process does with the combined batch when dropout is off (with dropout each rank draws its own
masks, from (seed, epoch, rank): the same distribution, not the same draws). `gradient_accumulation_steps` splits each rank's
share into micro-batches (memory), without changing the result; DDP reduces gradients on the last,
FSDP2 on each (they stay sharded).
Evaluation is split across the ranks and gathered; rank 0 writes the checkpoints, which hold the
whole model and optimizer state, so a run resumes on any number of ranks.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .checkpoint import (checkpoint_dirs, checkpoint_name, checkpoint_thought_transform, load_checkpoint,
                         load_optimizer_state, read_optimizer_state, remove_stale_tmp, save_checkpoint)
from .coconut import CoconutModel, SpecialTokens, add_special_tokens
from .distributed import (PARALLEL_MODES, DistEnv, StateDictView, full_state_dict, gathered_optimizer_state,
                          agreed_thought_steps, gradient_sync, is_fsdp, load_gathered_optimizer_state,
                          wrap_for_training)
from .data import (DATA_MODES, Record, StageRules, TokenizedRecord, batches, build_sample, eval_prompt, load_records,
                   positions_needed, tokenize_record)
from .errors import CoconutEngineError
from .generate import Generator
from .host_memory import HostMemoryGuard
from .metrics import GenerationScore, score_generation, summarize
from .model import Decoder, DropoutRates
from .schedule import LRSchedule
from .thoughts import THOUGHT_TRANSFORMS, ThoughtTransform, build_thought_transform
from .tracking import TRACKERS, check_tracker, make_tracker
from .train_checks import (SAFE_RESUME_KEYS, check_backend_runs, check_types_and_ranges, config_changes,
                           prepare_save_dir)
from .validation import first_non_finite


class TrainingError(CoconutEngineError, RuntimeError):
    """Training cannot go on (diverged loss, bad configuration, incompatible checkpoint)."""


# Built-in model shapes for `model: builtin:NAME` (GPT-2 architecture unless the entry names another model_type;
# vocabulary from the tokenizer).
BUILTIN_MODELS = {
    "gpt2-micro": {"n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 1024},
    "gpt2-tiny": {"n_embd": 128, "n_layer": 4, "n_head": 4, "n_positions": 1024},
    "gpt2-small": {"n_embd": 256, "n_layer": 6, "n_head": 8, "n_positions": 1024},
    "gpt2": {"n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024},
    # Rotary positions: attention by relative offset, which copying from the question needs.
    "llama-tiny": {"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
                   "num_key_value_heads": 4, "intermediate_size": 512, "max_position_embeddings": 1024,
                   "rope_theta": 10000.0, "tie_word_embeddings": True},
}


@dataclass
class TrainConfig:
    """Everything a training run needs; official Coconut key names where they exist."""

    name: str = "coconut"
    save_dir: str = "runs/default"
    model: str = "builtin:gpt2-tiny"  # a Hugging Face model directory, or builtin:NAME
    tokenizer: str | None = None  # default: the model directory's; builtin models train one on the data
    train_path: str | None = None  # official JSON; default: generate the built-in task
    val_path: str | None = None
    task_train_size: int = 2000
    task_val_size: int = 200
    task_seed: int = 0
    task_config: dict | None = None  # ProsQAConfig fields for the built-in task
    task_fresh_each_epoch: bool = False  # built-in task: every epoch after the first trains on a new draw
    mode: str = "coconut"  # coconut | cot | no_cot | no_thoughts | pause_as_thought
    c_thought: int = 1
    epochs_per_stage: int = 5
    stage0_epochs: int | None = None  # epochs of stage 0 (chain of thought); default epochs_per_stage
    max_latent_stage: int = 6
    pad_latent_to_max: bool = False
    uniform_prob: float = 0.0
    reset_optimizer: bool | str = True  # true/"epoch": fresh AdamW every epoch (official); "stage"; false
    lr: float = 1e-4
    lr_schedule: str = "constant"  # constant (official) | cosine (linear warmup, then cosine decay)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0  # cosine: the last step's lr as a fraction of lr
    dropout: float | None = None  # None: the model config's (GPT-2 embd/resid/attn_pdrop); a number: all of them
    weight_decay: float = 0.01
    batch_size: int = 128
    gradient_accumulation_steps: int = 1
    max_batch_tokens: int | None = None
    num_epochs: int = 25
    max_grad_norm: float = 1.0
    bf16: bool = False  # bf16 autocast (CPU and CUDA); under FSDP also bf16 parameters, fp32 reduction
    parallel: str = "ddp"  # under torchrun: ddp | fsdp (FSDP2, parameters/gradients/optimizer sharded)
    seed: int = 0
    forward_mode: str = "paged"
    max_length: int | None = None  # drop records whose longest sample exceeds it; None: the model's positions
    train_limit: int | None = None  # train on the first N records only
    val_limit: int | None = None  # evaluate on the first N records only (max_eval_questions: the older name)
    eval_max_new_tokens: int | None = None  # None: the official 64 for GSM8K (val_path names gsm), else 128
    max_eval_questions: int | None = None
    resume: bool = False
    keep_checkpoints: int = 2  # the newest N; the best (by validation accuracy) is kept besides them
    save_only_improve: bool = False  # write a checkpoint only when validation accuracy improves (official)
    log_with: str | None = None  # tensorboard: event files in save_dir/tensorboard (optional dependency)
    device: str | None = None
    attention_backend: str = "auto"
    page_size: int = 16
    progress: bool = True
    overwrite: bool = False  # a fresh run in a non-empty save_dir replaces the earlier run's outputs
    drop_long_records: bool = False  # drop (and count) records longer than the model's positions
    thought_transform: str = "identity"  # what a thought feeds back: identity | gated | linear | norm
    eot_loss_weight: float = 0.0  # > 0: also learn p(<eot>) after <bot> and each thought (adaptive thinking)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, message: str):
            if not cond:
                raise TrainingError(f"config: {message}")

        check_types_and_ranges(self, lambda message: TrainingError(f"config: {message}"))  # types, ranges
        need(self.mode in DATA_MODES, f"mode {self.mode!r} is not one of {DATA_MODES}")
        need(not (self.stage0_epochs is not None and self.mode in ("cot", "no_cot")),
             f"stage0_epochs has no meaning in mode {self.mode} (no curriculum)")
        need(self.parallel in PARALLEL_MODES, f"parallel {self.parallel!r} is not one of {PARALLEL_MODES}")
        need(self.eval_max_new_tokens is None or self.eval_max_new_tokens >= 1, "eval_max_new_tokens must be >= 1")
        self.reset_optimizer = _reset_policy(self.reset_optimizer)
        need(self.reset_optimizer is not None,
             "reset_optimizer must be true (or 'epoch': every epoch, as official), 'stage' or false")
        need(self.dropout is None or 0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        for key in ("max_length", "train_limit", "val_limit"):
            need(getattr(self, key) is None or getattr(self, key) >= 1, f"{key} must be >= 1, got {getattr(self, key)}")
        if isinstance(self.log_with, str) and self.log_with.lower() in ("none", "null", ""):
            self.log_with = None
        need(self.log_with in (None, *TRACKERS), f"log_with {self.log_with!r} is not one of {TRACKERS} (or none)")
        need(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}")
        try:
            self.lr_scheduler(1)
        except ValueError as exc:
            raise TrainingError(f"config: {exc}") from exc
        need(self.forward_mode in ("paged", "two_pass", "multipass", "recompute"),
             f"forward_mode {self.forward_mode!r} is not paged | two_pass | multipass | recompute")
        need(self.thought_transform in THOUGHT_TRANSFORMS,
             f"thought_transform {self.thought_transform!r} is not one of {', '.join(THOUGHT_TRANSFORMS)}")
        need(self.parallel != "fsdp" or self.forward_mode in ("paged", "two_pass"),
             f"forward_mode {self.forward_mode!r} with parallel: fsdp is not supported (the no-cache reference "
             "modes do not agree their thought steps across ranks); use paged or two_pass")
        need((self.train_path is None) == (self.val_path is None),
             "give both train_path and val_path, or neither (to generate the built-in task)")
        need(not (self.task_fresh_each_epoch and self.train_path is not None),
             "task_fresh_each_epoch draws new questions of the built-in task; it has no meaning with train_path")
        need(not (self.resume and self.overwrite), "resume and overwrite exclude each other")
        need(not self.model.startswith("builtin:") or self.model[len("builtin:"):] in BUILTIN_MODELS,
             f"model {self.model!r}: unknown builtin model (known: {', '.join(BUILTIN_MODELS)})")
        need(not (self.eot_loss_weight > 0 and self.mode in ("cot", "no_cot", "pause_as_thought")),
             f"eot_loss_weight has no meaning in mode {self.mode}: the halting loss labels the positions after "
             "<bot> and after each continuous thought (modes coconut, no_thoughts)")
        need(not (self.mode in ("cot", "no_cot") and self.pad_latent_to_max),
             f"pad_latent_to_max has no meaning in mode {self.mode} (no thoughts)")
        try:
            self.rules()
        except ValueError as exc:
            raise TrainingError(f"config: {exc}") from exc

    def lr_scheduler(self, total_steps: int) -> LRSchedule:
        """The learning-rate schedule over a run of `total_steps` optimizer steps."""
        return LRSchedule(self.lr_schedule, self.lr, total_steps, self.warmup_steps, self.min_lr_ratio)

    def max_new_tokens(self) -> int:
        """Evaluation's generation budget: the key, else the official default for the validation file."""
        if self.eval_max_new_tokens is not None:
            return self.eval_max_new_tokens
        return official_max_new_tokens(self.val_path)

    def rules(self) -> StageRules:
        return StageRules(self.c_thought, self.max_latent_stage, self.pad_latent_to_max, self.uniform_prob, self.mode)

    def stage_of(self, epoch: int) -> int:
        """The curriculum stage of an epoch (0 forever in cot / no_cot)."""
        first = self.epochs_per_stage if self.stage0_epochs is None else self.stage0_epochs
        if self.mode in ("cot", "no_cot") or epoch < first:
            return 0
        return 1 + (epoch - first) // self.epochs_per_stage

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> "TrainConfig":
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TrainingError(f"{source}: unknown key(s) {unknown}; known keys: {', '.join(known)}")
        values = {k: _coerce(v, known[k].type, k, source) for k, v in values.items()}
        try:
            return cls(**values)
        except TrainingError as exc:
            raise TrainingError(str(exc).replace("config:", f"{source}:", 1)) from None

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict | None = None) -> "TrainConfig":
        import yaml

        path = Path(path)
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
            raise TrainingError(f"{path}: cannot read the config ({exc})") from exc
        if not isinstance(values, dict):
            raise TrainingError(f"{path}: expected a mapping of keys to values")
        return cls.from_dict({**values, **(overrides or {})}, source=str(path))


def official_max_new_tokens(val_path: str | Path | None) -> int:
    """The official run.py's generation budget: 64 when the validation file is GSM8K's, else 128."""
    return 64 if val_path is not None and "gsm" in str(val_path) else 128


def _reset_policy(value) -> bool | str | None:
    """reset_optimizer as given (bool or text) -> True (every epoch), "stage", False; None if invalid."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "epoch"):
        return True
    if text in ("false", "0", "no", "never"):
        return False
    return "stage" if text == "stage" else None


def _coerce(value, annotation, key: str, source: str):
    """CLI overrides arrive as strings: turn them into the field's type."""
    if not isinstance(value, str) or "str" in str(annotation):
        return value
    kind = str(annotation)
    try:
        if value.lower() in ("none", "null") and "None" in kind:
            return None
        if kind.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("dict"):  # JSON, else a YAML flow mapping as a config file writes it
            import yaml

            try:
                mapping = json.loads(value)
            except json.JSONDecodeError:
                try:
                    mapping = yaml.safe_load(value)
                except yaml.YAMLError as exc:
                    raise ValueError(str(exc)) from None
            if not isinstance(mapping, dict):
                raise ValueError(value)
            return mapping
    except ValueError as exc:
        example = " (a mapping, e.g. '{distribution: prosqa}')" if kind.startswith("dict") else ""
        raise TrainingError(f"{source}: {key}={value!r} is not a valid {kind}{example}") from exc
    return value


def check_resume_config(latest: Path, state: dict, cfg: "TrainConfig") -> None:
    """Refuse to resume checkpoint `latest` (its `trainer_state.json` read as `state`) with a config
    that changes the run: a TrainingError listing each differing key with both values."""
    saved = state.get("config", {})  # checkpoints written before the run config was recorded: {}
    if not isinstance(saved, dict):
        raise TrainingError(f"{latest / 'trainer_state.json'}: 'config' must be an object, got {type(saved).__name__}")
    defaults = dataclasses.asdict(TrainConfig())  # normalised as a run's own config is
    working_dir = state.get("working_dir")
    changed = config_changes(saved, dataclasses.asdict(cfg), defaults,
                             saved_dir=working_dir if isinstance(working_dir, str) else None)
    if changed:
        diffs = "; ".join(f"{k}: {saved[k]!r} -> {getattr(cfg, k)!r}" if k in saved else
                          f"{k}: not recorded (the default {defaults[k]!r}) -> {getattr(cfg, k)!r}"
                          for k in changed)
        raise TrainingError(f"{latest}: resume with a config that changes the run ({diffs}); only "
                            f"{', '.join(sorted(SAFE_RESUME_KEYS))} may change on resume")


# -- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(decoder, tokenizer, tokens: SpecialTokens, records: list[Record], stage: int, rules: StageRules,
             max_new_tokens: int = 128, page_size: int = 16, progress: bool = False,
             thought_transform: ThoughtTransform | None = None, num_thoughts: int | str | None = None,
             max_thoughts: int = 8, eot_threshold: float = 0.5, return_thoughts: bool = False) -> dict:
    """Batched generation at a stage scored as the official eval (`metrics.py`): answer exact match
    ("accuracy"), CoT exact match ("cot_accuracy"), generated tokens and thoughts per answer, and
    each question's generation. The decoder runs in eval mode (no dropout).

    `num_thoughts` replaces the stage's thought count for every question (an integer, or "auto" for
    adaptive thinking with `max_thoughts` and `eot_threshold`); `return_thoughts` adds each thought's
    inspection (`ThoughtTrace` fields) to the generations as `thought_traces`."""
    tokenized = [tokenize_record(r, tokenizer) for r in records]
    prompts, thoughts = [], []
    markers = rules.markers and rules.mode != "pause_as_thought"
    if num_thoughts is not None and not markers:
        raise TrainingError(f"evaluate: num_thoughts={num_thoughts!r} needs a mode with thoughts, not {rules.mode}")
    for rec in tokenized:
        prompt, k, _ = eval_prompt(rec, stage, rules, tokens)
        prompts.append(prompt)
        thoughts.append(k if num_thoughts is None else num_thoughts)
    most = max(k if isinstance(k, int) else max_thoughts for k in thoughts)
    longest = max(len(p) for p in prompts) + most + 2 + max_new_tokens
    pages = min(4096, max(len(prompts) * -(-longest // page_size), -(-longest // page_size)))
    generator = Generator(decoder, tokenizer, max_pages=pages, page_size=page_size, special_tokens=tokens,
                          thought_transform=thought_transform)
    was_training = decoder.training
    decoder.eval()
    try:
        results = generator.generate(prompts, num_thoughts=thoughts, max_new_tokens=max_new_tokens,
                                     thought_markers=markers, progress=progress, max_thoughts=max_thoughts,
                                     eot_threshold=eot_threshold, return_thoughts=return_thoughts)
    finally:
        decoder.train(was_training)
    generations = []
    for rec, r in zip(records, results):
        k = r.num_thoughts  # the thoughts actually run (adaptive thinking decides them per question)
        score = score_generation(r.text or "", rec.answer, rec.steps, r.generated_tokens, k) if r.error is None \
            else GenerationScore(False, False, r.generated_tokens, k)
        generations.append({"question": rec.question, "answer": rec.answer, "output": r.text,
                            "correct": score.answer_correct, "cot_correct": score.cot_correct,
                            "generated_tokens": r.generated_tokens, "thoughts": k,
                            **({"error": r.error} if r.error is not None else {})})
        if return_thoughts:
            generations[-1]["thought_traces"] = [dataclasses.asdict(t) for t in r.thoughts or []]
    return summarise(generations)


def summarise(generations: list[dict]) -> dict:
    """The official eval's scores (`metrics.summarize`), failed requests and the generations themselves,
    from `evaluate`'s generation records (also after they were gathered from several ranks)."""
    scores = [GenerationScore(g["correct"], g["cot_correct"], g["generated_tokens"], g["thoughts"])
              for g in generations]
    return {
        **summarize(scores),
        "errors": [f"record {i}: {g['error']}" for i, g in enumerate(generations) if "error" in g],
        "generations": generations,
    }


@torch.no_grad()
def validation_loss_sum(model: CoconutModel, samples, batch_size: int, mode: str) -> tuple[float, int]:
    """(summed token cross-entropy, label count) of `samples`, `batch_size` at a time (no graph is built)."""
    total, count = 0.0, 0
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        total += float(model(chunk, mode=mode, reduction="sum"))
        count += sum(len(s.suffix) - 1 for s in chunk)
    return total, count


def validation_loss(model: CoconutModel, samples, batch_size: int, mode: str) -> float:
    """Mean token cross-entropy of `samples`."""
    total, count = validation_loss_sum(model, samples, batch_size, mode)
    return total / max(count, 1)


# -- the run ----------------------------------------------------------------------------------------

class Trainer:
    """One training run (see the module docstring); `run()` trains, evaluates and checkpoints."""

    def __init__(self, config: TrainConfig):
        self.cfg = config
        self.env = DistEnv.from_environment()
        self.out = Path(config.save_dir)
        self.device = self.env.start(config.device)  # before anything touches CUDA
        self.rules = config.rules()
        self.history: list[dict] = []
        self.host_memory = HostMemoryGuard()
        self.epochs_done = 0
        self.global_step = 0
        self._setup()

    # -- set-up -------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        check_tracker(cfg.log_with)  # on every rank, before any collective (the tracker itself: rank 0)
        check_backend_runs(cfg.attention_backend, self.device, "attention_backend", TrainingError)  # before any write
        torch.manual_seed(cfg.seed)
        if self.env.is_main:
            prepare_save_dir(cfg, TrainingError)
            remove_stale_tmp(self.out)
        self.env.barrier()
        train_path, val_path = self._data_paths()
        self.train_records = load_records(train_path)[: cfg.train_limit]
        all_val_records = load_records(val_path)
        self.val_records = all_val_records[: cfg.val_limit or cfg.max_eval_questions]
        self._held_out_questions = frozenset(r.question for r in all_val_records)
        self._epoch_draw: tuple[int, list] | None = None  # (epoch, its tokenized records): task_fresh_each_epoch
        latest = checkpoint_dirs(self.out)[-1] if cfg.resume and checkpoint_dirs(self.out) else None
        if cfg.resume and latest is None and self.env.is_main:
            print(f"resume: no complete checkpoint under {self.out}; starting from the beginning")
        if latest is not None:
            decoder, tokenizer, tokens, info, state = load_checkpoint(latest, device=self.device,
                                                                      attention_backend=cfg.attention_backend)
            if info.get("mode") != cfg.mode:
                raise TrainingError(f"{latest}: trained in mode {info.get('mode')!r}, config says {cfg.mode!r}")
            transform = checkpoint_thought_transform(latest, info, decoder)
            if transform.kind != cfg.thought_transform:
                raise TrainingError(f"{latest}: trained with thought_transform {transform.kind!r}, config says "
                                    f"{cfg.thought_transform!r}")
            check_resume_config(latest, state, cfg)
            try:
                self.epochs_done, self.global_step = int(state["epochs_done"]), int(state["global_step"])
                self.history = list(state["history"])
            except (KeyError, TypeError, ValueError) as exc:
                raise TrainingError(f"{latest / 'trainer_state.json'}: cannot resume from it ({exc!r})") from exc
            self.resumed_from = latest
            if self.env.is_main:  # a process stopped between a checkpoint and its metrics left them behind
                self._write_metrics()
        else:
            decoder, tokenizer, tokens = self._fresh_model()
            transform = build_thought_transform(cfg.thought_transform, decoder.embed_tokens.weight)
            self.resumed_from = None
        if cfg.dropout is not None:
            decoder.dropout = DropoutRates(cfg.dropout, cfg.dropout, cfg.dropout)
        self.decoder, self.tokenizer, self.tokens = decoder, tokenizer, tokens
        self.model = CoconutModel(decoder, tokens, page_size=cfg.page_size, thought_transform=transform)
        # every rank starts from rank 0's weights; under FSDP the decoder's parameters become shards
        self.train_model = wrap_for_training(self.model, cfg.parallel, self.env, self.device, cfg.bf16)
        self.train_tok = [tokenize_record(r, tokenizer) for r in self.train_records]
        self.val_tok = [tokenize_record(r, tokenizer) for r in self.val_records]
        self.max_length = cfg.max_length or decoder.config.max_position_embeddings
        self.train_records, self.train_tok = self._fit_positions(train_path, self.train_records, self.train_tok, None)
        self.val_records, self.val_tok = self._fit_positions(val_path, self.val_records, self.val_tok,
                                                             cfg.max_new_tokens())
        self.tracker = make_tracker(cfg.log_with, self.out) if self.env.is_main else None
        # fresh draws hold at most task_train_size records (fewer where held-out or long ones are dropped)
        per_epoch = (min(cfg.task_train_size, cfg.train_limit or cfg.task_train_size) if cfg.task_fresh_each_epoch
                     else len(self.train_tok))
        self.schedule = cfg.lr_scheduler(cfg.num_epochs * math.ceil(per_epoch / cfg.batch_size))
        self.optimizer = self._new_optimizer()
        if latest is not None and not self._resets_optimizer_at(self.epochs_done):
            if is_fsdp(self.train_model):
                load_gathered_optimizer_state(self.train_model, self.optimizer, read_optimizer_state(latest))
            else:
                load_optimizer_state(latest, self.optimizer)

    def _fit_positions(self, path: Path | str, records: list[Record], tokenized: list, eval_new_tokens: int | None,
                       drop: bool | None = None):
        """Records whose samples (and evaluation) fit in `max_length` positions (default: the model's): a
        longer one is an error naming it, or with `drop` (default `drop_long_records`) is dropped and counted."""
        drop = self.cfg.drop_long_records if drop is None else drop
        limit = self.max_length
        what = f"max_length={limit}" if self.cfg.max_length else f"the model's max_position_embeddings={limit}"
        need = [positions_needed(rec, self.rules, self.tokens, eval_new_tokens) for rec in tokenized]
        too_long = [i for i, n in enumerate(need) if n > limit]
        if not too_long:
            return records, tokenized
        first = too_long[0]
        if not drop:
            by_eval = (eval_new_tokens is not None
                       and positions_needed(tokenized[first], self.rules, self.tokens) <= limit)
            why = f" (its evaluation prompt and thoughts + eval_max_new_tokens={eval_new_tokens})" if by_eval else ""
            raise TrainingError(f"{path}: record {first} needs {need[first]} positions{why}, more than {what} "
                                f"({len(too_long)} record(s) too long; drop_long_records: true drops them)")
        if len(too_long) == len(records):
            raise TrainingError(f"{path}: every record needs more than {what} positions")
        if self.env.is_main:
            print(f"{path}: dropped {len(too_long)} of {len(records)} records longer than {limit} positions "
                  f"(first: record {first}, {need[first]} positions)", flush=True)
        dropped = set(too_long)
        return ([r for i, r in enumerate(records) if i not in dropped],
                [t for i, t in enumerate(tokenized) if i not in dropped])

    def _data_paths(self) -> tuple[Path, Path]:
        cfg = self.cfg
        if cfg.train_path is not None:
            return Path(cfg.train_path), Path(cfg.val_path)
        data = self.out / "data"
        train, val = data / "train.json", data / "val.json"
        if self.env.is_main and not (train.is_file() and val.is_file()):
            data.mkdir(parents=True, exist_ok=True)
            records = self._generate_task(cfg.task_train_size + cfg.task_val_size, cfg.task_seed)
            _atomic_json(val, records[: cfg.task_val_size])
            _atomic_json(train, records[cfg.task_val_size:])
        self.env.barrier()
        return train, val

    def _generate_task(self, count: int, seed: int) -> list[dict]:
        """`count` records of the built-in task (`task_config`) drawn with `seed`."""
        from .tasks import ProsQAConfig, generate_prosqa

        return generate_prosqa(count, ProsQAConfig(**(self.cfg.task_config or {})), seed=seed)

    def _fresh_model(self):
        cfg = self.cfg
        from .loader import load_model, load_tokenizer

        if cfg.model.startswith("builtin:"):
            name = cfg.model[len("builtin:"):]
            if name not in BUILTIN_MODELS:
                raise TrainingError(f"config: unknown builtin model {name!r} (known: {', '.join(BUILTIN_MODELS)})")
            tokenizer = self._task_tokenizer() if cfg.tokenizer is None else load_tokenizer(cfg.tokenizer)
            from .config import ModelConfig

            spec = {"model_type": "gpt2", "vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id,
                    "bos_token_id": tokenizer.eos_token_id, **BUILTIN_MODELS[name]}
            torch.manual_seed(cfg.seed)
            with torch.device(self.device):
                decoder = Decoder(ModelConfig.from_dict(spec, source=f"builtin:{name}"),
                                  attention_backend=cfg.attention_backend)
            _init_weights(decoder)
        else:
            decoder = load_model(cfg.model, device=self.device, attention_backend=cfg.attention_backend)
            tokenizer = load_tokenizer(cfg.tokenizer or cfg.model)
        tokens = add_special_tokens(decoder, tokenizer)
        return decoder, tokenizer, tokens

    def _task_tokenizer(self):
        from .loader import load_tokenizer
        from .tasks import train_task_tokenizer

        path = self.out / "tokenizer"
        if self.env.is_main and not (path / "tokenizer.json").is_file():
            texts = [r.question + "\n" + "\n".join(r.steps) + "\n### " + r.answer for r in self.train_records]
            train_task_tokenizer(texts, path, vocab_size=1024)
        self.env.barrier()
        return load_tokenizer(path)

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

    def _resets_optimizer_at(self, epoch: int) -> bool:
        """Whether `epoch` starts with a fresh optimizer: every epoch (reset_optimizer true, as the official
        loop), at stage switches ("stage"), or never (false)."""
        policy = self.cfg.reset_optimizer
        if policy == "stage":
            return epoch > 0 and self.cfg.stage_of(epoch) != self.cfg.stage_of(epoch - 1)
        return bool(policy) and epoch > 0

    # -- training -----------------------------------------------------------------------------------

    def epoch_samples(self, epoch: int):
        """The epoch's samples in training order (deterministic: a resumed run sees the same)."""
        rng = random.Random(f"{self.cfg.seed}-{epoch}")
        stage = self.cfg.stage_of(epoch)
        samples = [build_sample(rec, stage, self.rules, self.tokens, rng) for rec in self.epoch_records(epoch)]
        rng.shuffle(samples)
        return samples

    def epoch_records(self, epoch: int) -> list[TokenizedRecord]:
        """The tokenized records an epoch trains on: the run's training set, or with
        `task_fresh_each_epoch` a new draw of the built-in task for every epoch after the first (seeded by
        `task_seed` and the epoch, so a resumed run draws the same questions), without any question
        identical to a held-out one and without those longer than `max_length` (dropped and counted: a
        draw has no file to fix). New questions every epoch: a small model learns the task, not the set."""
        cfg = self.cfg
        if not cfg.task_fresh_each_epoch or epoch == 0:
            return self.train_tok
        if self._epoch_draw is None or self._epoch_draw[0] != epoch:
            drawn = self._generate_task(cfg.task_train_size, _task_draw_seed(cfg.task_seed, epoch))
            records = [Record(d["question"], tuple(d["steps"]), d["answer"]) for d in drawn
                       if d["question"] not in self._held_out_questions][: cfg.train_limit]
            if not records:
                raise TrainingError(f"epoch {epoch + 1}: every question of the fresh draw is a held-out question; "
                                    "the task has too few distinct questions for task_fresh_each_epoch")
            tokenized = [tokenize_record(r, self.tokenizer) for r in records]
            label = f"the built-in task's draw for epoch {epoch + 1} (task_seed {cfg.task_seed})"
            self._epoch_draw = (epoch, self._fit_positions(label, records, tokenized, None, drop=True)[1])
        return self._epoch_draw[1]

    def run(self) -> list[dict]:
        """Train the remaining epochs; returns the per-epoch metrics."""
        cfg = self.cfg
        for epoch in range(self.epochs_done, cfg.num_epochs):
            if self._resets_optimizer_at(epoch):
                self.optimizer = self._new_optimizer()
            # dropout masks drawn from a stream of (seed, epoch, rank): a resumed run draws the same ones, and
            # the ranks (each training other samples) draw independent masks, not one rank's masks N times
            torch.manual_seed(_epoch_seed(cfg.seed, epoch, self.env.rank))
            started = time.perf_counter()
            train_loss = self._train_epoch(epoch)
            whole = self._whole_model()
            self._check_finite_weights(epoch, whole)
            metrics = {"epoch": epoch + 1, "stage": cfg.stage_of(epoch), "train_loss": train_loss,
                       "train_seconds": time.perf_counter() - started}
            metrics.update(self._evaluate(epoch, whole))
            self._release_host_memory()
            if not math.isfinite(metrics["val_loss"]):
                raise TrainingError(f"validation loss is {metrics['val_loss']} after epoch {epoch + 1}: not "
                                    f"saved; {self._last_good()}")
            best_so_far = max((m["accuracy"] for m in self.history), default=0.0)
            save = not cfg.save_only_improve or metrics["accuracy"] > best_so_far  # the official rule
            metrics["checkpoint"] = checkpoint_name(epoch + 1) if save else None
            self.history.append(metrics)
            if save:
                self._save(epoch + 1, whole)
            if self.env.is_main:
                self._write_metrics()
                self._log(metrics)
                if self.tracker is not None:
                    self.tracker.log_epoch(metrics)
            self.epochs_done = epoch + 1
            self.env.barrier()
        if self.tracker is not None:
            self.tracker.close()
        return self.history

    def _train_epoch(self, epoch: int) -> float:
        cfg, env = self.cfg, self.env
        samples = self.epoch_samples(epoch)
        steps = math.ceil(len(samples) / cfg.batch_size)
        bar = None
        if cfg.progress and env.is_main:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.num_epochs} stage {cfg.stage_of(epoch)}",
                       unit="step", leave=False, disable=None)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16)
        scale = env.gradient_scale()
        epoch_loss, epoch_labels = 0.0, 0
        self.decoder.train()
        for (batch,) in batches(samples, cfg.batch_size):
            labels = sum(len(s.suffix) - 1 for s in batch)
            loss_sum = torch.zeros((), device=self.device)
            micros = self._micro_batches(batch)
            for i, (micro, weight, thought_steps) in enumerate(micros):
                with gradient_sync(self.train_model, i == len(micros) - 1):
                    with autocast:
                        loss = self.train_model(micro, mode=cfg.forward_mode, reduction="sum",
                                                eot_loss_weight=cfg.eot_loss_weight, thought_steps=thought_steps)
                    (loss * (weight * scale) / labels).backward()
                loss_sum += loss.detach().float() * weight
                # the graph's nodes hold the training pool's views: release them before the next forward,
                # which may replace that pool
                del loss
            env.sum_(loss_sum)
            batch_loss = float(loss_sum) / labels
            if not math.isfinite(batch_loss):
                raise TrainingError(
                    f"loss is {batch_loss} at epoch {epoch + 1}, step {self.global_step + 1}: training stopped; "
                    f"{self._last_good()}")
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise TrainingError(f"gradient norm is {grad_norm} at epoch {epoch + 1}, step {self.global_step + 1}: "
                                    f"training stopped before the update; {self._last_good()}")
            for group in self.optimizer.param_groups:
                group["lr"] = self.schedule.lr_at(self.global_step)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self._release_host_memory()
            if self.tracker is not None:
                self.tracker.log_step(self.global_step, batch_loss, self.optimizer.param_groups[0]["lr"])
            self.global_step += 1
            epoch_loss += float(loss_sum)
            epoch_labels += labels
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{batch_loss:.3f}")
        if bar is not None:
            bar.close()
        return epoch_loss / max(epoch_labels, 1)

    def _release_host_memory(self) -> None:
        """On CPU, after a step or an evaluation, return the heap's free pages once resident memory has
        grown: ragged steps free tensors of new sizes every time, and the heap grows step by step
        (host_memory.py)."""
        if self.device.type == "cpu":
            self.host_memory.check()

    def _last_good(self) -> str:
        last = checkpoint_dirs(self.out)
        return f"the last good checkpoint is {last[-1] if last else 'none (nothing was saved yet)'}"

    def _check_finite_weights(self, epoch: int, whole: CoconutModel) -> None:
        """Stop before a checkpoint is written if the epoch left a NaN or Inf in the whole model's
        weights or in its thought transform's parameters (saved with them)."""
        transform = [(f"thought_transform.{name}", p) for name, p in whole.thought_transform.named_parameters()]
        bad = first_non_finite([*whole.decoder.named_parameters(), *transform])
        if bad is not None:
            raise TrainingError(f"parameter {bad} holds NaN or Inf after epoch {epoch + 1}: not saved; "
                                f"{self._last_good()}")

    def _micro_batches(self, batch: list) -> list[tuple[list, float, int | None]]:
        """This rank's share of a global batch as (micro-batch, loss weight, thought steps) triples.

        A rank whose share is empty (fewer samples than ranks) runs the batch's first sample with
        weight 0: DDP and FSDP need every rank's forward and backward. Under FSDP every rank also
        runs as many micro-batches and, in each, as many thought steps as the longest chain on any
        rank (each block call all-gathers; `distributed.py`): the ranks with fewer micro-batches are
        padded the same way. Thought steps are None otherwise (the batch's own).
        """
        env = self.env
        share = batch[env.rank :: env.world_size]
        micros = [(m, 1.0) for m in _split(share, self.cfg.gradient_accumulation_steps, self.cfg.max_batch_tokens)]
        fsdp = is_fsdp(self.train_model)
        count = len(micros)
        if fsdp:
            count = int(env.max_(torch.tensor(count, device=self.device)))
        micros += [(batch[:1], 0.0)] * (max(count, 1) - len(micros))
        steps = agreed_thought_steps([m for m, _ in micros], env, self.device) if fsdp else [None] * len(micros)
        return [(m, w, n) for (m, w), n in zip(micros, steps)]

    def _whole_model(self) -> CoconutModel:
        """The model with whole parameters for evaluation and checkpoints: itself, or under FSDP a
        replica (decoder and thought transform) loaded from the gathered shards (collective)."""
        if not is_fsdp(self.train_model):
            return self.model
        state = full_state_dict(self.train_model)

        def part(prefix: str) -> dict:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}

        with torch.device(self.device):
            decoder = Decoder(self.decoder.config, attention_backend=self.decoder.attention_backend)
        decoder.load_state_dict(part("decoder."))
        transform = build_thought_transform(self.model.thought_transform.kind, decoder.embed_tokens.weight)
        transform.load_state_dict(part("thought_transform."))
        return CoconutModel(decoder, self.tokens, self.cfg.page_size, thought_transform=transform)

    def _evaluate(self, epoch: int, model: CoconutModel) -> dict:
        """Accuracy and validation loss of `model` (whole parameters), each rank evaluating every
        world_size-th question."""
        env, stage = self.env, self.cfg.stage_of(epoch)
        decoder, transform = model.decoder, model.thought_transform
        decoder.eval()
        records = self.val_records[env.rank :: env.world_size]
        generations = []
        if records:
            generations = evaluate(decoder, self.tokenizer, self.tokens, records, stage, self.rules,
                                   self.cfg.max_new_tokens(), self.cfg.page_size,
                                   thought_transform=transform)["generations"]
        val_samples = [build_sample(rec, stage, self.rules, self.tokens) for rec in self.val_tok[env.rank :: env.world_size]]
        loss_and_count = validation_loss_sum(model, val_samples, self.cfg.batch_size, self.cfg.forward_mode)
        decoder.train()
        shares = env.gather((generations, loss_and_count))
        ordered = [None] * len(self.val_records)
        for rank, (share, _) in enumerate(shares):
            ordered[rank :: env.world_size] = share
        result = summarise(ordered)
        self.last_generations = result.pop("generations")
        errors = result.pop("errors")
        if errors:
            raise TrainingError(f"evaluation after epoch {epoch + 1}: {len(errors)} request(s) failed, first: {errors[0]}")
        result["val_loss"] = sum(t for _, (t, _) in shares) / max(sum(c for _, (_, c) in shares), 1)
        return result

    def coconut_info(self, stage: int) -> dict:
        r = self.rules
        return {"mode": r.mode, "c_thought": r.c_thought, "max_latent_stage": r.max_latent_stage,
                "pad_latent_to_max": r.pad_latent_to_max, "stage": stage}

    @property
    def best_checkpoint(self) -> str | None:
        """Name of the saved checkpoint with the highest validation accuracy (the earliest on ties)."""
        saved = [m for m in self.history if m.get("checkpoint")]
        return max(saved, key=lambda m: m["accuracy"])["checkpoint"] if saved else None

    def _save(self, epochs_done: int, model: CoconutModel) -> None:
        """Rank 0 writes `model` (whole parameters) and the optimizer state to a checkpoint (under FSDP the
        others help gather the optimizer state); the best checkpoint so far is never rotated away."""
        optimizer = self.optimizer
        if is_fsdp(self.train_model):
            optimizer = StateDictView(gathered_optimizer_state(self.train_model, self.optimizer))
        if not self.env.is_main:
            return
        best = self.best_checkpoint
        state = {"epochs_done": epochs_done, "global_step": self.global_step, "history": self.history,
                 "best_checkpoint": best, "config": dataclasses.asdict(self.cfg),
                 "working_dir": os.getcwd()}  # what the config's relative paths were relative to
        save_checkpoint(self.out, epochs_done, model.decoder, self.tokenizer, self.tokens,
                        self.coconut_info(self.cfg.stage_of(epochs_done - 1)), optimizer, state,
                        keep_last=self.cfg.keep_checkpoints, keep=[best] if best else [],
                        thought_transform=model.thought_transform)

    def _write_metrics(self) -> None:
        """metrics.jsonl (one line per epoch; `is_best` marks the best checkpoint's) and the chart."""
        best = self.best_checkpoint
        lines = [json.dumps({**m, "is_best": m.get("checkpoint") is not None and m["checkpoint"] == best}) + "\n"
                 for m in self.history]
        self.out.mkdir(parents=True, exist_ok=True)
        _atomic_text(self.out / "metrics.jsonl", "".join(lines))
        from .plots import plot_history

        plot_history(self.history, self.out / "training.png", title=self.cfg.name)

    def _log(self, m: dict) -> None:
        if self.cfg.progress:
            print(f"[{self.cfg.name}] epoch {m['epoch']} stage {m['stage']}: train loss {m['train_loss']:.4f}, "
                  f"val loss {m['val_loss']:.4f}, accuracy {m['accuracy']:.3f}, "
                  f"{m['tokens_per_answer']:.1f} tokens/answer ({m['train_seconds']:.0f}s)", flush=True)


def _split(samples: list, parts: int, max_tokens: int | None) -> list[list]:
    """A rank's share of a batch as micro-batches: `parts` even chunks, each within the token budget."""
    if not samples:
        return []
    size = math.ceil(len(samples) / parts)
    chunks = [samples[i : i + size] for i in range(0, len(samples), size)]
    if max_tokens is None:
        return chunks
    return [micro for chunk in chunks for micro in next(batches(chunk, len(chunk), max_tokens))]


def _init_weights(decoder) -> None:
    """GPT-2 initialisation: normal(0, 0.02) weights, zero biases, unit norms."""
    with torch.no_grad():
        for name, p in decoder.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)


def _task_draw_seed(task_seed: int, epoch: int) -> int:
    """The generator seed of an epoch's fresh draw: a hash, so that no (task_seed, epoch) pair draws another
    run's held-out set or another epoch's questions."""
    digest = hashlib.sha256(f"coconut-engine task draw {task_seed} {epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    """The torch seed of an epoch on a rank (rank 0: the one-process run's)."""
    return (seed * 1_000_003 + epoch + rank * 0x9E3779B97F4A7C15) % (2**63)


def _atomic_json(path: Path, value) -> None:
    _atomic_text(path, json.dumps(value))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(config: TrainConfig) -> list[dict]:
    """Run a training job; returns the per-epoch metrics (rank 0)."""
    return Trainer(config).run()
