"""Plain PyTorch versions of the kernels, with the same signatures.

They are the oracle of the kernel tests and the attention of the "torch" backend. They loop over
sequences in Python: clear rather than fast.
"""
from __future__ import annotations

import torch


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write `k`, `v` (`[T, kv_heads, head_dim]`) into the pools at `slot_mapping` (-1 = skip)."""
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
):
    """Causal GQA attention of the packed queries `q` (`[T, heads, head_dim]`) over the pages.

    Returns `out` (`[T, heads, head_dim]`, q's dtype), and the natural-log log-sum-exp
    (`[T, heads]`, fp32) when `return_lse`.
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
                                gather_pages(v_pool, batch.block_table[b], k_len), group, scale)
        out[start : start + q_len] = o_b.to(out.dtype)
        if lse is not None:
            lse[start : start + q_len] = lse_b
        start += q_len
    return (out, lse) if return_lse else out


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, group: int, scale: float):
    """One sequence: q `[q_len, heads, D]` over k, v `[k_len, kv_heads, D]`, bottom-right causal.

    Computes in fp32; returns (out fp32 `[q_len, heads, D]`, lse fp32 `[q_len, heads]`).
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
    return torch.einsum("hqk,khd->qhd", probs, v), lse.transpose(0, 1)


def _padded_kv(pool: torch.Tensor, batch) -> torch.Tensor:
    """Every sequence's K or V gathered through the block table, `[B, kv_heads, max_k, D]` (junk past k_len)."""
    page_size = pool.shape[1]
    num_pages = -(-batch.max_seqlen_k // page_size)
    table = batch.block_table[:, :num_pages].reshape(-1)
    rows = pool.flatten(1).index_select(0, table).view(batch.num_seqs, num_pages * page_size, *pool.shape[2:])
    return rows[:, : batch.max_seqlen_k].transpose(1, 2)


def _visible(batch, device) -> torch.Tensor:
    """Causal visibility `[B, 1, max_q, max_k]`: padded query row i of sequence b sees key j.

    Key 0 is visible to every row, so that padding rows (which nothing reads) are never fully
    masked; real rows see key 0 anyway. Built once per step.
    """
    def build():
        q_lens = torch.tensor(batch.q_lens, device=device)
        k_lens = torch.tensor(batch.k_lens, device=device)
        i = torch.arange(batch.max_seqlen_q, device=device)
        j = torch.arange(batch.max_seqlen_k, device=device)
        q_pos = (k_lens - q_lens)[:, None] + i[None, :]
        seen = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < k_lens[:, None, None])
        return (seen | (j == 0))[:, None]

    return batch.memo("visible", build)


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _pad_rows(x: torch.Tensor, batch) -> torch.Tensor:
    """Packed rows `[T, ...]` -> `[B, max_q, ...]` (zeros past each sequence's new tokens)."""
    seq_idx, row_idx = batch.token_rows()
    out = x.new_zeros(batch.num_seqs, batch.max_seqlen_q, *x.shape[1:])
    out[seq_idx, row_idx] = x
    return out


