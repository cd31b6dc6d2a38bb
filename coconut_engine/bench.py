"""What `coconut-engine bench` runs: timings of the engine's parts, importable by benchmarks/.

- `kernels`: paged attention (Triton on CUDA, the torch backend elsewhere) against
  `scaled_dot_product_attention` on contiguous K/V, with bandwidth (decode) and TFLOP/s (extend).
- `train`: one forward + backward of a ProsQA-like batch per Coconut mode and curriculum stage: the
  peak memory of each point in a fresh subprocess (peak RSS on CPU, the CUDA allocator's peak on
  GPU; on CPU also the exact peak of tensor memory, `tensor_memory_point`), the step times of a
  stage's modes in one subprocess where they take turns (`interleaved_stage_timing`).
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from .baselines import OfficialCoconutHF
from .cache import AttentionBatch
from .linear import DeferredWeightGrads

# Model shapes by name: HF-style config dicts (random weights; no download).
SHAPES = {
    "tiny": {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 512, "n_positions": 1024},
    "gpt2-6l": {"model_type": "gpt2", "n_embd": 512, "n_layer": 6, "n_head": 8, "vocab_size": 50257,
                "n_positions": 1024},
    "gpt2": {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257,
             "n_positions": 1024},
    "smollm2-135m": {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "tie_word_embeddings": True,
                     "rms_norm_eps": 1e-5},
    "qwen2.5-0.5b": {"model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
                     "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
                     "max_position_embeddings": 32768, "rope_theta": 1000000.0, "tie_word_embeddings": True,
                     "rms_norm_eps": 1e-6},
}
TRAIN_MODES = ("paged", "two_pass", "multipass", "recompute", "transformers", "floor")
TENSOR_MEMORY_CHOICES = ("all", "last", "none")  # which stages of `bench train` get a tensor-memory point


@dataclass
class Timing:
    """One measured point."""

    name: str
    median_ms: float
    metric: float = 0.0  # GB/s for decode, TFLOP/s for extend
    unit: str = ""
    note: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of `fn()` (CUDA events on GPU, perf_counter elsewhere)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def paged_problem(batch: int, context: int, q_len: int, heads: int, kv_heads: int, head_dim: int, page: int,
                  dtype: torch.dtype, device: torch.device, seed: int = 0):
    """q, K/V pools with permuted pages, and the AttentionBatch of `batch` sequences of length `context`
    whose last `q_len` tokens are new."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = -(-context // page)
    num_pages = batch * pages_per_seq
    table = torch.randperm(num_pages, generator=gen).view(batch, pages_per_seq).to(torch.int32)
    k_pool = torch.randn(num_pages, page, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_pool = torch.randn(num_pages, page, kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(batch * q_len, heads, head_dim, generator=gen).to(device, dtype)
    meta = AttentionBatch(
        cu_seqlens_q=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device),
        seq_lens_k=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_table=table.to(device),
        slot_mapping=torch.full((batch * q_len,), -1, dtype=torch.int64, device=device),
        positions=torch.arange(context - q_len, context, device=device).repeat(batch),
        max_seqlen_q=q_len, max_seqlen_k=context, q_lens=(q_len,) * batch, k_lens=(context,) * batch,
    )
    return q, k_pool, v_pool, meta


def contiguous_kv(k_pool, v_pool, meta: AttentionBatch):
    """The same K/V laid out contiguously `[B, kv_heads, context, D]`, for SDPA."""
    b, ctx = meta.num_seqs, meta.max_seqlen_k
    k = k_pool[meta.block_table.long()].reshape(b, -1, *k_pool.shape[2:])[:, :ctx].transpose(1, 2).contiguous()
    v = v_pool[meta.block_table.long()].reshape(b, -1, *v_pool.shape[2:])[:, :ctx].transpose(1, 2).contiguous()
    return k, v


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (read + write) in GB/s."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device=device)
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def bench_kernels(device: str | torch.device = "cpu", dtype: torch.dtype | None = None, batch: int = 64,
                  context: int = 4096, heads: int = 32, kv_heads: int = 8, head_dim: int = 128, page: int = 16,
                  extend_q: int = 512) -> list[Timing]:
    """Decode and extend attention: the engine's kernel vs SDPA on contiguous K/V."""
    import torch.nn.functional as F

    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = dtype or (torch.bfloat16 if on_gpu else torch.float32)
    if on_gpu:
        from .kernels.paged_attention import paged_attention
    else:
        from .kernels.torch_backend import paged_attention
    impl = "triton" if on_gpu else "torch backend"
    scale = head_dim ** -0.5
    rows: list[Timing] = []

    q, k_pool, v_pool, meta = paged_problem(batch, context, 1, heads, kv_heads, head_dim, page, dtype, device)
    kv_bytes = 2 * batch * context * kv_heads * head_dim * k_pool.element_size()
    ms = time_fn(lambda: paged_attention(q, k_pool, v_pool, meta, scale), device)
    rows.append(Timing(f"decode paged ({impl}) B={batch} ctx={context}", ms, kv_bytes / (ms * 1e-3) / 1e9, "GB/s"))
    k, v = contiguous_kv(k_pool, v_pool, meta)
    qd = q.view(batch, 1, heads, head_dim).transpose(1, 2)
    ms = time_fn(lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True), device)
    rows.append(Timing(f"decode SDPA contiguous B={batch} ctx={context}", ms, kv_bytes / (ms * 1e-3) / 1e9, "GB/s"))
    if on_gpu:
        copy = copy_bandwidth_gbs(device)
        rows.append(Timing("device-to-device copy", 0.0, copy, "GB/s"))
        rows[0].note = f"{rows[0].metric / copy:.0%} of copy bandwidth"
    del k, v, k_pool, v_pool

    ext_batch = max(1, batch // 8)
    q, k_pool, v_pool, meta = paged_problem(ext_batch, extend_q, extend_q, heads, kv_heads, head_dim, page, dtype, device)
    flops = 4 * ext_batch * heads * head_dim * extend_q * (extend_q + 1) / 2
    ms = time_fn(lambda: paged_attention(q, k_pool, v_pool, meta, scale), device)
    rows.append(Timing(f"extend paged ({impl}) B={ext_batch} q={extend_q}", ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s"))
    k, v = contiguous_kv(k_pool, v_pool, meta)
    qe = q.view(ext_batch, extend_q, heads, head_dim).transpose(1, 2)
    ms = time_fn(lambda: F.scaled_dot_product_attention(qe, k, v, scale=scale, is_causal=True, enable_gqa=True), device)
    rows.append(Timing(f"extend SDPA causal B={ext_batch} q={extend_q}", ms, flops / (ms * 1e-3) / 1e12, "TFLOP/s"))
    return rows


def format_table(rows: list[Timing]) -> str:
    """A markdown table of timings."""
    lines = ["| what | median ms | rate | note |", "|---|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.median_ms:.3f} | {r.metric:.2f} {r.unit} | {r.note} |")
    return "\n".join(lines)


def serving_dtype(device: torch.device | str, dtype: torch.dtype | str | None = None) -> torch.dtype:
    """The weights' dtype of a generation benchmark: `dtype` if given (a dtype or a name such as "bf16"),
    else bf16 on a GPU (what serving runs there) and fp32 on a CPU (the engine's CPU default)."""
    from .loader import resolve_dtype

    if dtype is not None:
        return resolve_dtype(dtype)
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_random_model(shape: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       attention_backend: str = "auto", seed: int = 0):
    """A Decoder of a named shape with random weights (std 0.02, norms at 1)."""
    from .config import ModelConfig
    from .model import Decoder

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    config = ModelConfig.from_dict(SHAPES[shape], source=f"shape {shape}")
    with torch.device(device):
        model = Decoder(config, attention_backend=attention_backend)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0.0, 0.02)
    return model.to(dtype)


def prosqa_like_batch(vocab: int, stage: int, batch: int = 8, prompt_len: int = 250, num_steps: int = 4,
                      step_len: int = 8, answer_len: int = 8, c_thought: int = 1, seed: int = 0):
    """CoconutSamples shaped like ProsQA at a curriculum stage: ragged prompts (+-10%), `stage * c`
    thoughts, the remaining steps, the answer and eos after <eot>. Token ids are random; the last
    three ids of the vocabulary serve as <bot>, <thought>, <eot>."""
    from .coconut import CoconutSample, SpecialTokens

    tokens = SpecialTokens(bot=vocab - 3, thought=vocab - 2, eot=vocab - 1)
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, vocab - 3, (n,), generator=gen).tolist()

    samples = []
    for i in range(batch):
        length = prompt_len + int((i / max(batch - 1, 1) - 0.5) * 0.2 * prompt_len)
        steps = ids(step_len * max(0, num_steps - stage))
        samples.append(CoconutSample(ids(length) + [tokens.bot], stage * c_thought,
                                     [tokens.eot] + steps + ids(answer_len) + ids(1)))
    return samples, tokens


def floor_loss(decoder, samples) -> torch.Tensor:
    """The floor: one plain packed forward + backward of the same sequences, thoughts as ordinary tokens."""
    device = decoder.embed_tokens.weight.device
    ids, rows, targets, start = [], [], [], 0
    thought = samples[0].prompt[-1] + 1  # any valid id stands in for a thought
    for s in samples:
        seq = s.prompt + [thought] * s.num_thoughts + s.suffix
        ids.extend(seq)
        suffix_start = start + len(s.prompt) + s.num_thoughts
        rows.extend(range(suffix_start, suffix_start + len(s.suffix) - 1))
        targets.extend(s.suffix[1:])
        start += len(seq)
    batch = AttentionBatch.packed([s.length for s in samples], device=device)
    deferred = DeferredWeightGrads()  # the engine's embedding / LM-head gradient, as CoconutModel has it
    hidden = decoder(batch, inputs_embeds=decoder.embed(torch.tensor(ids, device=device), deferred))
    return decoder.cross_entropy(hidden[torch.tensor(rows, device=device)], torch.tensor(targets, device=device),
                                 deferred=deferred)


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _train_steps(shape: str, modes, stage: int, batch: int, device: torch.device, backend: str,
                 prompt_len: int, seed: int) -> tuple[dict, list]:
    """One training step (forward + backward) per mode over the same weights and batch, as
    `{mode: (model, step)}`, and the samples. The engine's modes share one Decoder; `transformers`
    gets a transformers copy of its weights. Gradients are allocated up front (part of the
    baseline, not the step)."""
    from .coconut import CoconutModel

    decoder = build_random_model(shape, device=device, attention_backend=backend, seed=seed)
    samples, tokens = prosqa_like_batch(decoder.config.vocab_size, stage, batch=batch, prompt_len=prompt_len,
                                        seed=seed)
    coconut = CoconutModel(decoder, tokens)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else None

    def make_step(mode):
        model = decoder
        if mode == "transformers":  # the official algorithm on transformers, same weights
            model = _as_transformers(decoder, device)
            official = OfficialCoconutHF(model, tokens)

        def step():
            model.zero_grad(set_to_none=False)
            with autocast if autocast is not None else torch.enable_grad():
                if mode == "floor":
                    loss = floor_loss(decoder, samples)
                elif mode == "transformers":
                    loss = official(samples)
                else:
                    loss = coconut(samples, mode=mode)
            loss.backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        return model, step

    return {mode: make_step(mode) for mode in modes}, samples


def _train_point(shape: str, mode: str, stage: int, batch: int, device: torch.device, backend: str,
                 prompt_len: int, seed: int):
    """The model, the samples and the training step of one (mode, stage) point."""
    steps, samples = _train_steps(shape, [mode], stage, batch, device, backend, prompt_len, seed)
    model, step = steps[mode]
    return model, samples, step


def run_train_point(shape: str, mode: str, stage: int, batch: int = 8, reps: int = 3, device: str = "cpu",
                    backend: str = "auto", prompt_len: int = 250, seed: int = 0) -> dict:
    """Median forward+backward time and peak memory of one (mode, stage) point, in this process."""
    device = torch.device(device)
    _, samples, step = _train_point(shape, mode, stage, batch, device, backend, prompt_len, seed)
    base_mb = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else current_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps + 1):  # the first run warms up
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens_per_step = sum(s.length for s in samples)
    return {"shape": shape, "mode": mode, "stage": stage, "batch": batch, "device": device.type,
            "median_ms": statistics.median(times[1:]), "tokens_per_s": tokens_per_step / (statistics.median(times[1:]) / 1e3),
            "peak_mb": peak_mb, "step_mb": peak_mb - base_mb, "tokens": tokens_per_step}


