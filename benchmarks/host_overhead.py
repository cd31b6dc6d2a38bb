"""Host time per decoder call by step kind: the tiny shape's paged training step (forward of the
prefill, a thought step and the suffix step; the step's backward) and a decode step of the
smollm2-135m shape with equal and ragged (+-20 %) prompt lengths, or (`--thought-generation`) a whole
generate call with thoughts; optionally against an earlier revision of the engine, timed in the same
process.

On CPU a call's host time is its wall time. Every number is the median over `--reps` rounds in
which the contenders take turns (the order rotating each round). Each step is timed twice: wall
time and the process's CPU time; on a shared machine the CPU time moves less (a step that is
preempted keeps its wall clock running, not its CPU clock), and only ratios of contenders timed in
turns compare. Usage (from the repository root):

    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 7
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 21 --stages 1,2,3,4,5,6 --against e993c0e
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 7 --decode-batches 1,16 --against e993c0e
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 5 --stages 6 --shape gpt2-6l --against e993c0e
    OMP_NUM_THREADS=1 python benchmarks/host_overhead.py --reps 5 --thought-generation 16 --against 5c8f740

`--against REV` extracts the library (`coconut_engine/`, `kernels/`) of git revision REV into a
temporary directory, imports it as a second package and adds its paged step (and its decode step)
to the contenders: before and after run on the same weights and batch, in turns, in one process.
"""
from __future__ import annotations

import argparse
import importlib
import io
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

import coconut_engine
from coconut_engine import bench

REPO = Path(__file__).resolve().parent.parent


def load_revision(rev: str):
    """The engine of git revision `rev` as a package of its own (`coconut_engine_<rev>`)."""
    name = "coconut_engine_" + "".join(c if c.isalnum() else "_" for c in rev)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "coconut_engine", "kernels"],
                             check=True, capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="host_overhead_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root)
    shutil.move(str(root / "coconut_engine"), str(root / name))
    shutil.move(str(root / "kernels"), str(root / name / "kernels"))
    sys.path.insert(0, str(root))
    return importlib.import_module(name)


def _call_kind(batch) -> str:
    if batch.max_seqlen_q == 1:
        return "one-token"
    return "prefill" if batch.max_seqlen_q > 64 else "suffix"


def _take_turns(contenders: dict[str, Callable[[], object]], reps: int) -> dict[str, dict[str, float]]:
    """Median wall and CPU milliseconds of each contender, `reps` rounds in turns after a warm-up round."""
    names = list(contenders)
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    for rep in range(reps + 1):
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            t0, c0 = time.perf_counter(), time.process_time()
            contenders[name]()
            if rep:
                wall[name].append((time.perf_counter() - t0) * 1e3)
                cpu[name].append((time.process_time() - c0) * 1e3)
    return {n: {"wall_ms": statistics.median(wall[n]), "cpu_ms": statistics.median(cpu[n])} for n in names}


def _engines(against: str | None) -> dict[str, object]:
    """{label: the package's bench module}: this checkout ("after") and, if asked, revision `against`."""
    engines = {"after": bench}
    if against:
        engines[f"before ({against})"] = importlib.import_module(load_revision(against).__name__ + ".bench")
    return engines