def paged_attention_batched(q, k_pool, v_pool, batch, scale: float, return_lse: bool = False, out=None):
    """Same result as `paged_attention`, vectorised over the batch: the "torch" backend.

    K/V are gathered once into a padded `[B, kv_heads, max_k, D]` tensor; new tokens are padded to
    `[B, heads, max_q, D]`. Without `return_lse` it calls SDPA (fast on CPU and GPU).
    """
    import torch.nn.functional as F

    if out is None:
        out = torch.empty_like(q)
    group = q.shape[1] // k_pool.shape[2]
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    if batch.num_tokens == 0:
        return (out, lse) if return_lse else out
    if not return_lse and _fresh(batch) and len(set(batch.q_lens)) > 1 and batch.max_seqlen_q >= FRESH_PREFILL_MIN_TOKENS:
        return _fresh_prefill(q, k_pool, v_pool, batch, scale, out)
    seq_idx, row_idx = batch.token_rows()
    q_pad = _pad_rows(q, batch).transpose(1, 2)
    k, v = _padded_kv(k_pool, batch), _padded_kv(v_pool, batch)
    visible = _visible(batch, q.device)
    if return_lse:
        scores = torch.matmul(q_pad.float(), _repeat_kv(k.float(), group).transpose(-1, -2)) * scale
        scores = scores.masked_fill_(~visible, float("-inf"))
        lse_pad = torch.logsumexp(scores, dim=-1)
        probs = torch.exp_(scores.sub_(lse_pad[..., None]))
        o_pad = torch.matmul(probs, _repeat_kv(v.float(), group))
        lse[:] = lse_pad.transpose(1, 2)[seq_idx, row_idx]
    else:
        k, v = k.to(q.dtype), v.to(q.dtype)
        same_lengths = len(set(batch.q_lens)) == 1 and len(set(batch.k_lens)) == 1
        if same_lengths and batch.max_seqlen_q in (1, batch.max_seqlen_k):
            # decode over equal lengths sees every key; a prefill from empty is plain causal: no mask
            o_pad = F.scaled_dot_product_attention(q_pad, k, v, is_causal=batch.max_seqlen_q > 1, scale=scale,
                                                   enable_gqa=group > 1)
        elif batch.max_seqlen_q == 1:
            o_pad = _decode_attention(q_pad, k, v, visible, group, scale)
        else:
            o_pad = F.scaled_dot_product_attention(q_pad, k, v, attn_mask=visible, scale=scale, enable_gqa=group > 1)
    out[: batch.num_tokens] = o_pad.transpose(1, 2)[seq_idx, row_idx].to(out.dtype)
    return (out, lse) if return_lse else out


# A prefill from empty this long runs per sequence (flash SDPA, no padding); shorter ones are cheaper
# padded in one call (a per-sequence loop costs more in call overhead than the padding wastes).
FRESH_PREFILL_MIN_TOKENS = 128


def _fresh(batch) -> bool:
    """A prefill from empty: every sequence's keys are exactly this step's new tokens."""
    return all(q == k for q, k in zip(batch.q_lens, batch.k_lens))


def _step_rows(pool: torch.Tensor, batch) -> torch.Tensor:
    """This step's new K or V rows, packed like q (read back from the pool at the step's slots)."""
    return pool.reshape(-1, *pool.shape[2:])[batch.slot_mapping]


def _fresh_prefill(q, k_pool, v_pool, batch, scale: float, out) -> torch.Tensor:
    """A ragged prefill from empty: plain causal SDPA per sequence over its own rows (no padding, no mask)."""
    import torch.nn.functional as F

    k, v = _step_rows(k_pool, batch).to(q.dtype), _step_rows(v_pool, batch).to(q.dtype)
    group = q.shape[1] // k.shape[1]
    start = 0
    for n in batch.q_lens:
        if n:
            rows = slice(start, start + n)
            o = F.scaled_dot_product_attention(q[rows].transpose(0, 1), k[rows].transpose(0, 1), v[rows].transpose(0, 1),
                                               is_causal=True, scale=scale, enable_gqa=group > 1)
            out[rows] = o.transpose(0, 1).to(out.dtype)
            start += n
    return out


def _fresh_prefill_backward(dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float) -> torch.Tensor:
    """Backward of `_fresh_prefill`: re-run each sequence's causal SDPA under autograd (flash backward),
    then add dK/dV into the gradient pages at the step's slots."""
    import torch.nn.functional as F

    k, v = _step_rows(k_pool, batch).to(q.dtype), _step_rows(v_pool, batch).to(q.dtype)
    group = q.shape[1] // k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    start = 0
    with torch.enable_grad():
        for n in batch.q_lens:
            if not n:
                continue
            rows = slice(start, start + n)
            q_b, k_b, v_b = (t[rows].detach().transpose(0, 1).requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=scale, enable_gqa=group > 1)
            g_q, g_k, g_v = torch.autograd.grad(o, (q_b, k_b, v_b), dout[rows].transpose(0, 1).to(o.dtype))
            dq[rows], dk[rows], dv[rows] = g_q.transpose(0, 1), g_k.transpose(0, 1), g_v.transpose(0, 1)
            start += n
    grad_k_pool.view(-1, *grad_k_pool.shape[2:]).index_add_(0, batch.slot_mapping, dk.to(grad_k_pool.dtype))
    grad_v_pool.view(-1, *grad_v_pool.shape[2:]).index_add_(0, batch.slot_mapping, dv.to(grad_v_pool.dtype))
    return dq


