"""Generation requests from a JSONL file, and results handed on in request order as they finish.

Each line of a requests file is an object with "prompt" (used as is) or "question" (the official
Coconut format: followed by a newline), and optionally "num_thoughts": an integer >= 0, or "auto"
(adaptive thinking: think until p(<eot>) passes the command line's --eot-threshold or --max-thoughts
is reached). Other keys are not read (an official record's "answer", "steps", a "question_id"), but a
misspelling of these ("num_thought", "Prompt") is an error. Any other line is a DataError naming the
file, the line and the key.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .data import DataError
from .validation import is_integer


REQUEST_KEYS = ("prompt", "question", "num_thoughts")


@dataclass(frozen=True)
class PromptRequest:
    """One line of a requests file."""

    prompt: str
    num_thoughts: int | str | None = None  # an int, "auto", or None: the command line's count


def read_requests(path: str | Path) -> list[PromptRequest]:
    """Parse a JSONL requests file (see the module docstring)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, expected a JSONL file") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc})") from exc
    requests = []
    # split on "\n" only: str.splitlines also splits at U+2028, \x0c, \x85 ..., which a JSON string may hold
    for line_no, line in enumerate(text.split("\n"), 1):
        if line.strip():
            requests.append(_parse_line(line, f"{path}:{line_no}"))
    if not requests:
        raise DataError(f"{path}: no prompts")
    return requests


def _parse_line(line: str, where: str) -> PromptRequest:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as exc:  # RecursionError: nesting deeper than Python's stack
        raise DataError(f"{where}: not valid JSON ({exc})") from None
    for name in record if isinstance(record, dict) else ():
        meant = _misspelt_request_key(name)
        if meant:
            raise DataError(f"{where}: unknown key {name!r} (did you mean {meant!r}?)")
    if not isinstance(record, dict) or not ("prompt" in record or "question" in record):
        raise DataError(f"{where}: expected an object with a 'prompt' or 'question' field")
    if "prompt" in record and "question" in record:
        raise DataError(f"{where}: both 'prompt' and 'question': give one")
    key = "prompt" if "prompt" in record else "question"
    text = record[key]
    if not isinstance(text, str):
        raise DataError(f"{where}: '{key}' must be a string, got {type(text).__name__} {text!r:.60}")
    thoughts = record.get("num_thoughts")
    if thoughts is not None and thoughts != "auto" and not (is_integer(thoughts) and thoughts >= 0):
        raise DataError(f"{where}: 'num_thoughts' must be an integer >= 0 or \"auto\", got {type(thoughts).__name__} "
                        f"{thoughts!r:.60}")
    return PromptRequest(text if key == "prompt" else text + "\n", thoughts)


def _misspelt_request_key(name: str) -> str | None:
    """The request key `name` misspells: the same but for case, '-' for '_', or one letter added,
    dropped or changed ("num_thought", "Prompt", "questions"). Other keys (an official record's
    "answer" and "steps", a "question_id") are not read and not errors."""
    if name in REQUEST_KEYS:
        return None
    plain = name.lower().replace("-", "_")
    return next((key for key in REQUEST_KEYS if plain == key or _one_edit_apart(plain, key)), None)


def _one_edit_apart(a: str, b: str) -> bool:
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long = sorted((a, b), key=len)
    return any(long[:i] + long[i + 1:] == short for i in range(len(long)))


@dataclass
class InOrder:
    """Collect results that arrive in any order (request, sample) and pass each to `emit` as soon as
    every result before it has been passed: output in request order, written while others run."""

    emit: Callable[[int, int, object], None]
    samples: int
    _waiting: dict = field(default_factory=dict)
    _next: int = 0

    def __call__(self, request: int, sample: int, result) -> None:
        self._waiting[(request, sample)] = result
        while divmod(self._next, self.samples) in self._waiting:
            key = divmod(self._next, self.samples)
            self.emit(*key, self._waiting.pop(key))
            self._next += 1
