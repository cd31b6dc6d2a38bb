"""What `coconut-engine bench` runs: timings of the engine's parts, importable by benchmarks/.

`kernels`: paged attention (Triton on CUDA, the PyTorch reference elsewhere) against
`scaled_dot_product_attention` on contiguous K/V, with achieved bandwidth (decode) and TFLOP/s (extend).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from .cache import AttentionBatch


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
        from .kernels.reference import paged_attention
    impl = "triton" if on_gpu else "torch-reference"
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
