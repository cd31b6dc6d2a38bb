"""What a training run checks before it starts: config types and ranges (by key), the save folder
(never mix two runs), and on resume which config keys may differ from the checkpoint's run."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import shutil
from pathlib import Path

from .attention import resolve_backend
from .validation import check_device, is_integer

# Keys whose change on resume does not change the weights the remaining epochs compute (up to float
# rounding): where files go and what is printed, how a step is split or computed, how much is
# evaluated, and more epochs. Any other difference is refused, naming the keys.
SAFE_RESUME_KEYS = frozenset({
    "name", "save_dir", "resume", "overwrite", "keep_checkpoints", "progress", "device", "attention_backend",
    "forward_mode", "gradient_accumulation_steps", "max_batch_tokens", "page_size", "num_epochs",
    "eval_max_new_tokens", "max_eval_questions", "parallel", "val_limit", "save_only_improve", "log_with",
})

_MIN = {  # integer keys: smallest allowed value
    "task_train_size": 1, "task_val_size": 1, "c_thought": 0, "epochs_per_stage": 1, "stage0_epochs": 0,
    "max_latent_stage": 0, "batch_size": 1, "gradient_accumulation_steps": 1, "max_batch_tokens": 1,
    "num_epochs": 1, "eval_max_new_tokens": 1, "max_eval_questions": 1, "keep_checkpoints": 0, "page_size": 1,
}
_FLOAT_RANGE = {  # float keys: (low, low excluded, high)
    # AdamW moves a weight by about lr a step: past 1e3 nothing trains, and near float32's limit the
    # step itself overflows inside torch (lr 1e38 ended in a RuntimeError traceback)
    "lr": (0.0, True, 1e3), "weight_decay": (0.0, False, None), "max_grad_norm": (0.0, True, None),
    "uniform_prob": (0.0, False, 1.0), "eot_loss_weight": (0.0, False, None),
}
ATTENTION_BACKENDS = ("auto", "torch", "triton")
# What a run writes into its save folder (an `overwrite` removes these, and only these): name pattern
# -> the files a folder of that name may hold (None: a file, or a folder of any content).
RUN_OUTPUTS = {
    r"checkpoint-\d+": None, r"\.checkpoint-\d+\.tmp-\d+": None, r"metrics\.jsonl": None, r"training\.png": None,
    r"\.(metrics\.jsonl|training\.png|tokenizer)\.tmp-\d+": None,
    "data": {"train.json", "val.json"}, "tokenizer": {"tokenizer.json", "tokenizer_config.json"},
}


def check_types_and_ranges(cfg, error) -> None:
    """Every field of a TrainConfig-like dataclass against its annotation and range; `error(msg)`
    is raised naming the key."""
    for f in dataclasses.fields(cfg):
        value, kinds = getattr(cfg, f.name), [k.strip() for k in str(f.type).split("|")]
        if value is None:
            if "None" not in kinds:
                raise error(f"{f.name} must be set (got null)")
            continue
        if not any(_matches(value, kind) for kind in kinds):
            want = " or ".join(k for k in kinds if k != "None")
            raise error(f"{f.name} must be {want}, got {type(value).__name__} {value!r}")
        if f.name in _MIN and value < _MIN[f.name]:
            raise error(f"{f.name} must be >= {_MIN[f.name]}, got {value}")
        if f.name in _FLOAT_RANGE:
            low, exclusive, high = _FLOAT_RANGE[f.name]
            if not math.isfinite(value) or (value <= low if exclusive else value < low) or (high and value > high):
                bound = f"{'>' if exclusive else '>='} {low}" + (f" and <= {high}" if high else "")
                raise error(f"{f.name} must be finite and {bound}, got {value}")
    if cfg.attention_backend not in ATTENTION_BACKENDS:
        raise error(f"attention_backend {cfg.attention_backend!r} is not one of {ATTENTION_BACKENDS}")
    if cfg.device is not None:
        check_device(cfg.device, "device", error)
    for key in ("train_path", "val_path"):
        path = getattr(cfg, key)
        if path is not None and _is_dir(path, key, error):
            raise error(f"{key} {path!r} is a folder; it must be an official-format JSON file")
    if not str(cfg.save_dir).strip():
        raise error("save_dir must not be empty")
    if not -2**63 <= cfg.seed < 2**64:  # what torch.manual_seed takes
        raise error(f"seed must be in [-2**63, 2**64), got {cfg.seed}")
    if cfg.task_config is not None:
        from .tasks import ProsQAConfig

        task_fields = {f.name: f for f in dataclasses.fields(ProsQAConfig)}
        for key, value in cfg.task_config.items():
            optional = key in task_fields and "None" in str(task_fields[key].type)
            numeric = key in task_fields and "int" in str(task_fields[key].type)  # `distribution` is ProsQAConfig's to check
            if numeric and not (value is None and optional) and not (is_integer(value) and value >= 0):
                raise error(f"task_config.{key} must be an integer >= 0{' or null' if optional else ''}, "
                            f"got {type(value).__name__} {value!r}")
        try:
            ProsQAConfig(**cfg.task_config)
        except (TypeError, ValueError) as exc:
            raise error(f"task_config {cfg.task_config!r}: {exc}") from exc


def _matches(value, kind: str) -> bool:
    if kind == "int":
        return is_integer(value)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "dict":
        return isinstance(value, dict)
    return False  # "None" (value is not None here) or a kind this check does not know


def _is_dir(path, key: str, error) -> bool:
    """Whether `path` is a folder; a name the system refuses (too long, invalid) is an error naming `key`."""
    try:
        return Path(path).is_dir()
    except (OSError, ValueError) as exc:
        name = str(path)
        raise error(f"{key} {name if len(name) <= 80 else name[:80] + '...'!r} is not a usable path ({exc})") from None


def config_changes(saved: dict, current: dict, defaults: dict | None = None, saved_dir: str | None = None) -> list[str]:
    """The keys that differ between a checkpoint's run config and this one and are not safe to change. A
    key the saved config lacks (added to the engine after that run) counts as its default from
    `defaults`, so a resume cannot switch a newer option on part-way; an empty saved config (a
    checkpoint from before configs were recorded) is compared with nothing. A path key names the same
    file if both name one file: the saved path read from `saved_dir`, the working directory of the run
    that saved it (None, for checkpoints that did not record it: only an absolute saved path is read)."""
    if not saved:
        return []
    known = {**(defaults or {}), **saved}
    return sorted(key for key in known.keys() & current.keys()
                  if key not in SAFE_RESUME_KEYS and not _same_setting(key, known[key], current[key], saved_dir))


# Config keys that name files: one file named another way (relative / absolute, through a link) is the same
PATH_KEYS = frozenset({"model", "tokenizer", "train_path", "val_path"})


def _same_setting(key: str, saved, current, saved_dir: str | None) -> bool:
    if saved == current:
        return True
    if key not in PATH_KEYS or not isinstance(saved, str) or not isinstance(current, str):
        return False
    if saved.startswith("builtin:") or current.startswith("builtin:"):
        return False  # a model name, not a path
    if not os.path.isabs(saved):
        if saved_dir is None:
            return False
        saved = os.path.join(saved_dir, saved)
    try:
        return os.path.samefile(saved, current)
    except OSError:  # either is missing: they differ
        return False


def check_backend_runs(backend: str, device, what: str, error) -> None:
    """Refuse, as `error` naming `what`, an attention backend this device cannot run: before a run
    writes into its folder or the main job clears its runs' folders."""
    try:
        resolve_backend(backend, device)
    except ValueError as exc:
        raise error(f"{what} {backend!r}: {exc}") from None