def training_calls(stage: int, reps: int, against: str | None = None) -> dict:
    """Median microseconds per decoder call by kind (the paged mode of each engine): its forward, and
    its backward (from the moment the gradient of the call's output is complete to the moment the
    gradient of its input embeddings is: the call's own nodes, which autograd runs together since
    each later call's come first); and the median step (forward + backward) of each engine's paged
    mode, in turns with multipass and floor."""
    contenders, calls, backward_calls, current = {}, {}, {}, {"label": None}
    patched = []
    for label, engine in _engines(against).items():
        modes = ["paged", "multipass", "floor"] if label == "after" else ["paged"]
        steps, _ = engine._train_steps("tiny", modes, stage, 8, torch.device("cpu"), "torch", 250, 0)
        for mode in modes:
            name = f"{label} {mode}" if mode == "paged" else mode

            def run(step=steps[mode][1], name=name):
                current["label"] = name
                step()

            contenders[name] = run
        decoder_cls = importlib.import_module(engine.__name__.rsplit(".", 1)[0] + ".model").Decoder
        forward = decoder_cls.forward

        def timed(self, batch, *args, _forward=forward, **kwargs):
            t0 = time.perf_counter()
            out = _forward(self, batch, *args, **kwargs)
            label = current["label"]
            if label.endswith("paged"):
                kind = _call_kind(batch)
                calls.setdefault(label, {}).setdefault(kind, []).append((time.perf_counter() - t0) * 1e6)
                x = kwargs.get("inputs_embeds")
                if out.requires_grad and x is not None and x.requires_grad:
                    started = []
                    times = backward_calls.setdefault(label, {}).setdefault(kind, [])
                    out.register_hook(lambda grad: started.append(time.perf_counter()))
                    x.register_hook(lambda grad: times.append((time.perf_counter() - started[-1]) * 1e6)
                                    if started else None)
            return out

        decoder_cls.forward = timed
        patched.append((decoder_cls, forward))
    try:
        steps_ms = _take_turns(contenders, reps)
    finally:
        for cls, forward in patched:
            cls.forward = forward
    def medians(by_label):
        return {label: {k: statistics.median(v) for k, v in kinds.items() if v} for label, kinds in by_label.items()}

    return {"calls_us": medians(calls), "backward_calls_us": medians(backward_calls), "steps": steps_ms}


def stage_times(stages, reps: int, against: str | None = None, shape: str = "tiny") -> dict:
    """Median wall and CPU ms of the paged (each engine), multipass and floor steps of `shape` at each
    stage, in turns in this process."""
    engines = _engines(against)
    out = {}
    for stage in stages:
        contenders = {}
        for label, engine in engines.items():
            modes = ["paged", "multipass", "floor"] if label == "after" else ["paged"]
            steps, _ = engine._train_steps(shape, modes, stage, 8, torch.device("cpu"), "torch", 250, 0)
            for mode in modes:
                contenders[f"{label} {mode}" if mode == "paged" else mode] = steps[mode][1]
        out[stage] = _take_turns(contenders, reps)
        print(json.dumps({stage: out[stage]}), file=sys.stderr, flush=True)
    return out


def decode_calls(batches, reps: int, against: str | None = None) -> dict:
    """Median ms of a decode step (decoder call, LM head, argmax) of the smollm2-135m shape, equal and
    ragged prompts of ~400 tokens, per batch size: each engine, and transformers' forward over its cache."""
    engines = _engines(against)
    decoders = {label: engine.build_random_model("smollm2-135m", attention_backend="torch").eval()
                for label, engine in engines.items()}
    hf = bench._as_transformers(decoders["after"], torch.device("cpu"))
    out = {}
    for batch in batches:
        contenders = {}
        for kind in ("equal", "ragged"):
            lens = bench.prompt_lengths(batch, 400, kind == "ragged")
            for label, engine in engines.items():
                contenders[f"{label} {kind}"] = engine._engine_decode_step(decoders[label], lens, reps + 2)
            contenders[f"transformers {kind}"] = bench._transformers_decode_step(hf, decoders["after"].config, lens,
                                                                                 torch.device("cpu"))
        out[batch] = _take_turns(contenders, reps)
        print(json.dumps({batch: out[batch]}), file=sys.stderr, flush=True)
    return out


