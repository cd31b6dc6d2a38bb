"""Plain PyTorch versions of the kernels, with the same signatures.

They are the oracle of the kernel tests (the "torch" backend, `torch_backend.py`, is the vectorised
counterpart). They loop over sequences in Python: clear rather than fast.
"""
from __future__ import annotations

import torch

from .dropout import AttentionDropout, dropped, keep_mask


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
             every_slot_valid: bool = False) -> None:
    """Write `k`, `v` (`[T, kv_heads, head_dim]`) into the pools at `slot_mapping` (-1 = skip;
    `every_slot_valid`, the caller's promise that none is, changes nothing here)."""
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    k_pool.view(-1, *k_pool.shape[2:])[slots] = k[valid].to(k_pool.dtype)
    v_pool.view(-1, *v_pool.shape[2:])[slots] = v[valid].to(v_pool.dtype)


def gather_pages(pool: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` token rows of one sequence's pages, `[length, kv_heads, head_dim]`."""
    page_size = pool.shape[1]
    pos = torch.arange(length, device=pool.device)
    slots = block_table_row[pos // page_size].long() * page_size + pos % page_size
    return pool.reshape(-1, *pool.shape[2:])[slots]


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    batch,
    scale: float,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    dropout: AttentionDropout | None = None,
):
    """Causal GQA attention of the packed queries `q` (`[T, heads, head_dim]`) over the pages.

    Returns `out` (`[T, heads, head_dim]`, q's dtype), and the natural-log log-sum-exp
    (`[T, heads]`, fp32, of the probabilities before dropout) when `return_lse`. `dropout` drops
    attention probabilities by the mask of `kernels/dropout.py`.
    """
    num_heads = q.shape[1]
    group = num_heads // k_pool.shape[2]
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    start = 0
    for b, (q_len, k_len) in enumerate(zip(batch.q_lens, batch.k_lens)):
        if q_len == 0:
            continue
        o_b, lse_b = attend_one(q[start : start + q_len], gather_pages(k_pool, batch.block_table[b], k_len),
                                gather_pages(v_pool, batch.block_table[b], k_len), group, scale,
                                dropout, None if dropout is None else dropout.rows[b])
        out[start : start + q_len] = o_b.to(out.dtype)
        if lse is not None:
            lse[start : start + q_len] = lse_b
        start += q_len
    return (out, lse) if return_lse else out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float,
               dropout: AttentionDropout | None = None, row: torch.Tensor | None = None):
    """One sequence: q `[q_len, heads, D]` over k, v `[k_len, kv_heads, D]`, bottom-right causal.

    Computes in fp32; returns (out fp32 `[q_len, heads, D]`, lse fp32 `[q_len, heads]`). With `dropout`,
    the probabilities are dropped by the mask of the sequence's mask `row`.
    """
    q_len, k_len = q.shape[0], k.shape[0]
    k = k.float().repeat_interleave(group, dim=1)
    v = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    q_pos = torch.arange(k_len - q_len, k_len, device=q.device)
    mask = torch.arange(k_len, device=q.device)[None, :] > q_pos[:, None]
    scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if dropout is not None:
        heads = torch.arange(q.shape[1], device=q.device)
        keep = keep_mask(dropout, row, heads[:, None, None], q_pos[None, :, None], torch.arange(k_len, device=q.device))
        probs = dropped(probs, keep, dropout)
    return torch.einsum("hqk,khd->qhd", probs, v), lse.transpose(0, 1)
