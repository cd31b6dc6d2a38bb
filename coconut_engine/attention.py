"""The one attention call of the decoder, and the choice of backend behind it.

Every layer of every step (prefill, a continuous-thought step, a decode step) calls `attention`.
With a cache it stores the step's K/V into the layer's pages, then attends over the pages; without
one it attends over the packed tokens themselves (a full causal forward, used by the no-cache
reference paths). Backends:

- "triton": the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1);
- "torch": the same contract in vectorised PyTorch (`kernels/torch_backend.py`; any device);
- "auto": triton where it can run, else torch. The env var COCONUT_ATTENTION_BACKEND overrides "auto".

Attention-probability dropout (`kernels/dropout.py`) is an argument of the call: every path (the
kernels, the contiguous cache of the multipass mode, the no-cache attention) draws the same mask
for the same (sequence row, head, query position, key position).
"""
from __future__ import annotations

import functools
import os
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .cache import AttentionBatch, ContiguousKVCache
from .errors import InvalidArgumentError
from .kernels._launch import interpreting
from .kernels.dropout import AttentionDropout, dropout_attention
from .kernels.torch_backend import as_dtype

BACKENDS = ("auto", "triton", "torch")


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (compiled on CUDA, or interpreted)."""
    if interpreting():
        return True
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_preferred(device: torch.device) -> bool:
    """What "auto" picks Triton for: compiled kernels on CUDA, the interpreter for CPU tensors (tests).
    Interpreted kernels on CUDA tensors would run, slowly, through host copies: auto uses torch there."""
    if interpreting():
        return device.type != "cuda"
    return triton_available(device)


def resolve_backend(requested: str | None, device: torch.device) -> str:
    """Turn "auto" (or None) into "triton" or "torch" for `device`; validate explicit choices."""
    name = requested or "auto"
    if name == "auto":
        name = os.environ.get("COCONUT_ATTENTION_BACKEND", "auto")
    if name not in BACKENDS:
        source = f"COCONUT_ATTENTION_BACKEND={name!r}" if (requested or "auto") == "auto" else f"attention backend {name!r}"
        raise InvalidArgumentError(f"{source} is not one of {BACKENDS}")
    if name == "auto":
        return "triton" if triton_preferred(device) else "torch"
    if name == "triton" and not triton_available(device):
        raise InvalidArgumentError(
            f"attention backend 'triton' cannot run on {device}: use CUDA, or set TRITON_INTERPRET=1 "
            "before anything imports triton to run the kernels in the CPU interpreter"
        )
    return name


@dataclass(frozen=True)
class KernelSet:
    """The three operations of one backend on one device type, with the signatures of `kernels/reference.py`."""

    store_kv: Callable
    paged_attention: Callable
    paged_attention_backward: Callable
    backward_needs_lse: bool  # False: the backward recomputes the softmax, so the forward can skip the lse


@functools.lru_cache(maxsize=None)
def kernel_set(backend: str, device_type: str = "cpu") -> KernelSet:
    """The operations of a backend for tensors on `device_type` (resolved once, not per layer call)."""
    if backend == "triton":
        from .kernels.paged_attention import paged_attention
        from .kernels.paged_attention_bwd import paged_attention_backward
        from .kernels.store_kv import store_kv

        return KernelSet(store_kv, paged_attention, paged_attention_backward, backward_needs_lse=True)
    from .kernels import torch_backend

    return KernelSet(torch_backend.store_kv, torch_backend.paged_attention, torch_backend.paged_attention_backward,
                     backward_needs_lse=torch_backend.uses_fused_kernels(torch.device(device_type)))


class _StoreAttention(torch.autograd.Function):
    """One layer of one training step as one autograd node: write the step's K/V into the pools,
    attend over the pages; saves only q, o and the log-sum-exp (never a copy of the cache).

    Backward: the attention's backward (dq; dK/dV added into the gradient pages at every slot it
    read), then this step's K/V gradients gathered from the gradient pages at the slots it wrote.
    The 0-d dependency token, threaded through every layer and step in forward order, makes
    autograd run this node's backward after that of every later node that read these slots, so
    the gathered rows are complete. (One node instead of a store node and an attention node: a
    one-token thought step of a small batch is bound by per-node and per-op costs.)
    """

    @staticmethod
    def forward(ctx, q, k, v, dependency, cache, layer: int, batch: AttentionBatch, scale: float, ops: KernelSet,
                dropout: AttentionDropout | None):
        k_pool, v_pool = cache.k_pool(layer), cache.v_pool(layer)
        ops.store_kv(k.detach(), v.detach(), k_pool, v_pool, batch.slot_mapping, every_slot_valid=batch.every_slot_valid)
        # Every slot an attention reads in this training step was written by a store of this step,
        # so zeroing the written slots' gradient rows here keeps the gradient pages clean.
        cache.grad_kv_slots(layer).index_fill_(1, batch.slot_mapping, 0)  # K's and V's rows in one op
        ctx.dtypes = (q.dtype, k.dtype, v.dtype)
        q = _own_storage(as_dtype(q.detach(), cache.kv.dtype))
        if ops.backward_needs_lse:
            out, lse = ops.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True, dropout=dropout)
        else:
            out = ops.paged_attention(q, k_pool, v_pool, batch, scale, dropout=dropout)
            lse = None
        ctx.save_for_backward(q, out, lse)  # lse may be None
        # The pools' views, and the cache only weakly: the cache holds this node through its dependency
        # token, and a strong reference back would be a cycle through autograd that Python's collector
        # cannot see, leaking every replaced training pool (with its gradient pages).
        ctx.pools = (k_pool, v_pool, cache.grad_k_pool(layer), cache.grad_v_pool(layer))
        ctx.cache_ref, ctx.generation = weakref.ref(cache), cache.generation
        ctx.batch, ctx.scale, ctx.ops = batch, scale, ops
        ctx.dropout = dropout  # the seed and rows: the backward draws the same mask again
        return out, dependency.detach().clone()  # a new token: the next node's backward comes before this one's

    @staticmethod
    def backward(ctx, grad_out, _):
        if ctx.pools is None:
            raise RuntimeError("a paged training step cannot be backpropagated twice (retain_graph): its "
                               "backward releases the cache's pages")
        q, out, lse = ctx.saved_tensors
        cache = ctx.cache_ref()
        if cache is not None:  # a cache dropped since the forward cannot have been reused
            _check_generation(cache, ctx.generation)
        k_pool, v_pool, grad_k_pool, grad_v_pool = ctx.pools
        # released now, not when the graph is: a caller that keeps the loss must not keep the pool alive
        ctx.pools = None
        # the kernels choose their own dtypes (fp32 gradient pages): a backward called inside an autocast
        # region must not recast their matmuls
        with torch.autocast(q.device.type, enabled=False):
            grad_q = ctx.ops.paged_attention_backward(grad_out, q, out, lse, k_pool, v_pool, grad_k_pool,
                                                      grad_v_pool, ctx.batch, ctx.scale, dropout=ctx.dropout)
        # one gather per pool: a gather across both (a strided view) would copy the layer's whole gradient pages first
        slots = ctx.batch.slot_mapping
        grad_k = grad_k_pool.flatten(0, 1).index_select(0, slots)
        grad_v = grad_v_pool.flatten(0, 1).index_select(0, slots)
        return (as_dtype(grad_q, ctx.dtypes[0]), as_dtype(grad_k, ctx.dtypes[1]), as_dtype(grad_v, ctx.dtypes[2]),
                None, None, None, None, None, None, None)


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied if it is a view into a larger tensor. Attention saves q for the backward; as a view of
    the fused q/k/v projection it would keep that whole tensor alive, whose K/V part the pages hold."""
    if t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _check_generation(cache, generation: int) -> None:
    if cache.generation != generation:
        raise RuntimeError(
            "the paged KV cache was reused (begin_training_step) before the backward of an earlier forward "
            "ran: backpropagate each paged forward before starting the next one"
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    backend: str,
    cache=None,
    layer: int = 0,
    dropout: AttentionDropout | None = None,
) -> torch.Tensor:
    """Causal attention for one layer of one step; q `[T, heads, D]`, k/v `[T, kv_heads, D]`.

    `dropout` (training only) drops attention probabilities; None computes none of it."""
    if cache is None:
        return varlen_attention(q, k, v, batch, scale, dropout)
    if isinstance(cache, ContiguousKVCache):
        return cache.attend(q, k, v, batch, layer, scale, dropout)
    ops = kernel_set(backend, q.device.type)
    pool_dtype = cache.kv.dtype
    if cache.tracks_gradients and torch.is_grad_enabled():
        out, cache.dependency = _StoreAttention.apply(q, k, v, cache.dependency, cache, layer, batch, scale, ops,
                                                      dropout)
        return as_dtype(out, q.dtype)
    # a pool without gradient pages under autograd: the forward runs off the graph, its backward is refused
    graph_inputs = (q, k, v) if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad) \
        else None
    if graph_inputs is not None:
        q, k, v = q.detach(), k.detach(), v.detach()
    ops.store_kv(k, v, cache.k_pool(layer), cache.v_pool(layer), batch.slot_mapping,
                 every_slot_valid=batch.every_slot_valid)
    out = as_dtype(ops.paged_attention(as_dtype(q, pool_dtype), cache.k_pool(layer), cache.v_pool(layer), batch, scale,
                                       dropout=dropout), q.dtype)
    return out if graph_inputs is None else _NoGradientPages.apply(out, *graph_inputs)


