"""Attention-probability dropout whose mask is a pure function of logical coordinates.

As in FlashAttention, no mask is stored: whether probability (query i, key j) of one head of one
sequence is kept is a counter-based hash of (seed, sequence row, head, query position, key position),
recomputed wherever it is needed (the forward, the backward, every backend). The positions are the
absolute ones of the sequence and the row is the sequence's identity in the training forward (the
sample's index), not where the step puts it in the packed batch or the pool: every training mode,
however it splits the work into steps and pages, draws the same mask for the same (row, head, q, k).

The hash is 32-bit integer arithmetic, a two-round xorshift-multiply finaliser (the form of Wellons'
"lowbias32") chained over the coordinates, written here once for Python ints and int64 tensors; the
Triton kernels compute the same function in uint32 (`paged_attention._dropout_keep`). Its multipliers
are below 2**31, so that a product of a 32-bit value and one of them is exact in int64. Probability (i, j) is kept when the hash's top 24 bits are
at least `threshold = int(p * 2**24)`; kept values are scaled by 1 / (1 - p).

This module does not import Triton.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from coconut_engine.errors import InvalidArgumentError

MASK32 = 0xFFFFFFFF
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97
THRESHOLD_BITS = 24  # the keep test compares the hash's top 24 bits


def mix32(x):
    """The 32-bit hash finaliser (a bijection of [0, 2**32)), for a Python int or an int64 tensor of values
    in [0, 2**32) (not modified: the in-place steps below work on the first step's new tensor)."""
    x = x ^ (x >> 16)
    x *= MIX_MUL_1
    x &= MASK32
    x ^= x >> 15
    x *= MIX_MUL_2
    x &= MASK32
    x ^= x >> 15
    return x


def layer_seed(seed: int, layer: int) -> int:
    """The seed of one layer's mask, derived on the host from the forward's seed (each layer draws its own)."""
    return mix32((seed ^ mix32((layer + 1) & MASK32)) & MASK32)


def as_int32(value: int) -> int:
    """A 32-bit pattern as the signed int a kernel argument of type int32 carries (bit-cast back there)."""
    return value - (1 << 32) if value >= 1 << 31 else value


@dataclass(frozen=True)
class AttentionDropout:
    """Dropout on one layer's attention probabilities in one step.

    `rows` (int32 `[B]`, on the step's device) is each sequence's mask row: its identity in the training
    forward (the sample's index), the same whichever step or batch position the mode gives it.
    """

    p: float
    seed: int  # 32-bit, already this layer's (`layer_seed`)
    rows: torch.Tensor

    def __post_init__(self):
        if not 0.0 < self.p < 1.0:
            raise InvalidArgumentError(f"AttentionDropout: p must be in (0, 1), got {self.p}")
        if not 0 <= self.seed <= MASK32:
            raise InvalidArgumentError(f"AttentionDropout: seed must be a 32-bit value, got {self.seed}")

    @property
    def threshold(self) -> int:
        """Hashes whose top 24 bits fall below this are dropped."""
        return int(self.p * (1 << THRESHOLD_BITS))

    @property
    def scale(self) -> float:
        """What kept probabilities are multiplied by."""
        return 1.0 / (1.0 - self.p)


def keep_mask(dropout: AttentionDropout, rows: torch.Tensor, heads: torch.Tensor, q_pos: torch.Tensor,
              k_pos: torch.Tensor) -> torch.Tensor:
    """Boolean keep mask over the broadcast of `rows`, `heads`, `q_pos`, `k_pos` (integer tensors whose
    shapes broadcast together, e.g. `[B,1,1,1]`, `[1,H,1,1]`, `[B,1,Q,1]`, `[1,1,1,K]`)."""
    h = mix32(dropout.seed ^ rows.long())
    h = mix32(h ^ heads.long())
    h = mix32(h ^ q_pos.long())
    h = mix32(h ^ k_pos.long())
    return (h >> (32 - THRESHOLD_BITS)) >= dropout.threshold


def dropped(probs: torch.Tensor, keep: torch.Tensor, dropout: AttentionDropout) -> torch.Tensor:
    """`probs` with the dropped entries zeroed and the kept ones scaled by 1 / (1 - p) (differentiable)."""
    return torch.where(keep, probs * dropout.scale, torch.zeros((), dtype=probs.dtype, device=probs.device))


def dropout_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                      dropout: AttentionDropout, rows: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor
                      ) -> torch.Tensor:
    """Attention with dropped probabilities, differentiable, heads first: q `[B, heads, Q, D]`, k/v
    `[B, kv_heads, K, D]`, `visible` (bool) broadcastable to `[B, heads, Q, K]`; the mask is drawn for mask
    rows `rows` `[B]`, query positions `q_pos` `[B, Q]` and key positions `k_pos` `[B, K]`. Computed in
    fp32; like SDPA it keeps q, k, v and the output for its backward, which recomputes the probabilities
    and the mask (never a `[B, heads, Q, K]` tensor per layer kept alive)."""
    return _DropoutAttention.apply(q, k, v, visible, scale, dropout, rows, q_pos, k_pos)