def prepare_save_dir(cfg, error) -> None:
    """Refuse a save folder that already holds something unless the run resumes it or overwrites it;
    with `overwrite`, remove the earlier run's outputs (checkpoints, metrics, generated data and
    tokenizer) and nothing else."""
    out = Path(cfg.save_dir)
    if not _is_dir(out, "save_dir", error) and out.exists():
        raise error(f"save_dir {out} exists and is not a folder")
    if cfg.resume or not out.is_dir() or not any(out.iterdir()):
        return
    if not cfg.overwrite:
        found = sorted(p.name for p in out.iterdir())
        raise error(f"save_dir {out} is not empty ({', '.join(found[:5])}{' ...' if len(found) > 5 else ''}): "
                    "set resume: true to continue that run, overwrite: true to replace it, or pick another folder")
    remove_paths(run_outputs(cfg, error))


def run_outputs(cfg, error) -> list[Path]:
    """What overwriting `cfg.save_dir` removes: the earlier run's outputs (checkpoints, metrics, generated
    data and tokenizer, except those the config reads from there). An error, before anything is
    removed, where a `data/` or `tokenizer/` to remove holds files a run does not write, or the save
    folder is a file."""
    out = Path(cfg.save_dir)
    if not _is_dir(out, "save_dir", error):
        if out.exists():
            raise error(f"save_dir {out} exists and is not a folder")
        return []
    keep = {"data"} if cfg.train_path is not None else set()
    keep |= {"tokenizer"} if cfg.tokenizer is not None else set()
    remove = []
    for path in sorted(out.iterdir()):
        pattern = next((p for p in RUN_OUTPUTS if re.fullmatch(p, path.name)), None)
        if pattern is None or path.name in keep:
            continue
        allowed = RUN_OUTPUTS[pattern]
        if allowed is not None:  # data/, tokenizer/: only if they hold nothing but what a run writes there
            foreign = sorted(p.name for p in path.iterdir() if p.name not in allowed and ".tmp-" not in p.name) \
                if path.is_dir() else [path.name]
            if foreign:
                raise error(f"save_dir {out}: overwrite would remove {path}, which holds files a run does not write "
                            f"({', '.join(foreign[:5])}); move them or pick another folder")
        remove.append(path)
    return remove


def remove_paths(paths: list[Path]) -> None:
    """Remove files and folders (a folder with everything in it)."""
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
