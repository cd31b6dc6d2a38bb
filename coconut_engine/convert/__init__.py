"""Converters from the files users obtain themselves into the official Coconut JSON
(`[{"question", "steps", "answer"}]`), as the official preprocessing scripts do:

- `gsm8k`: the internalized-CoT text lines (`question||<<step>> <<step>> #### answer`) that the
  official `preprocessing/gsm_icot.py` reads;
- `prontoqa`: ProntoQA's `5hop_0shot_random.json` (`preprocessing/prontoqa.py`), split 9000 / 200 /
  the rest into train / valid / test as the official script does.

`length.py` measures records in tokens, to drop those longer than a model's positions.
"""
from .gsm8k import read_gsm_icot
from .prontoqa import PRONTOQA_SPLITS, read_prontoqa, split_records
from .writer import write_records

FORMATS = ("gsm8k", "prontoqa")

__all__ = ["FORMATS", "PRONTOQA_SPLITS", "read_gsm_icot", "read_prontoqa", "split_records", "write_records"]
