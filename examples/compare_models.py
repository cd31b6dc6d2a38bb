"""Compare two trained checkpoints side by side on the same questions (e.g. the main job's no-CoT
baseline and its Coconut model):

    python examples/compare_models.py runs/default/no_cot/checkpoint-0006 \
        runs/default/coconut/checkpoint-0012 --data runs/default/coconut/data/val.json --questions 5

Each model answers with its own curriculum settings (coconut.json): the Coconut model thinks in
continuous thoughts, the baselines write their reasoning (or nothing) in tokens.
"""
from __future__ import annotations

import argparse
import textwrap

from coconut_engine.checkpoint import checkpoint_thought_transform, load_checkpoint
from coconut_engine.data import StageRules, load_records
from coconut_engine.trainer import evaluate


def run(path: str, records, max_new_tokens: int) -> dict:
    decoder, tokenizer, tokens, info, _ = load_checkpoint(path)
    rules = StageRules(info["c_thought"], info["max_latent_stage"], info["pad_latent_to_max"], 0.0, info["mode"])
    result = evaluate(decoder, tokenizer, tokens, records, info["stage"], rules, max_new_tokens,
                      thought_transform=checkpoint_thought_transform(path, info, decoder))
    result["label"] = f"{info['mode']} (stage {info['stage']})"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("baseline")
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--questions", type=int, default=5, help="how many to print side by side")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    records = load_records(args.data)
    left, right = run(args.baseline, records, args.max_new_tokens), run(args.model, records, args.max_new_tokens)
    for side in (left, right):
        print(f"{side['label']:<28} accuracy {side['accuracy']:.3f}  "
              f"{side['tokens_per_answer']:.1f} tokens/answer  {side['thoughts_per_answer']:.1f} thoughts")
    for i in range(min(args.questions, len(records))):
        print("\n" + textwrap.fill(records[i].question, 110))
        print(f"  expected: {records[i].answer}")
        for side in (left, right):
            g = side["generations"][i]
            mark = "ok " if g["correct"] else "BAD"
            print(f"  [{mark}] {side['label']:<24} {g['output']!r}")


if __name__ == "__main__":
    main()