def interleaved_stage_timing(shape: str, stage: int, modes, batch: int = 8, reps: int = 3, device: str = "cpu",
                             backend: str = "auto", prompt_len: int = 250, seed: int = 0) -> dict:
    """Median step time of every mode at one stage, measured in one process with the modes taking
    turns (the order rotating each round): a drift of the machine's speed during the run then
    falls on all modes alike instead of on whichever ran at the wrong moment. `{mode: ms}`."""
    device = torch.device(device)
    steps, _ = _train_steps(shape, modes, stage, batch, device, backend, prompt_len, seed)
    times = {mode: [] for mode in modes}
    for mode in modes:  # warm-up
        steps[mode][1]()
    for rep in range(reps):
        for i in range(len(modes)):
            mode = modes[(rep + i) % len(modes)]
            t0 = time.perf_counter()
            steps[mode][1]()
            times[mode].append((time.perf_counter() - t0) * 1e3)
    return {mode: statistics.median(t) for mode, t in times.items()}


def tensor_memory_point(shape: str, mode: str, stage: int, batch: int = 8, device: str = "cpu",
                        backend: str = "auto", prompt_len: int = 250, seed: int = 0) -> dict:
    """Exact peak tensor memory of one (mode, stage) point on CPU, in MB: the model's parameters,
    gradients and buffers plus the highest level of live tensor bytes during its first training step
    (which allocates whatever the mode keeps across steps, such as the paged cache).

    PyTorch's CPU allocator keeps no statistics, so the step runs under the profiler's memory
    tracking, which sees every allocation and free; that costs time and host memory, so it is a
    point of its own, apart from the timed one. Unlike peak RSS it leaves out the interpreter,
    libraries and the C allocator's free-but-resident pages.
    """
    if torch.device(device).type != "cpu":
        raise ValueError("tensor_memory_point measures the CPU allocator; on CUDA peak_mb is already exact")
    decoder, _, step = _train_point(shape, mode, stage, batch, torch.device(device), backend, prompt_len, seed)
    held = sum(t.numel() * t.element_size() for t in [*decoder.parameters(), *decoder.buffers()])
    held += sum(p.grad.numel() * p.grad.element_size() for p in decoder.parameters())
    peak = peak_tensor_bytes(step)
    return {"tensor_mb": (held + peak) / 2**20, "tensor_step_mb": peak / 2**20}


