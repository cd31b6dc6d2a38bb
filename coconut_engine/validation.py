"""Checks of user-supplied values that several modules share: each failure names the value's key.

Every check raises the error type its caller passes (InvalidArgumentError by default), so a config
key fails as the config's error type and a function argument as InvalidArgumentError.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path

import torch

from .errors import InvalidArgumentError


def is_integer(value) -> bool:
    """True for ints (Python or numpy), False for bools, floats and everything else."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_int(value, name: str, minimum: int | None = None, error=InvalidArgumentError) -> int:
    """`value` as an int; an error naming `name` unless it is an integer >= `minimum`."""
    if not is_integer(value):
        raise error(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_float(value, name: str, minimum: float | None = None, maximum: float | None = None,
                min_exclusive: bool = False, error=InvalidArgumentError) -> float:
    """`value` as a finite float within [minimum, maximum] (minimum excluded if `min_exclusive`)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise error(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise error(f"{name} must be finite, got {value}")
    if minimum is not None and (value <= minimum if min_exclusive else value < minimum):
        raise error(f"{name} must be {'>' if min_exclusive else '>='} {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise error(f"{name} must be <= {maximum}, got {value}")
    return value


def check_device(value: str, name: str, error=InvalidArgumentError) -> torch.device:
    """`value` as a torch device this machine has; an error naming `name` otherwise (the engine is
    tested on cpu and cuda; other types torch has a backend module for are checked the same way)."""
    try:
        device = torch.device(value)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise error(f"{name} {value!r} is not a torch device ({exc})") from None
    if device.type == "meta":
        raise error(f"{name} {value!r}: a meta device holds no data to compute with (use cpu or cuda)")
    backend = getattr(torch, device.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
    label = "CUDA" if device.type == "cuda" else device.type
    if callable(getattr(backend, "is_available", None)) and not backend.is_available():
        raise error(f"{name} {value!r}: {label} is not available on this machine")
    count = getattr(backend, "device_count", None)
    if device.type != "cpu" and device.index is not None and callable(count) and device.index >= count():
        raise error(f"{name} {value!r}: this machine has {count()} {label} device(s)")
    return device


def check_sampling(temperature, top_k, top_p, max_new_tokens, n, seed) -> None:
    """The sampling and stopping arguments of a generate call, checked before any work starts."""
    check_float(temperature, "temperature", minimum=0.0)
    check_int(top_k, "top_k", minimum=0)
    check_float(top_p, "top_p", minimum=0.0, maximum=1.0, min_exclusive=True)
    check_int(max_new_tokens, "max_new_tokens", minimum=1)
    check_int(n, "n", minimum=1)
    check_int(seed, "seed")


def first_non_finite(named_tensors) -> str | None:
    """The name of the first tensor with a NaN or Inf among (name, tensor) pairs, or None.

    One reduction per tensor, read back once at the end: a single host-device sync.
    """
    named = [(name, t) for name, t in named_tensors if t.is_floating_point()]
    if not named:
        return None
    bad = torch.stack([~torch.isfinite(t.detach()).all() for _, t in named]).cpu()
    hits = bad.nonzero()
    return named[int(hits[0])][0] if len(hits) else None


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode text (a lone surrogate, from undecodable bytes, which no tokenizer
    takes), or None where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"{exc.reason} at {exc.start}"
    return None


def check_not_an_input(output, name: str, others: dict, error=InvalidArgumentError) -> None:
    """Refuse to write `output` (the argument `name`) where it is the same file as one of `others`
    ({argument: path}, None paths skipped): the inputs and outputs it must not replace. Opening it
    for writing would empty that file before anything is read or run."""
    if output is None:
        return
    out = Path(output)
    for other_name, other in others.items():
        if other is None:
            continue
        other = Path(other)
        try:
            same = os.path.samefile(out, other) if out.exists() and other.exists() else out.resolve() == other.resolve()
        except OSError:
            same = False
        if same:
            raise error(f"{name} {output} is the same file as {other_name} {other}: writing it would destroy "
                        "that; pick another file")
