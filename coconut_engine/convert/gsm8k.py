"""GSM8K in the internalized-CoT text format (one `question||step step ... #### answer` line each)."""
from __future__ import annotations

from pathlib import Path

from ..data import DataError


def read_gsm_icot(path: str | Path) -> list[dict]:
    """Official-format records of a GSM8K internalized-CoT text file, split as the official
    `gsm_icot.py` splits each line: the question before `||`, the steps (space-separated) before `##`,
    the answer after the last `##`. A line without `||` or `####` is an error naming it."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc})") from exc
    records = []
    for line_no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if "||" not in line or "####" not in line:
            raise DataError(f"{path}:{line_no}: expected 'question||steps #### answer', got {line[:80]!r}")
        question, rest = line.split("||", 1)
        steps = rest.split("##")[0].strip()
        answer = line.split("##")[-1].strip()
        if not question.strip() or not answer:
            raise DataError(f"{path}:{line_no}: empty question or answer")
        records.append({"question": question, "steps": steps.split(" ") if steps else [], "answer": answer})
    if not records:
        raise DataError(f"{path}: no records")
    return records