def peak_tensor_bytes(fn: Callable[[], object]) -> int:
    """The highest level of CPU tensor bytes allocated during `fn()` above the level at its start
    (from the profiler's record of every allocation and free)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    level = peak = 0
    for event in events:  # nbytes: + allocated, - freed
        level += event.nbytes()
        peak = max(peak, level)
    return peak


def _as_transformers(decoder, device):
    """The same weights as a transformers model (SDPA attention, eval mode: no dropout, like the engine)."""
    import tempfile

    import transformers

    from .loader import save_model

    with tempfile.TemporaryDirectory() as tmp:
        save_model(decoder, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    # the engine's dtype whatever transformers loads by default (fp32 before 5.0, the saved dtype since)
    return hf.to(device=device, dtype=decoder.embed_tokens.weight.dtype).eval()


_POINT_FUNCTIONS = {"time": run_train_point, "tensor_memory": tensor_memory_point,
                    "interleaved": interleaved_stage_timing}


def _run_point(kwargs: dict) -> dict:
    """The point function that `kwargs["measure"]` names (default "time"), called with the rest."""
    kwargs = dict(kwargs)
    return _POINT_FUNCTIONS[kwargs.pop("measure", "time")](**kwargs)


def _point_worker(conn, kwargs: dict) -> None:
    try:
        conn.send(("ok", _run_point(kwargs)))
    except BaseException:  # the parent re-raises it with the point's settings
        import traceback

        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _point_worker_main(kwargs_json: str) -> None:
    """Entry point of a point run in a new interpreter: the result as one `RESULT <json>` line."""
    print("RESULT " + json.dumps(_run_point(json.loads(kwargs_json))))


def fork_server_preload() -> tuple[str, ...]:
    """What the benchmark fork server imports before its first fork: this module and, where transformers
    is installed, transformers and the model module of every `SHAPES` family (a point building the
    transformers contender spent ~1.8 s of ~2 s importing it). One list for every point of a process:
    a running server keeps the preload it started with, so every point carries the same imports."""
    modules = ("coconut_engine.bench",)
    if importlib.util.find_spec("transformers") is not None:
        types = sorted({shape["model_type"] for shape in SHAPES.values()})
        modules += ("transformers", *(f"transformers.models.{t}.modeling_{t}" for t in types))
    return modules


def run_train_point_subprocess(**kwargs) -> dict:
    """`run_train_point` in a fresh child process, so that its peak memory belongs to that point alone;
    `measure="tensor_memory"` runs `tensor_memory_point` and `measure="interleaved"`
    `interleaved_stage_timing` instead.

    Where the platform has it, the child is forked from a fork server (started once, with torch and
    this module imported, that never runs a tensor operation: fast, and every point starts from the
    same resident baseline, which `step_mb` subtracts). Not from this process itself: a process
    forked after OpenMP's thread pool has run deadlocks in its first parallel operation. Elsewhere
    the child is a new interpreter.
    """
    import multiprocessing

    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(list(fork_server_preload()))  # takes effect when the server starts
        receive, send = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_point_worker, args=(send, kwargs))
        proc.start()
        send.close()
        try:
            status, payload = receive.recv()
        except EOFError:  # the child died without a word (killed, out of memory)
            proc.join()
            status, payload = "error", f"the point's process exited with code {proc.exitcode}"
        proc.join()
        if status != "ok":
            raise RuntimeError(f"benchmark point {kwargs} failed:\n{payload}")
        return payload
    code = ("import json,sys; from coconut_engine.bench import _point_worker_main; _point_worker_main(sys.argv[1])")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark point {kwargs} failed:\n{proc.stderr[-3000:]}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def bench_train(shape: str = "tiny", stages=range(0, 7), modes=TRAIN_MODES, batch: int = 8, reps: int = 3,
                device: str = "cpu", backend: str = "auto", prompt_len: int = 250, tensor_memory: str | bool = "last",
                interleave: bool = True, progress=None) -> list[dict]:
    """Every (stage, mode) point: peak memory from a subprocess of its own; step time from one
    subprocess per stage in which the modes take turns (`interleaved_stage_timing`), or with
    `interleave=False` from the point's own subprocess (median of `reps` after a warm-up). On CPU,
    `tensor_memory` says which points also get `tensor_mb` from a further subprocess
    (`tensor_memory_point`, a profiled step): "all", "last" (the
    last stage's points, where a curriculum's memory peaks: one profiled point per mode, the default)
    or "none" (True / False mean "all" / "none"). The subprocesses fork from a fork server, which imports the calling
    script's main module again: a script that calls this needs the `if __name__ == "__main__":`
    guard of any multiprocessing program."""
    modes, stages = list(modes), list(stages)
    tensor_memory = {True: "all", False: "none"}.get(tensor_memory, tensor_memory)
    if tensor_memory not in TENSOR_MEMORY_CHOICES:
        raise ValueError(f"tensor_memory must be one of {TENSOR_MEMORY_CHOICES}, got {tensor_memory!r}")
    profiled = {"all": stages, "last": stages[-1:], "none": []}[tensor_memory]
    if torch.device(device).type != "cpu":
        profiled = []  # the CUDA allocator's peak is exact already
    rows = []
    for stage in stages:
        common = dict(shape=shape, stage=stage, batch=batch, device=device, backend=backend, prompt_len=prompt_len)
        timing = (run_train_point_subprocess(**common, modes=modes, reps=reps, measure="interleaved")
                  if interleave else None)
        for mode in modes:
            # with interleaved timing this process only needs its peak memory: one warm-up and one step
            row = run_train_point_subprocess(**common, mode=mode, reps=1 if interleave else reps)
            if timing is not None:
                row["median_ms"] = timing[mode]
                row["tokens_per_s"] = row["tokens"] / (timing[mode] / 1e3)
            row["timing"] = "interleaved" if interleave else "own process"
            if stage in profiled:
                row.update(run_train_point_subprocess(**common, mode=mode, measure="tensor_memory"))
            rows.append(row)
            if progress is not None:
                progress(row)
    return rows


def format_train_table(rows: list[dict]) -> str:
    """Markdown: one row per stage; per mode the time, the peak memory and (where measured) the exact
    tensor memory."""
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    stages = sorted({r["stage"] for r in rows})
    by = {(r["stage"], r["mode"]): r for r in rows}
    columns = [("median_ms", "ms"), ("peak_mb", "MB")]
    if any("tensor_mb" in r for r in rows):
        columns.append(("tensor_mb", "tensor MB"))
    head = "| stage | " + " | ".join(f"{m} {unit}" for _, unit in columns for m in modes) + " |"
    lines = [head, "|" + "---:|" * (1 + len(columns) * len(modes))]
    for st in stages:
        cells = [f"{by[(st, m)][key]:.0f}" if key in by.get((st, m), {}) else "" for key, _ in columns for m in modes]
        lines.append(f"| {st} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def bench_generate(shape: str = "smollm2-135m", batch: int = 16, prompt_len: int = 128, new_tokens: int = 64,
                   thoughts: int = 6, thought_new_tokens: int = 32, official_questions: int = 2,
                   device: str = "cpu", backend: str = "auto", reps: int = 3, progress=None,
                   dtype: torch.dtype | str | None = None) -> list[dict]:
    """Generation throughput: the engine vs transformers' batched `generate` (plain decoding), and vs
    the official style (one question at a time, no KV cache) with continuous thoughts.

    The official style is linear in the number of questions, so it runs `official_questions` of
    them and reports the per-question rate for the batch. Every contender runs the same weights in
    `dtype` (default `serving_dtype(device)`).
    """
    from .coconut import SpecialTokens
    from .generate import Generator, generate_no_cache

    device = torch.device(device)
    decoder = build_random_model(shape, device=device, dtype=serving_dtype(device, dtype),
                                 attention_backend=backend).eval()
    vocab = decoder.config.vocab_size
    tokens = SpecialTokens(bot=vocab - 3, thought=vocab - 2, eot=vocab - 1)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, vocab - 3, (batch, prompt_len), generator=gen)
    engine = Generator(decoder, max_pages=batch * (-(-(prompt_len + new_tokens + thoughts + 2) // 16)) + 8,
                       page_size=16, special_tokens=tokens)
    rows = []

    def record(name, seconds, generated, note="", model_dtype=decoder.embed_tokens.weight.dtype):
        rows.append({"name": name, "seconds": seconds, "tokens_per_s": generated / seconds, "generated": generated,
                     "dtype": str(model_dtype).removeprefix("torch."), "note": note})
        if progress is not None:
            progress(rows[-1])

    def alternate(fns: dict, reps: int):
        """Median seconds of each callable, run alternately (after one warm-up each)."""
        times = {name: [] for name in fns}
        outs = {name: fn() for name, fn in fns.items()}
        for _ in range(reps):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        return {name: statistics.median(t) for name, t in times.items()}, outs

    def plain_decoding():
        """Engine vs transformers' batched generate, alternating; the HF copy is freed on return."""
        hf = _as_transformers(decoder, device)
        ids = prompts.to(device)

        def hf_generate():
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

        seconds, outs = alternate({"engine": lambda: engine.generate(prompts.tolist(), max_new_tokens=new_tokens),
                                   "transformers": hf_generate}, reps)
        return seconds, outs, hf.dtype

    seconds, outs, hf_dtype = plain_decoding()
    record(f"engine plain B={batch} prompt={prompt_len} new={new_tokens}", seconds["engine"],
           sum(len(r.token_ids) for r in outs["engine"]))
    record(f"transformers generate B={batch} prompt={prompt_len} new={new_tokens}", seconds["transformers"],
           batch * new_tokens, model_dtype=hf_dtype)

    def timed(fn):
        fn()  # warm-up
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out

    seconds, out = timed(lambda: engine.generate(prompts.tolist(), num_thoughts=thoughts,
                                                 max_new_tokens=thought_new_tokens))
    record(f"engine thoughts B={batch} k={thoughts} new={thought_new_tokens}", seconds,
           sum(len(r.token_ids) for r in out))
    t0 = time.perf_counter()
    generated = 0
    for q in prompts[:official_questions].tolist():
        generated += len(generate_no_cache(decoder, q, thoughts, thought_new_tokens, tokens))
    per_question = (time.perf_counter() - t0) / official_questions
    record(f"official style (batch 1, no cache) k={thoughts} new={thought_new_tokens}", per_question * batch,
           generated / official_questions * batch, note=f"measured on {official_questions} questions, x{batch}")
    return rows


