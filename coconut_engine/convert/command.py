"""What `coconut-engine data convert` does: read a source file, optionally drop over-long records,
write the official JSON (one file, or ProntoQA's three official splits)."""
from __future__ import annotations

from pathlib import Path

from ..coconut import SpecialTokens
from ..data import DataError, Record, StageRules, positions_needed, tokenize_record
from .gsm8k import read_gsm_icot
from .prontoqa import PRONTOQA_SPLITS, read_prontoqa, split_records
from .writer import write_records


def drop_too_long(records: list[dict], tokenizer, max_length: int, rules: StageRules) -> tuple[list[dict], list[int]]:
    """The records whose longest training sample (every stage of `rules`, markers and thoughts counted)
    fits in `max_length` tokens of `tokenizer`, and the indices of the others."""
    tokenized = [tokenize_record(Record(r["question"], tuple(r["steps"]), r["answer"]), tokenizer) for r in records]
    markers = SpecialTokens(0, 0, 0)  # one position each; their ids do not matter here
    too_long = [i for i, rec in enumerate(tokenized) if positions_needed(rec, rules, markers) > max_length]
    dropped = set(too_long)
    return [r for i, r in enumerate(records) if i not in dropped], too_long


def convert(fmt: str, source: str | Path, output: str | Path, splits: dict[str, int] | None = None,
            tokenizer=None, max_length: int | None = None, rules: StageRules | None = None) -> list[str]:
    """Convert `source` (format `fmt`) into official JSON at `output`; returns report lines.

    gsm8k writes the file `output`; prontoqa writes `prontoqa_{train,valid,test}.json` into the
    directory `output` (`splits`: sizes of the leading splits, default the official 9000 / 200).
    """
    if fmt == "gsm8k":
        records = read_gsm_icot(source)
    elif fmt == "prontoqa":
        records = read_prontoqa(source)
    else:
        raise DataError(f"unknown format {fmt!r} (known: gsm8k, prontoqa)")
    report = [f"{source}: {len(records)} records"]
    if max_length is not None:
        if tokenizer is None:
            raise DataError("max_length needs a tokenizer (--tokenizer DIR) to count tokens")
        records, dropped = drop_too_long(records, tokenizer, max_length, rules or StageRules())
        if dropped:
            report.append(f"dropped {len(dropped)} records longer than {max_length} tokens "
                          f"(records {dropped[:5]}{' ...' if len(dropped) > 5 else ''})")
    if fmt == "gsm8k":
        report.append(f"wrote {len(records)} records to {write_records(records, output)}")
        return report
    for name, part in split_records(records, splits or PRONTOQA_SPLITS).items():
        report.append(f"wrote {len(part)} records to {write_records(part, Path(output) / f'prontoqa_{name}.json')}")
    return report
