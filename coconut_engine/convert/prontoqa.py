"""ProntoQA's `5hop_0shot_random.json`: `{id: {"test_example": {question, query, chain_of_thought, answer}}}`."""
from __future__ import annotations

from pathlib import Path

from ..data import DataError, read_json

PRONTOQA_SPLITS = {"train": 9000, "valid": 200}  # the official script's split; the rest is test


def read_prontoqa(path: str | Path) -> list[dict]:
    """Official-format records as `preprocessing/prontoqa.py` makes them: question + " " + query,
    the chain of thought paired into steps of two sentences, the answer."""
    path = Path(path)
    raw = read_json(path)
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: expected a non-empty JSON object of examples")
    records = []
    for key, value in raw.items():
        example = value.get("test_example") if isinstance(value, dict) else None
        if not isinstance(example, dict):
            raise DataError(f"{path}: example {key!r} has no 'test_example' object")
        missing = [f for f in ("question", "query", "chain_of_thought", "answer") if f not in example]
        if missing:
            raise DataError(f"{path}: example {key!r}: test_example lacks {', '.join(missing)}")
        chain = example["chain_of_thought"]
        if not isinstance(chain, list) or not all(isinstance(s, str) for s in chain):
            raise DataError(f"{path}: example {key!r}: chain_of_thought must be a list of strings")
        records.append({"question": example["question"] + " " + example["query"],
                        "steps": [" ".join(chain[i : i + 2]) for i in range(0, len(chain), 2)],
                        "answer": example["answer"]})
    return records


def split_records(records: list[dict], sizes: dict[str, int], rest: str = "test") -> dict[str, list[dict]]:
    """Consecutive splits of the given sizes, in order, and `rest` holding what remains."""
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = records[start : start + size]
        start += size
    out[rest] = records[start:]
    return out
