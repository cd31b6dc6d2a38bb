"""Score models side by side on the same questions, each as training evaluates: Coconut checkpoints
with their own method and stage, or any model directory with a method and stage given as
DIR@METHOD[:STAGE] (the untouched base model, or a Coconut checkpoint at another stage):

    python examples/compare_models.py runs/default/no_cot/checkpoint-0012 \
        runs/default/coconut/checkpoint-0012@cot runs/default/coconut/checkpoint-0012 \
        --data runs/default/coconut/data/val.json --questions 5

METHOD is no_cot, cot or coconut (or the ablations no_thoughts, pause_as_thought).
"""
from __future__ import annotations

import argparse
import textwrap

from coconut_engine.data import load_records
from coconut_engine.scoring import load_for_scoring
from coconut_engine.trainer import official_max_new_tokens


def parse_spec(spec: str) -> tuple[str, str | None, int | None]:
    """DIR, DIR@METHOD or DIR@METHOD:STAGE -> (dir, method, stage)."""
    path, _, how = spec.partition("@")
    method, _, stage = how.partition(":")
    return path, method or None, int(stage) if stage else None


def score(spec: str, records, max_new_tokens: int, device: str | None = None) -> dict:
    """Load one model spec and score it on `records`."""
    path, method, stage = parse_spec(spec)
    return load_for_scoring(path, method=method, stage=stage, device=device).evaluate(records, max_new_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="DIR or DIR@METHOD[:STAGE]")
    parser.add_argument("--data", required=True)
    parser.add_argument("--questions", type=int, default=5, help="how many to print side by side")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the official 64 (GSM8K) or 128")
    parser.add_argument("--device", default=None, help="default: CUDA when present, else CPU")
    args = parser.parse_args()
    records = load_records(args.data)
    max_new_tokens = args.max_new_tokens or official_max_new_tokens(args.data)
    sides = [score(spec, records, max_new_tokens, args.device) for spec in args.models]
    width = max(len(side["label"]) for side in sides)
    for side in sides:
        print(f"{side['label']:<{width}}  accuracy {side['accuracy']:.3f}  CoT match {side['cot_accuracy']:.3f}  "
              f"{side['tokens_per_answer']:.1f} tokens/answer  {side['thoughts_per_answer']:.1f} thoughts")
    for i in range(min(args.questions, len(records))):
        print("\n" + textwrap.fill(records[i].question, 110))
        print(f"  expected: {records[i].answer}")
        for side in sides:
            g = side["generations"][i]
            mark = "ok " if g["correct"] else "BAD"
            print(f"  [{mark}] {side['label']:<{width}} {g['output']!r}")


if __name__ == "__main__":
    main()