def _decode_attention(q_pad, k, v, visible, group: int, scale: float) -> torch.Tensor:
    """One query per sequence over ragged keys: grouped einsums (a boolean mask slows SDPA down on CPU)."""
    b, h, _, d = q_pad.shape
    qg = q_pad.view(b, h // group, group, d)
    scores = torch.einsum("bkgd,bkld->bkgl", qg, k) * scale
    probs = scores.masked_fill_(~visible.view(b, 1, 1, -1), float("-inf")).softmax(dim=-1)
    return torch.einsum("bkgl,bkld->bkgd", probs, v).reshape(b, h, 1, d)


def paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float):
    """Gradients of `paged_attention`: returns dq, and adds dK/dV into the gradient pools at the slots read.

    Nothing of the cache was saved: K/V are gathered again and the probabilities recomputed (from
    the saved log-sum-exp, or by a softmax when `lse` is None).
    """
    if lse is None and _fresh(batch) and batch.max_seqlen_q >= FRESH_PREFILL_MIN_TOKENS:
        return _fresh_prefill_backward(dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale)
    group = q.shape[1] // k_pool.shape[2]
    seq_idx, row_idx = batch.token_rows()
    q_pad = _pad_rows(q.float(), batch).transpose(1, 2)
    do_pad = _pad_rows(dout.float(), batch).transpose(1, 2)
    delta = _pad_rows((dout.float() * out.float()).sum(-1), batch).transpose(1, 2)  # rowsum(dO * O)
    k, v = _padded_kv(k_pool, batch).float(), _padded_kv(v_pool, batch).float()
    k_rep, v_rep = _repeat_kv(k, group), _repeat_kv(v, group)
    scores = torch.matmul(q_pad, k_rep.transpose(-1, -2)).mul_(scale).masked_fill_(~_visible(batch, q.device),
                                                                                   float("-inf"))
    if lse is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = scores.sub_(_pad_rows(lse, batch).transpose(1, 2)[..., None]).exp_()
    dv = torch.matmul(probs.transpose(-1, -2), do_pad)
    ds = probs.mul_(torch.matmul(do_pad, v_rep.transpose(-1, -2)).sub_(delta[..., None]))
    dq = torch.matmul(ds, k_rep).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), q_pad).mul_(scale)
    b, h, n, d = dk.shape
    if group > 1:
        dk = dk.view(b, h // group, group, n, d).sum(2)
        dv = dv.view(b, h // group, group, n, d).sum(2)
    dk, dv = dk.transpose(1, 2), dv.transpose(1, 2)  # [B, max_k, kv_heads, D]
    page_size = k_pool.shape[1]
    pos = torch.arange(batch.max_seqlen_k, device=q.device)
    slots = batch.block_table.long()[:, pos // page_size] * page_size + pos % page_size
    real = pos[None, :] < torch.tensor(batch.k_lens, device=q.device)[:, None]
    grad_k_pool.view(-1, *grad_k_pool.shape[2:]).index_add_(0, slots[real], dk[real].to(grad_k_pool.dtype))
    grad_v_pool.view(-1, *grad_v_pool.shape[2:]).index_add_(0, slots[real], dv[real].to(grad_v_pool.dtype))
    return dq.transpose(1, 2)[seq_idx, row_idx].to(q.dtype)
