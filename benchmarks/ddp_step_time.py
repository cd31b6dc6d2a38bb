"""1 rank vs 2 ranks on CPU (gloo): the time of one training step (forward + backward + gradient
reduction) with the global batch split across the ranks, the same step without reduction (DDP's
no_sync), and the all-reduce of every gradient alone; what DDP adds over no_sync against the bare
all-reduce shows how much of it the backward hides.

    OMP_NUM_THREADS=1 python benchmarks/ddp_step_time.py [--reps 5] [--batch 8]

Every rank runs one thread: one rank computes the whole batch on one core, two ranks half each on two.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

from coconut_engine.coconut import CoconutModel, CoconutSample, SpecialTokens
from coconut_engine.config import ModelConfig
from coconut_engine.distributed import DistEnv, gradient_sync, wrap_for_training
from coconut_engine.model import Decoder

SHAPE = {"model_type": "gpt2", "vocab_size": 1024, "n_embd": 256, "n_layer": 6, "n_head": 8, "n_positions": 512}


def batch(size: int) -> list[CoconutSample]:
    """ProsQA-like samples: prompts 60-90 tokens, 2 thoughts, suffixes of 24 tokens."""
    g = torch.Generator().manual_seed(0)
    return [CoconutSample(torch.randint(0, 1000, (60 + 2 * i,), generator=g).tolist(), 2,
                          torch.randint(0, 1000, (24,), generator=g).tolist()) for i in range(size)]


def timed(fn, reps: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rank_main(rank: int, world: int, port: int, reps: int, size: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    env = DistEnv.from_environment()
    device = env.start("cpu")
    torch.manual_seed(0)
    decoder = Decoder(ModelConfig.from_dict(SHAPE), attention_backend="torch")
    model = CoconutModel(decoder, SpecialTokens(bot=1021, thought=1022, eot=1023))
    wrapped = wrap_for_training(model, "ddp", env, device)
    share = batch(size)[rank::world]

    def step(sync: bool):
        with gradient_sync(wrapped, sync):
            wrapped(share, reduction="sum").backward()
        decoder.zero_grad(set_to_none=True)

    grads = torch.zeros(sum(p.numel() for p in decoder.parameters()))
    result = {"world": world, "params": grads.numel(),
              "step_s": timed(lambda: step(True), reps), "no_sync_step_s": timed(lambda: step(False), reps)}
    if world > 1:
        result["allreduce_s"] = timed(lambda: torch.distributed.all_reduce(grads), reps)
    del wrapped, step  # DDP's reducer goes before its process group
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)


def measure(world: int, reps: int, size: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(rank_main, args=(world, port, reps, size, out), nprocs=world)
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    rows = [measure(world, args.reps, args.batch) for world in (1, 2, 1, 2)]  # alternate: drift hits both
    print(json.dumps(rows))
    print("| ranks | step (s) | step without reduction (s) | all-reduce alone (s) |")
    print("|---:|---:|---:|---:|")
    for world in (1, 2):
        mine = [r for r in rows if r["world"] == world]
        median = lambda key: statistics.median(r[key] for r in mine)  # noqa: E731
        cells = [f"{median('step_s'):.3f}", f"{median('no_sync_step_s'):.3f}",
                 f"{median('allreduce_s'):.3f}" if world > 1 else "-"]
        print(f"| {world} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
