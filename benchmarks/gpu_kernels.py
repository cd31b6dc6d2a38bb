"""GPU kernel benchmark for benchmarks/gpu_check.sh: paged attention (Triton) next to SDPA and the torch backend.

- decode: GB/s of K/V read, as a fraction of the measured device copy bandwidth, for batch {1, 4, 64}
  x context {4k, 32k} x kv heads {2, 8} (4 query heads per kv head, head_dim 128, bf16, page 16);
- prefill (extend from an empty cache) and a one-token step's backward: Triton vs SDPA vs the torch backend.

Each row is printed (markdown) as soon as it is measured, so a time box that ends the run keeps what it has.
Usage: python benchmarks/gpu_kernels.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from coconut_engine.bench import copy_bandwidth_gbs, time_fn
from coconut_engine.cache import AttentionBatch
from coconut_engine.kernels import torch_backend
from coconut_engine.kernels.paged_attention import paged_attention
from coconut_engine.kernels.paged_attention_bwd import paged_attention_backward


def problem(batch: int, context: int, q_len: int, kv_heads: int, group: int, head_dim: int, page: int,
            dtype: torch.dtype, device: torch.device):
    """q, K/V pools (pages permuted, built on the device) and the AttentionBatch of `batch` sequences of
    `context` keys whose last `q_len` tokens are new; plus the same K/V contiguous for SDPA."""
    pages_per_seq = -(-context // page)
    num_pages = batch * pages_per_seq
    table = torch.randperm(num_pages, device=device).view(batch, pages_per_seq).to(torch.int32)
    k_pool = torch.randn(num_pages, page, kv_heads, head_dim, device=device, dtype=dtype)
    v_pool = torch.randn_like(k_pool)
    q = torch.randn(batch * q_len, kv_heads * group, head_dim, device=device, dtype=dtype)
    meta = AttentionBatch(
        cu_seqlens_q=torch.arange(0, batch * q_len + 1, q_len, dtype=torch.int32, device=device),
        seq_lens_k=torch.full((batch,), context, dtype=torch.int32, device=device),
        block_table=table, slot_mapping=torch.full((batch * q_len,), -1, dtype=torch.int64, device=device),
        positions=torch.arange(context - q_len, context, device=device).repeat(batch),
        max_seqlen_q=q_len, max_seqlen_k=context, q_lens=(q_len,) * batch, k_lens=(context,) * batch)
    return q, k_pool, v_pool, meta


def contiguous(pool: torch.Tensor, meta: AttentionBatch) -> torch.Tensor:
    """`[B, kv_heads, context, D]` copy of a pool's sequences, for SDPA."""
    b, ctx = meta.block_table.shape[0], meta.max_seqlen_k
    return pool[meta.block_table.long()].reshape(b, -1, *pool.shape[2:])[:, :ctx].transpose(1, 2).contiguous()


def row(*cells) -> None:
    print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def bench_decode(device, dtype, copy_gbs: float, quick: bool) -> None:
    row("decode B x ctx x kv heads", "triton ms", "triton GB/s", "of copy BW", "SDPA ms", "SDPA GB/s")
    row("---", "---:", "---:", "---:", "---:", "---:")
    for kv_heads in (2, 8):
        for context in (4096, 32768):
            for batch in (1, 4, 64):
                if quick and batch * context > 4 * 32768:
                    continue
                q, k_pool, v_pool, meta = problem(batch, context, 1, kv_heads, 4, 128, 16, dtype, device)
                scale = 128 ** -0.5
                nbytes = 2 * batch * context * kv_heads * 128 * k_pool.element_size()
                ms = time_fn(lambda: paged_attention(q, k_pool, v_pool, meta, scale), device)
                k, v = contiguous(k_pool, meta), contiguous(v_pool, meta)
                del k_pool, v_pool
                qd = q.view(batch, 1, -1, 128).transpose(1, 2)
                sdpa = time_fn(lambda: F.scaled_dot_product_attention(qd, k, v, scale=scale, enable_gqa=True), device)
                gbs, sdpa_gbs = nbytes / ms / 1e6, nbytes / sdpa / 1e6
                row(f"{batch} x {context} x {kv_heads}", f"{ms:.3f}", f"{gbs:.0f}", f"{gbs / copy_gbs:.0%}",
                    f"{sdpa:.3f}", f"{sdpa_gbs:.0f}")
                del q, k, v, meta
                torch.cuda.empty_cache()


def bench_prefill_and_backward(device, dtype) -> None:
    row("kernel (bf16, kv heads 8, group 4, head_dim 128)", "triton ms", "torch backend ms", "SDPA ms")
    row("---", "---:", "---:", "---:")
    scale = 128 ** -0.5
    batch, q_len = 8, 1024
    q, k_pool, v_pool, meta = problem(batch, q_len, q_len, 8, 4, 128, 16, dtype, device)
    k, v = contiguous(k_pool, meta), contiguous(v_pool, meta)
    qs = q.view(batch, q_len, -1, 128).transpose(1, 2)
    tri = time_fn(lambda: paged_attention(q, k_pool, v_pool, meta, scale, return_lse=True), device)
    ref = time_fn(lambda: torch_backend.paged_attention(q, k_pool, v_pool, meta, scale, return_lse=True), device)
    sdpa = time_fn(lambda: F.scaled_dot_product_attention(qs, k, v, scale=scale, is_causal=True, enable_gqa=True),
                   device)
    row(f"prefill B={batch} q={q_len} (with lse)", f"{tri:.3f}", f"{ref:.3f}", f"{sdpa:.3f}")

    batch, context = 32, 4096
    q, k_pool, v_pool, meta = problem(batch, context, 1, 8, 4, 128, 16, dtype, device)
    out, lse = paged_attention(q, k_pool, v_pool, meta, scale, return_lse=True)
    dout = torch.randn_like(out)
    grad_k = torch.zeros(k_pool.shape, dtype=torch.float32, device=device)
    grad_v = torch.zeros_like(grad_k)
    args = (dout, q, out, lse, k_pool, v_pool, grad_k, grad_v, meta, scale)
    tri = time_fn(lambda: paged_attention_backward(*args), device)
    ref = time_fn(lambda: torch_backend.paged_attention_backward(*args), device)
    k, v = (contiguous(p, meta).requires_grad_() for p in (k_pool, v_pool))
    qs = q.view(batch, 1, -1, 128).transpose(1, 2).detach().requires_grad_()
    o = F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=True)
    do = dout.view(batch, 1, -1, 128).transpose(1, 2)
    sdpa = time_fn(lambda: torch.autograd.grad(o, (qs, k, v), do, retain_graph=True), device)
    row(f"one-token backward B={batch} ctx={context}", f"{tri:.3f}", f"{ref:.3f}", f"{sdpa:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the decode points over 128k keys in total")
    parser.add_argument("--part", choices=["decode", "other", "all"], default="all")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 2
    device, dtype = torch.device("cuda"), torch.bfloat16
    if args.part in ("other", "all"):
        bench_prefill_and_backward(device, dtype)
    if args.part in ("decode", "all"):
        copy_gbs = copy_bandwidth_gbs(device)
        print(f"\ndevice-to-device copy: {copy_gbs:.0f} GB/s\n", flush=True)
        bench_decode(device, dtype, copy_gbs, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