def prompt_lengths(batch: int, mean: int, ragged: bool, seed: int = 0) -> list[int]:
    """`batch` prompt lengths: all `mean`, or drawn uniformly from mean +-20 % (ragged, as users send them)."""
    if not ragged:
        return [mean] * batch
    gen = torch.Generator().manual_seed(seed)
    return [int(mean * 0.8) + int(n) for n in torch.randint(0, int(mean * 0.4) + 1, (batch,), generator=gen)]


def bench_decode_steps(shape: str = "smollm2-135m", batches: Sequence[int] = (1, 16, 64), prompt_len: int = 400,
                       steps: int = 5, device: str = "cpu", backend: str = "auto", progress=None,
                       dtype: torch.dtype | str | None = None) -> list[dict]:
    """The time of one greedy decode step (decoder call, LM head, argmax) per batch size, with equal and
    with ragged prompt lengths (+-20 %), the engine against transformers' forward with its cache, both
    continuing from caches of random K/V (no prefill is run: only the steps are timed). For each batch
    the four contenders take turns, `steps` rounds after a warm-up; medians in ms. Weights and caches
    in `dtype` (default `serving_dtype(device)`)."""
    device = torch.device(device)
    decoder = build_random_model(shape, device=device, dtype=serving_dtype(device, dtype),
                                 attention_backend=backend).eval()
    hf = _as_transformers(decoder, device)
    rows = []
    for batch in batches:
        contenders = {}
        for ragged in (False, True):
            lens = prompt_lengths(batch, prompt_len, ragged)
            kind = "ragged" if ragged else "equal"
            contenders[f"engine {kind}"] = _engine_decode_step(decoder, lens, steps + 1)
            contenders[f"transformers {kind}"] = _transformers_decode_step(hf, decoder.config, lens, device)
        times = {name: [] for name in contenders}
        for fn in contenders.values():
            fn()
        for rep in range(steps):
            names = list(contenders)
            for i in range(len(names)):  # the order rotates each round
                name = names[(rep + i) % len(names)]
                t0 = time.perf_counter()
                contenders[name]()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[name].append((time.perf_counter() - t0) * 1e3)
        for name, samples in times.items():
            model_dtype = hf.dtype if name.startswith("transformers") else decoder.embed_tokens.weight.dtype
            rows.append({"batch": batch, "contender": name, "median_ms": statistics.median(samples),
                         "ms_per_token": statistics.median(samples) / batch,
                         "dtype": str(model_dtype).removeprefix("torch.")})
            if progress is not None:
                progress(rows[-1])
    return rows


