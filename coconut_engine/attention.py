"""The one attention call of the decoder, and the choice of backend behind it.

Every layer of every step (prefill, a continuous-thought step, a decode step) calls `attention`.
With a cache it stores the step's K/V into the layer's pages, then attends over the pages; without
one it attends over the packed tokens themselves (a full causal forward, used by the no-cache
reference paths). Backends:

- "triton": the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
- "torch": the plain PyTorch reference kernels (any device);
- "auto": triton where it can run, else torch. The env var COCONUT_ATTENTION_BACKEND overrides "auto".
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .cache import AttentionBatch

BACKENDS = ("auto", "triton", "torch")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on `device`."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Turn "auto" (or None) into "triton" or "torch" for `device`; validate explicit choices."""
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get("COCONUT_ATTENTION_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    if name == "auto":
        return "triton" if triton_available(device) else "torch"
    if name == "triton" and not triton_available(device):
        raise ValueError(
            f"attention backend 'triton' cannot run on {device}: use CUDA, or set TRITON_INTERPRET=1 "
            "before anything imports triton to run the kernels in the CPU interpreter"
        )
    return name


def _kernels(backend: str):
    if backend == "triton":
        from .kernels.paged_attention import paged_attention
        from .kernels.store_kv import store_kv
    else:
        from .kernels.reference import paged_attention, store_kv
    return store_kv, paged_attention


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    backend: str,
    cache=None,
    layer: int = 0,
) -> torch.Tensor:
    """Causal attention for one layer of one step; q `[T, heads, D]`, k/v `[T, kv_heads, D]`."""
    if cache is None:
        return varlen_attention(q, k, v, batch, scale)
    store_kv, paged_attention = _kernels(backend)
    k_pool, v_pool = cache.k_pool(layer), cache.v_pool(layer)
    store_kv(k, v, k_pool, v_pool, batch.slot_mapping)
    out = paged_attention(q.to(k_pool.dtype), k_pool, v_pool, batch, scale)
    return out.to(q.dtype)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, scale: float) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens (no cache); autograd-friendly."""
    outs = []
    start = 0
    for n in batch.q_lens:
        if n == 0:
            continue
        seg = slice(start, start + n)
        o = F.scaled_dot_product_attention(
            q[seg].transpose(0, 1), k[seg].transpose(0, 1), v[seg].transpose(0, 1),
            is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        outs.append(o.transpose(0, 1))
        start += n
    return torch.cat(outs) if outs else q.new_empty(q.shape)
