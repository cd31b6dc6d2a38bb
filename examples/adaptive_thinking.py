"""Fixed thought counts against adaptive thinking on a trained checkpoint: accuracy and mean thoughts
for k = 0..max and for `num_thoughts="auto"` (stop when p(<eot>) exceeds the threshold), as a
Markdown table per data file:

    python examples/adaptive_thinking.py runs/adaptive/coconut/checkpoint-0012 \
        --data runs/adaptive/coconut/data/val.json ../shared/data/prosqa_valid.json --max-thoughts 3

Adaptive thinking needs a model trained with `eot_loss_weight > 0` (it learns p(<eot>) after
`<bot>` and after each thought); without it p(<eot>) at a thought position means nothing.
"""
from __future__ import annotations

import argparse
import json
import time

from coconut_engine.checkpoint import checkpoint_thought_transform, load_checkpoint
from coconut_engine.data import StageRules, load_records
from coconut_engine.trainer import evaluate


def table_rows(path: str, data: str, max_thoughts: int, thresholds: list[float], max_new_tokens: int) -> list[dict]:
    """One row per setting: fixed k = 0..max_thoughts, then auto at each threshold."""
    decoder, tokenizer, tokens, info, _ = load_checkpoint(path)
    rules = StageRules(info["c_thought"], info["max_latent_stage"], info["pad_latent_to_max"], 0.0, info["mode"])
    transform = checkpoint_thought_transform(path, info, decoder)
    records = load_records(data)
    settings = [(str(k), k, 0.5) for k in range(max_thoughts + 1)]
    settings += [(f"auto (p > {t:g})", "auto", t) for t in thresholds]
    rows = []
    for label, k, threshold in settings:
        started = time.perf_counter()
        result = evaluate(decoder, tokenizer, tokens, records, info["stage"], rules, max_new_tokens,
                          thought_transform=transform, num_thoughts=k, max_thoughts=max_thoughts,
                          eot_threshold=threshold)
        rows.append({"setting": label, "accuracy": result["accuracy"], "thoughts": result["thoughts_per_answer"],
                     "tokens": result["tokens_per_answer"], "seconds": time.perf_counter() - started})
        print(json.dumps({"data": data, **rows[-1]}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", nargs="+", required=True, help="official-format JSON files")
    parser.add_argument("--max-thoughts", type=int, default=3)
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5])
    parser.add_argument("--max-new-tokens", type=int, default=40)
    args = parser.parse_args()
    for data in args.data:
        rows = table_rows(args.checkpoint, data, args.max_thoughts, args.thresholds, args.max_new_tokens)
        print(f"\n{data}\n\n| thoughts | accuracy | mean thoughts | generated tokens / answer |\n|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['setting']} | {r['accuracy']:.3f} | {r['thoughts']:.2f} | {r['tokens']:.1f} |")


if __name__ == "__main__":
    main()