def _engine_decode_step(decoder, lens: Sequence[int], max_steps: int) -> Callable[[], list[int]]:
    """A decode step of the engine over sequences of `lens` tokens of random K/V, their pages reserved
    as the Generator reserves them (each request's whole life at admission)."""
    from .cache import PagedKVCache

    device = decoder.embed_tokens.weight.device
    cache = PagedKVCache(decoder.config, num_pages=sum(-(-(n + max_steps) // 16) for n in lens), page_size=16,
                         dtype=decoder.embed_tokens.weight.dtype, device=device)
    seqs = list(range(len(lens)))
    for s, n in zip(seqs, lens):
        cache.add_sequence(s)
        cache.reserve(s, n + max_steps)
    cache.prepare(seqs, lens)
    cache.kv.normal_()
    ids = torch.zeros(len(lens), dtype=torch.long, device=device)

    @torch.inference_mode()
    def step():
        batch = cache.prepare(seqs, [1] * len(seqs))
        hidden = decoder(batch, input_ids=ids, cache=cache)
        return decoder.logits(hidden[batch.last_token_indices()]).argmax(-1).tolist()

    return step


def _transformers_decode_step(hf, config, lens: Sequence[int], device) -> Callable[[], list[int]]:
    """A decode step of transformers over a left-padded DynamicCache of random K/V (`lens` real tokens
    per row, as `generate` holds a ragged batch), with its attention mask and positions."""
    from transformers import DynamicCache

    width = max(lens)
    cache = DynamicCache(config=hf.config)
    for layer in range(config.num_layers):
        k, v = (torch.randn(len(lens), config.num_kv_heads, width, config.head_dim, device=device, dtype=hf.dtype)
                for _ in range(2))
        cache.update(k, v, layer)
    mask = (torch.arange(width, device=device)[None, :] >= width - torch.tensor(lens, device=device)[:, None]).long()
    state = {"mask": mask, "pos": torch.tensor(lens, device=device)[:, None]}
    ids = torch.zeros(len(lens), 1, dtype=torch.long, device=device)

    @torch.inference_mode()
    def step():
        state["mask"] = torch.cat([state["mask"], state["mask"].new_ones(len(lens), 1)], dim=1)
        out = hf(input_ids=ids, attention_mask=state["mask"], position_ids=state["pos"], past_key_values=cache,
                 use_cache=True)
        state["pos"] = state["pos"] + 1
        return out.logits[:, -1].argmax(-1).tolist()

    return step