def thought_generation(batch: int, reps: int, against: str | None = None, prompt_len: int = 128,
                       new_tokens: int = 32) -> dict:
    """Median ms of one `Generator.generate` call of the smollm2-135m shape over `batch` ragged prompts
    (`prompt_len` +-20 %), `new_tokens` greedy tokens after thoughts: 6 for every prompt, or 1-6 by
    prompt (sequences end their thoughts at different steps); each engine, in turns, with the decoder
    calls one generate call makes and the median ms of a call by the most new tokens a sequence feeds
    in it (1: thoughts and decoding; 2: a sequence's last thought with its <eot>; more: prefill)."""
    engines = _engines(against)
    lens = bench.prompt_lengths(batch, prompt_len, True)
    counts = {"k=6": 6, "k=1..6": [1 + i % 6 for i in range(batch)]}
    contenders, calls, call_ms = {}, {}, {}
    for label, engine in engines.items():
        package = engine.__name__.rsplit(".", 1)[0]
        generate_module = importlib.import_module(package + ".generate")
        tokens_cls = importlib.import_module(package + ".coconut").SpecialTokens
        decoder = engine.build_random_model("smollm2-135m", attention_backend="torch").eval()
        vocab = decoder.config.vocab_size
        gen = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab - 3, (n,), generator=gen).tolist() for n in lens]
        generator = generate_module.Generator(decoder, max_pages=batch * (-(-(max(lens) + new_tokens + 8) // 16)) + 8,
                                              page_size=16, special_tokens=tokens_cls(vocab - 3, vocab - 2, vocab - 1))
        for kind, k in counts.items():
            name = f"{label} {kind}"
            made = []
            forward = decoder.forward
            by_width = call_ms.setdefault(name, {})

            def counting(batch_, *args, _made=made, _forward=forward, _by_width=by_width, **kwargs):
                t0 = time.perf_counter()
                out = _forward(batch_, *args, **kwargs)
                width = str(batch_.max_seqlen_q) if batch_.max_seqlen_q <= 2 else "prefill"
                _by_width.setdefault(width, []).append((time.perf_counter() - t0) * 1e3)
                _made.append(1)
                return out

            def run(generator=generator, prompts=prompts, k=k, made=made, decoder=decoder, counting=counting,
                    name=name):
                made.clear()
                decoder.forward = counting
                try:
                    generator.generate(prompts, num_thoughts=k, max_new_tokens=new_tokens)
                finally:
                    del decoder.forward
                calls[name] = len(made)

            contenders[name] = run
    out = _take_turns(contenders, reps)
    return {name: {**times, "decoder_calls": calls[name],
                   "call_ms_by_new_tokens": {w: statistics.median(t) for w, t in call_ms[name].items()}}
            for name, times in out.items()}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--stage", type=int, default=6)
    parser.add_argument("--decode-batches", default="16", help="decode step batch sizes, e.g. 1,16,64 ('' for none)")
    parser.add_argument("--stages", default=None, help="instead: the training step by stage, e.g. 1,2,3,4,5,6")
    parser.add_argument("--shape", default="tiny", help="with --stages: the model shape (bench.SHAPES)")
    parser.add_argument("--against", default=None, help="a git revision whose engine runs in turns with this one")
    parser.add_argument("--thought-generation", type=int, default=None, metavar="BATCH",
                        help="instead: generate with thoughts and 32 tokens over BATCH ragged prompts (smollm2-135m)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    meta = {"engine": str(Path(coconut_engine.__file__).parent), "against": args.against, "reps": args.reps,
            "torch": torch.__version__}
    if args.thought_generation:
        print(json.dumps({**meta, "thought_generation": thought_generation(args.thought_generation, args.reps,
                                                                           args.against)}))
        raise SystemExit(0)
    if args.stages:
        print(json.dumps({**meta, "shape": args.shape,
                          "stages": stage_times([int(s) for s in args.stages.split(",")], args.reps, args.against,
                                                args.shape)}))
        raise SystemExit(0)
    batches = [int(b) for b in args.decode_batches.split(",") if b]
    result = {**meta, "training": training_calls(args.stage, args.reps, args.against),
              "decode": decode_calls(batches, args.reps, args.against) if batches else {}}
    print(json.dumps(result))