class _NoGradientPages(torch.autograd.Function):
    """Attention over a pool without gradient pages, run with gradients enabled (a forward outside
    no_grad on an inference cache): the forward is right, but K/V gradients have nowhere to collect,
    so a backward through it is refused instead of returning partial gradients."""

    @staticmethod
    def forward(ctx, out, q, k, v):
        return out

    @staticmethod
    def backward(ctx, grad_out):
        raise RuntimeError("backward through attention over a PagedKVCache made without requires_grad=True: "
                           "its K/V gradients have no pages to collect in; train with a cache that has them "
                           "(CoconutModel's paged mode makes one), or run inference under torch.no_grad()")


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, scale: float,
                     dropout: AttentionDropout | None = None) -> torch.Tensor:
    """Causal attention of each packed sequence over its own tokens (no cache); autograd-friendly.
    Token positions are `batch.positions` (those the dropout mask is drawn for)."""
    outs = []
    start = 0
    for b, n in enumerate(batch.q_lens):
        if n == 0:
            continue
        seg = slice(start, start + n)
        if dropout is not None:
            pos = batch.positions[seg][None]
            causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril_()
            o = dropout_attention(q[seg].transpose(0, 1)[None], k[seg].transpose(0, 1)[None],
                                  v[seg].transpose(0, 1)[None], causal, scale, dropout, dropout.rows[b : b + 1], pos, pos)
            outs.append(o[0].transpose(0, 1))
            start += n
            continue
        # 4-D [1, heads, n, D]: SDPA's fused (flash) kernels take only batched inputs
        o = F.scaled_dot_product_attention(
            q[seg].transpose(0, 1).unsqueeze(0), k[seg].transpose(0, 1).unsqueeze(0),
            v[seg].transpose(0, 1).unsqueeze(0), is_causal=True, scale=scale, enable_gqa=q.shape[1] != k.shape[1],
        )
        outs.append(o[0].transpose(0, 1))
        start += n
    return torch.cat(outs) if outs else q.new_empty(q.shape)