def _probabilities(q, k, visible, scale: float, dropout: AttentionDropout, rows, q_pos, k_pos):
    """(softmax probabilities fp32, keep mask), `[B, heads, Q, K]`; kv heads repeated for GQA."""
    k = k.float().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q.float(), k.transpose(-1, -2)).mul_(scale)
    # a finite minimum: a row of left padding (multipass) sees no key and must stay finite
    probs = torch.softmax(scores.masked_fill_(~visible, torch.finfo(scores.dtype).min), dim=-1)
    heads = torch.arange(q.shape[1], device=q.device)
    keep = keep_mask(dropout, rows[:, None, None, None], heads[None, :, None, None], q_pos[:, None, :, None],
                     k_pos[:, None, None, :])
    return probs, keep


class _DropoutAttention(torch.autograd.Function):
    """`dropout_attention` as one autograd node (fp32 inside, autocast off)."""

    @staticmethod
    def forward(ctx, q, k, v, visible, scale, dropout, rows, q_pos, k_pos):
        with torch.autocast(q.device.type, enabled=False):
            probs, keep = _probabilities(q, k, visible, scale, dropout, rows, q_pos, k_pos)
            group = q.shape[1] // k.shape[1]
            out = torch.matmul(dropped(probs, keep, dropout), v.float().repeat_interleave(group, dim=1))
        ctx.save_for_backward(q, k, v, visible, rows, q_pos, k_pos)
        ctx.scale, ctx.dropout = scale, dropout
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, visible, rows, q_pos, k_pos = ctx.saved_tensors
        dropout, scale = ctx.dropout, ctx.scale
        group = q.shape[1] // k.shape[1]
        with torch.autocast(q.device.type, enabled=False):
            probs, keep = _probabilities(q, k, visible, scale, dropout, rows, q_pos, k_pos)
            dout = dout.float()
            dv = torch.matmul(dropped(probs, keep, dropout).transpose(-1, -2), dout)
            # the gradient of the probabilities before dropout (through the kept entries), then the softmax's
            dp = dropped(torch.matmul(dout, v.float().repeat_interleave(group, dim=1).transpose(-1, -2)), keep, dropout)
            ds = probs.mul_(dp.sub_((probs * dp).sum(-1, keepdim=True)))
            ds.masked_fill_(~visible, 0.0)  # the masked scores were constants (a row that sees nothing: all)
            dq = torch.matmul(ds, k.float().repeat_interleave(group, dim=1)).mul_(scale)
            dk = torch.matmul(ds.transpose(-1, -2), q.float()).mul_(scale)
            if group > 1:
                b, h, n, d = dk.shape
                dk = dk.view(b, h // group, group, n, d).sum(2)
                dv = dv.view(b, h // group, group, n, d).sum(2)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None
