"""Training checkpoints: written whole or not at all, found again after a crash.

A checkpoint is a directory `checkpoint-NNNN` (NNNN = epochs completed) holding the model in the
Hugging Face layout (so transformers loads it), the tokenizer, `coconut.json` (special token ids,
curriculum settings and the thought transform: what `coconut-engine eval` needs), the thought
transform's parameters (`thought_transform.safetensors`, for the variants that have any), `optimizer.pt` (tensors only, loaded
with weights_only=True) and `trainer_state.json`, written last. It is assembled in a temporary
directory and renamed into place, so a kill while writing leaves the previous checkpoint intact.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

import torch

from .coconut import SpecialTokens
from .errors import CheckpointError
from .loader import load_model, load_tokenizer, save_model
from .validation import is_integer
from .thoughts import COCONUT_KEY, ThoughtTransform, load_thought_transform, save_thought_transform

STATE_FILE = "trainer_state.json"
COCONUT_FILE = "coconut.json"
OPTIMIZER_FILE = "optimizer.pt"


def checkpoint_dirs(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first (temporary and half-written ones are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and p.name[len("checkpoint-"):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len("checkpoint-"):]))


def remove_stale_tmp(root: str | Path) -> list[Path]:
    """Remove temporary files and folders (`.NAME.tmp-PID`) that crashed processes left under `root`
    and its `data` folder; those of live processes stay. Returns what was removed."""
    removed = []
    for folder in (Path(root), Path(root) / "data"):
        for path in folder.glob(".*.tmp-*") if folder.is_dir() else ():
            pid = path.name.rsplit(".tmp-", 1)[-1]
            if not pid.isdigit() or _process_alive(int(pid)):
                continue
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def checkpoint_name(epochs_done: int) -> str:
    """The directory name of the checkpoint written after `epochs_done` epochs."""
    return f"checkpoint-{epochs_done:04d}"


def best_checkpoint(root: str | Path) -> Path | None:
    """The best checkpoint (by validation accuracy) that the newest checkpoint under `root` names."""
    found = checkpoint_dirs(root)
    if not found:
        return None
    name = json.loads((found[-1] / STATE_FILE).read_text()).get("best_checkpoint")
    return Path(root) / name if name and (Path(root) / name / STATE_FILE).is_file() else None


def save_checkpoint(root: str | Path, epochs_done: int, decoder, tokenizer, tokens: SpecialTokens, coconut_info: dict,
                    optimizer: torch.optim.Optimizer | None, state: dict, keep_last: int = 2,
                    before_rename=None, keep: Iterable[str] = (),
                    thought_transform: ThoughtTransform | None = None) -> Path:
    """Write `checkpoint-{epochs_done}` atomically; keep the newest `keep_last` checkpoints and those
    named in `keep` (the best one), delete the others."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(root)
    final = root / checkpoint_name(epochs_done)
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(decoder, tmp)
    tokenizer.save_pretrained(tmp)
    info = {"special_tokens": asdict(tokens), **coconut_info}
    if thought_transform is not None:
        info[COCONUT_KEY] = save_thought_transform(thought_transform, tmp)
    (tmp / COCONUT_FILE).write_text(json.dumps(info, indent=2))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    if before_rename is not None:  # a test hook: simulate a crash after writing, before publishing
        before_rename(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    kept = set(keep)
    for old in checkpoint_dirs(root)[:-keep_last] if keep_last > 0 else []:
        if old.name not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_coconut_info(path: str | Path) -> tuple[SpecialTokens, dict]:
    """Special tokens and curriculum settings of a checkpoint (or a model directory trained elsewhere)."""
    path = Path(path) / COCONUT_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} not found: the model directory has no Coconut special tokens "
                              "(train it with coconut-engine, or add coconut.json with 'special_tokens')")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        tokens = SpecialTokens(**info.pop("special_tokens"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: malformed ({exc})") from exc
    ids = asdict(tokens)
    clashes = sorted({f"{a} and {b}" for a in ids for b in ids if a < b and ids[a] == ids[b] and is_integer(ids[a])})
    if clashes:  # <bot> = <eot> would end every thought as it began
        raise CheckpointError(f"{path}: special_tokens {', '.join(clashes)} have the same id; each needs its own token")
    for key, kind in _INFO_FIELDS.items():  # optional (a model trained elsewhere has only the tokens)
        value = info.get(key)
        ok = isinstance(value, str) if kind is str else isinstance(value, bool) if kind is bool else \
            is_integer(value) and value >= 0
        if key in info and not ok:
            want = {str: "a string", bool: "true or false"}.get(kind, "an integer >= 0")
            raise CheckpointError(f"{path}: {key} must be {want}, got {value!r}")
    return tokens, info


# The curriculum settings of coconut.json and their types (int: an integer >= 0).
_INFO_FIELDS = {"mode": str, "c_thought": int, "max_latent_stage": int, "pad_latent_to_max": bool, "stage": int}


def coconut_rules(path: str | Path, info: dict):
    """The StageRules and stage a checkpoint was trained with (its coconut.json), for evaluation."""
    from .data import StageRules

    missing = [key for key in _INFO_FIELDS if key not in info]
    if missing:
        raise CheckpointError(f"{Path(path) / COCONUT_FILE} lacks {', '.join(missing)} (needed to evaluate)")
    try:
        rules = StageRules(info["c_thought"], info["max_latent_stage"], info["pad_latent_to_max"], 0.0, info["mode"])
    except ValueError as exc:  # DataError: an inconsistent curriculum
        raise CheckpointError(f"{Path(path) / COCONUT_FILE}: {exc}") from exc
    return rules, info["stage"]


def load_checkpoint(path: str | Path, device="cpu", attention_backend: str = "auto"):
    """(decoder, tokenizer, special tokens, coconut info, trainer state) of one checkpoint."""
    path = Path(path)
    decoder = load_model(path, device=device, attention_backend=attention_backend)
    tokenizer = load_tokenizer(path)
    tokens, info = read_coconut_info(path)
    vocab = decoder.config.vocab_size
    for name, token_id in asdict(tokens).items():
        if not is_integer(token_id) or not 0 <= token_id < vocab:
            raise CheckpointError(f"{path / COCONUT_FILE}: special token {name}={token_id!r} is outside the "
                                  f"model's vocabulary of {vocab}")
    return decoder, tokenizer, tokens, info, read_trainer_state(path)


def read_trainer_state(path: str | Path) -> dict:
    """A checkpoint's `trainer_state.json` ({} where it has none); a clear error naming the file if it is
    not a JSON object."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return {}
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: not valid JSON ({exc})") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: expected a JSON object")
    return state


def checkpoint_thought_transform(path: str | Path, info: dict, decoder) -> ThoughtTransform:
    """The thought transform a checkpoint was trained with (`coconut.json` names it; identity when it
    names none), on the decoder's device and dtype."""
    return load_thought_transform(path, info.get(COCONUT_KEY), decoder.embed_tokens.weight)


def read_optimizer_state(path: str | Path) -> dict:
    """The optimizer state dict saved in checkpoint `path` (on the CPU)."""
    file = Path(path) / OPTIMIZER_FILE
    if not file.is_file():
        raise CheckpointError(f"{file} not found: cannot resume the optimizer")
    return torch.load(file, weights_only=True, map_location="cpu")


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer) -> None:
    optimizer.load_state_dict(read_optimizer_state(path))
