"""Host time per decoder call by step kind: the tiny shape's paged training step (forward of the
prefill, a thought step and the suffix step; the step's backward) and a decode step of the
smollm2-135m shape at batch 16 with equal and ragged (+-20 %) prompt lengths.

On CPU a call's host time is its wall time. Every number is the median over `--reps` rounds in
which the contenders take turns. Usage (from the repository root):

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 5
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 5 --stages 1,2,3,4,5,6
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from coconut_engine import bench
from coconut_engine.model import Decoder


def _call_kind(batch) -> str:
    if batch.max_seqlen_q == 1:
        return "one-token"
    return "prefill" if batch.max_seqlen_q > 64 else "suffix"


def training_calls(stage: int, reps: int) -> dict:
    """Median microseconds per decoder call forward by kind, and per step forward + backward, for the
    paged mode (next to multipass and floor steps) of the tiny shape."""
    modes = ["paged", "multipass", "floor"]
    steps, _ = bench._train_steps("tiny", modes, stage, 8, torch.device("cpu"), "torch", 250, 0)
    calls: dict[str, list[float]] = {}
    current = {"mode": None}
    forward = Decoder.forward

    def timed(self, batch, *args, **kwargs):
        t0 = time.perf_counter()
        out = forward(self, batch, *args, **kwargs)
        if current["mode"] == "paged":
            calls.setdefault(_call_kind(batch), []).append((time.perf_counter() - t0) * 1e6)
        return out

    Decoder.forward = timed
    try:
        step_ms = {m: [] for m in modes}
        for rep in range(reps + 1):
            for i in range(len(modes)):
                mode = modes[(rep + i) % len(modes)]
                current["mode"] = mode
                t0 = time.perf_counter()
                steps[mode][1]()
                if rep:
                    step_ms[mode].append((time.perf_counter() - t0) * 1e3)
    finally:
        Decoder.forward = forward
    return {"calls_us": {k: statistics.median(v) for k, v in calls.items()},
            "step_ms": {m: statistics.median(v) for m, v in step_ms.items()}}


def stage_times(stages, reps: int) -> dict:
    """Median ms of the tiny shape's paged, multipass and floor steps at each stage, in turns in this process."""
    modes = ["paged", "multipass", "floor"]
    out = {}
    for stage in stages:
        steps, _ = bench._train_steps("tiny", modes, stage, 8, torch.device("cpu"), "torch", 250, 0)
        times = {m: [] for m in modes}
        for rep in range(reps + 1):
            for i in range(len(modes)):
                mode = modes[(rep + i) % len(modes)]
                t0 = time.perf_counter()
                steps[mode][1]()
                if rep:
                    times[mode].append((time.perf_counter() - t0) * 1e3)
        out[stage] = {m: statistics.median(t) for m, t in times.items()}
    return out


def decode_calls(batch: int, reps: int) -> dict:
    """Median milliseconds of a decode step (decoder call, LM head, argmax) of the smollm2-135m shape."""
    decoder = bench.build_random_model("smollm2-135m", attention_backend="torch").eval()
    steps = {kind: bench._engine_decode_step(decoder, bench.prompt_lengths(batch, 400, kind == "ragged"), reps + 2)
             for kind in ("equal", "ragged")}
    times = {k: [] for k in steps}
    for rep in range(reps + 1):
        for i, kind in enumerate(steps):
            kind = list(steps)[(rep + i) % 2]
            t0 = time.perf_counter()
            steps[kind]()
            if rep:
                times[kind].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--stage", type=int, default=6)
    parser.add_argument("--decode-batch", type=int, default=16)
    parser.add_argument("--stages", default=None, help="instead: the tiny shape's step by stage, e.g. 1,2,3,4,5,6")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.stages:
        print(json.dumps(stage_times([int(s) for s in args.stages.split(",")], args.reps)))
        raise SystemExit(0)
    result = {"training": training_calls(args.stage, args.reps), "decode_ms": decode_calls(args.decode_batch, args.reps)}
    print(json.dumps(result))
