"""What attention-probability dropout costs a paged training step on the torch backend (CPU).

One process, the two settings taking turns (attention dropout 0 and p; embedding and residual dropout
off), forward + backward of one batch; prints the median of each. Usage:
`python benchmarks/attention_dropout.py [--p 0.1] [--reps 8] [--threads 2]`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from coconut_engine.coconut import CoconutModel, CoconutSample, SpecialTokens
from coconut_engine.config import ModelConfig
from coconut_engine.model import Decoder, DropoutRates


def batch(tokens: SpecialTokens, size: int = 32) -> list[CoconutSample]:
    """ProsQA-like samples of the main job's size: prompts 31-70 tokens, 0-3 thoughts, suffixes 16-35."""
    gen = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(0, 290, (n,), generator=gen).tolist()

    return [CoconutSample(ids(30 + (i * 7) % 40) + [tokens.bot], i % 4, [tokens.eot] + ids(15 + (i * 5) % 20))
            for i in range(size)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ModelConfig.from_dict({"model_type": "gpt2", "n_embd": 128, "n_layer": 4, "n_head": 4,
                                    "n_positions": 1024, "vocab_size": 300})  # the builtin gpt2-tiny shape
    decoder = Decoder(config, attention_backend="torch").train()
    tokens = SpecialTokens(297, 298, 299)
    model, samples = CoconutModel(decoder, tokens), batch(tokens)
    times: dict[float, list[float]] = {0.0: [], args.p: []}
    for rep in range(args.reps + 1):
        for p in times:
            decoder.dropout = DropoutRates(0.0, 0.0, p)
            start = time.perf_counter()
            model(samples).backward()
            if rep:  # the first round warms up
                times[p].append(time.perf_counter() - start)
            decoder.zero_grad(set_to_none=True)
    for p, ts in times.items():
        print(f"attention dropout {p}: median {1000 * statistics.median(ts):.0f} ms "
              f"(min {1000 * min(ts):.0f}, max {1000 * max(ts):.0f}) over {len(ts)} steps")


if __name__ == "__main__":
    main()
