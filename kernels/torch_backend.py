"""The "torch" attention backend: the contract of the Triton kernels, in vectorised PyTorch.

A step reads every sequence's K/V as padded `[B, kv_heads, max_k, D]` (a strided view of the pool
where the batch's pages are equal runs, as a training cache lays them out; else gathered through
the block table) and pads the new tokens to `[B, heads, max_q, D]`; a long ragged prefill from
empty runs per sequence instead (plain causal over its own rows: no padding, no mask), and a step of
one token per sequence (a thought, a decode step) works on the pool's own layout (see below). On CPU a
one-token step whose pages are not strided runs (a decode step: the Generator reserves each request's
pages as one run) reads each sequence's keys in place, run by run (`AttentionBatch.kv_runs`), and
so does a step of up to two tokens per sequence (a last thought with its <eot>, `RUNS_MAX_Q`); a
training thought step (one token per sequence over strided rows, `StepPlan.one_token_rows`) runs its
backward as batched products over the rows (`_one_token_rows_backward`).

On CPU the attention is PyTorch's fused flash kernel (`aten._scaled_dot_product_flash_attention_for_cpu`
and its backward): the forward returns the log-sum-exp at no cost and the backward takes it, so the
backward neither recomputes the forward nor needs the probabilities. Elsewhere (a GPU without
Triton, or a torch build without that kernel) the forward is SDPA and the backward recomputes the
softmax from the gathered K/V.

With attention dropout (training; `kernels/dropout.py`) every step takes the padded path with an
explicit fp32 softmax: the same mask as the Triton kernels, recomputed in the backward from the seed.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .dropout import AttentionDropout, dropped, keep_mask

# A ragged prefill from empty this long runs per sequence; shorter ones are cheaper padded in one
# call (a per-sequence loop costs more in call overhead than the padding wastes).
FRESH_PREFILL_MIN_TOKENS = 128


@functools.cache
def _fused_cpu_kernels():
    """(forward, backward) of PyTorch's CPU flash attention, or None where this torch lacks them."""
    try:
        aten = torch.ops.aten
        return (aten._scaled_dot_product_flash_attention_for_cpu.default,
                aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
    except (AttributeError, RuntimeError):
        return None


def uses_fused_kernels(device: torch.device) -> bool:
    """Whether attention on `device` runs the fused CPU kernels (which give the log-sum-exp for free,
    so a training forward should ask for it and the backward should get it)."""
    return device.type == "cpu" and _fused_cpu_kernels() is not None


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
             every_slot_valid: bool = False) -> None:
    """Write `k`, `v` (`[T, kv_heads, head_dim]`) into the pools at `slot_mapping` (-1 = skip).

    `every_slot_valid` is the caller's host-side knowledge that no slot is -1
    (`AttentionBatch.every_slot_valid`): the store then skips the check, a host-device sync."""
    if not every_slot_valid and bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    k_pool.view(-1, *k_pool.shape[2:]).index_copy_(0, slot_mapping, as_dtype(k, k_pool.dtype))
    v_pool.view(-1, *v_pool.shape[2:]).index_copy_(0, slot_mapping, as_dtype(v, v_pool.dtype))


def paged_attention(q, k_pool, v_pool, batch, scale: float, return_lse: bool = False, out=None,
                    dropout: AttentionDropout | None = None):
    """Causal GQA attention of the packed queries `q` (`[T, heads, D]`) over the pages.

    Same contract as `reference.paged_attention`: returns `out` (q's dtype), and the log-sum-exp
    (`[T, heads]`, fp32, before dropout) when `return_lse`; `dropout` drops probabilities by the
    mask of `kernels/dropout.py`. Without `out` the padded path returns the kernel's own result (a
    view where the step is rectangular) instead of copying it into a new tensor.
    """
    if dropout is not None and batch.num_tokens:
        return _dropout_attention(q, k_pool, v_pool, batch, scale, return_lse, out, dropout)
    plan = step_plan(batch)
    fused = uses_fused_kernels(q.device)
    in_place_runs = batch.max_seqlen_q <= RUNS_MAX_Q and fused and _reads_runs_in_place(k_pool, batch)
    padded_path = batch.num_tokens and not (
        in_place_runs
        or (batch.max_seqlen_q == 1 and not fused)
        or (plan.per_sequence_prefill and (fused or not return_lse)))
    if padded_path:
        o_rows, lse_rows = _padded_attention(q, k_pool, v_pool, batch, scale, return_lse, fused)
        if out is None and len(q) == batch.num_tokens:
            out = as_dtype(o_rows, q.dtype)
        else:
            out = torch.empty_like(q) if out is None else out
            out[: batch.num_tokens] = o_rows
        return (out, lse_rows) if return_lse else out
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device) if return_lse else None
    if batch.num_tokens == 0:
        return (out, lse) if return_lse else out
    if in_place_runs:
        _short_step_runs(q, k_pool, v_pool, batch, scale, out, lse)
    elif batch.max_seqlen_q == 1 and not fused:
        _one_token_step(q, k_pool, v_pool, batch, scale, out, lse)
    else:
        _fresh_prefill(q, k_pool, v_pool, batch, scale, out, lse, fused)
    return (out, lse) if return_lse else out


def _dropout_attention(q, k_pool, v_pool, batch, scale: float, return_lse: bool, out, dropout: AttentionDropout):
    """The padded step with an explicit fp32 softmax whose probabilities `dropout` drops (the fused
    CPU kernel has no dropout); the log-sum-exp is the one before dropout."""
    q_pad = _pad_rows(q, batch).transpose(1, 2)
    o_pad, lse_pad = _softmax_attention(q_pad, _padded_kv(k_pool, batch), _padded_kv(v_pool, batch), batch, scale,
                                        dropout)
    out = torch.empty_like(q) if out is None else out
    out[: batch.num_tokens] = _unpad_rows(o_pad.transpose(1, 2), batch)
    if not return_lse:
        return out
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    lse[: batch.num_tokens] = _unpad_rows(lse_pad.transpose(1, 2), batch)
    return out, lse


def _padded_attention(q, k_pool, v_pool, batch, scale: float, return_lse: bool, fused: bool):
    """The step padded to `[B, heads, max_q, D]` over every sequence's keys (views of the pool where
    the pages are strided runs); returns the packed rows of the output and (or None) the log-sum-exp."""
    q_pad = _pad_rows(q, batch).transpose(1, 2)
    k, v = as_dtype(_padded_kv(k_pool, batch), q.dtype), as_dtype(_padded_kv(v_pool, batch), q.dtype)
    lse_pad = None
    if fused:
        mask, causal = _mask(batch, q.dtype, k.shape[2])
        o_pad, lse_pad = _fused_cpu_kernels()[0](q_pad, k, v, 0.0, causal, attn_mask=mask, scale=scale)[:2]
    elif return_lse:
        o_pad, lse_pad = _softmax_attention(q_pad, k, v, batch, scale)
    else:
        o_pad = _sdpa(q_pad, k, v, batch, scale)
    lse_rows = _unpad_rows(lse_pad.transpose(1, 2), batch) if return_lse else None
    return _unpad_rows(o_pad.transpose(1, 2), batch), lse_rows


def paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float,
                             dropout: AttentionDropout | None = None):
    """Gradients of `paged_attention`: returns dq, and adds dK/dV into the gradient pools at the slots read.

    Nothing of the cache was saved: K/V are read again (a view of the pool where the pages are strided
    runs, else gathered). With the forward's log-sum-exp on CPU the fused flash backward runs; without
    it the probabilities are recomputed by a softmax. A training thought step (one token per sequence
    over strided rows) is batched products over the rows (`_one_token_rows_backward`) up to
    ONE_TOKEN_ROWS_MAX_KV_HEADS kv heads; another one-token step has its own elementwise backward, from the log-sum-exp where given, except a small
    one on CPU (ONE_TOKEN_FUSED_MAX_ELEMENTS).
    With `dropout` (the forward's) the probabilities are recomputed and the mask drawn again from its seed.
    """
    if dropout is not None:
        return _recompute_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale, dropout)
    fused = lse is not None and uses_fused_kernels(q.device)
    if step_plan(batch).one_token_rows and len(q) == batch.num_tokens and k_pool.shape[-2] <= ONE_TOKEN_ROWS_MAX_KV_HEADS:
        rows = _one_token_row_views(k_pool, v_pool, q, batch)
        if rows is not None:
            return _one_token_rows_backward(dout, q, out, lse, *rows, grad_k_pool, grad_v_pool, batch, scale)
    if batch.max_seqlen_q == 1 and not (fused and _small_one_token_step(q, batch)):
        return _one_token_step_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale)
    if fused:
        if step_plan(batch).per_sequence_prefill:
            return _fresh_prefill_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale)
        return _fused_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale)
    return _recompute_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale)


# -- the step's plan -----------------------------------------------------------------------------

@dataclass(frozen=True)
class StepPlan:
    """What every layer of a step needs to know about its shape, worked out on the host once per step
    (memoised on the AttentionBatch) instead of by each layer."""

    rectangular: bool  # every sequence has max_q new tokens: padding the packed rows is a view
    fresh: bool  # a prefill from empty: every sequence's keys are exactly its new tokens
    unmasked: bool  # equal lengths and a decode step or a prefill from empty: causal needs no mask
    per_sequence_prefill: bool  # a long ragged prefill from empty (see FRESH_PREFILL_MIN_TOKENS)
    one_token_rows: bool  # one new token for every sequence, pages in strided runs (a training thought step)


def step_plan(batch) -> StepPlan:
    """The StepPlan of `batch` (built by the first layer that asks)."""
    def build():
        fresh = all(q == k for q, k in zip(batch.q_lens, batch.k_lens))
        equal = len(set(batch.q_lens)) <= 1 and len(set(batch.k_lens)) <= 1
        return StepPlan(
            rectangular=batch.num_tokens == batch.num_seqs * batch.max_seqlen_q,
            fresh=fresh,
            unmasked=equal and batch.max_seqlen_q in (1, batch.max_seqlen_k),
            per_sequence_prefill=fresh and not equal and batch.max_seqlen_q >= FRESH_PREFILL_MIN_TOKENS,
            one_token_rows=(batch.max_seqlen_q == 1 and batch.num_tokens == batch.num_seqs
                            and batch.strided_pages is not None),
        )

    return batch.memo("step_plan", build)


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in `dtype` (no call at all where it already is)."""
    return x if x.dtype == dtype else x.to(dtype)


# -- layout helpers ------------------------------------------------------------------------------

def _strided_rows(pool: torch.Tensor, batch) -> torch.Tensor | None:
    """`[B, pages_per_row * page_size, kv_heads, D]`: a view of the pool in which row b is sequence
    b's tokens, where the batch's pages are strided runs (`AttentionBatch.strided_pages`); else None."""
    if batch.strided_pages is None:
        return None
    first, stride = batch.strided_pages
    if first + batch.num_seqs * stride > pool.shape[0]:
        return None
    return pool[first : first + batch.num_seqs * stride].view(batch.num_seqs, stride * pool.shape[1], *pool.shape[2:])


def _token_major_kv(pool: torch.Tensor, batch, whole_rows: bool = False) -> torch.Tensor:
    """Every sequence's K or V in the pool's own layout, `[B, keys, kv_heads, D]` (junk past k_len): a
    view of the pool where the pages are strided runs, else gathered through the block table.

    `keys` is max_k, except with `whole_rows` on strided runs under a mask, where it is the whole row:
    the view is then dense, so the fused backward returns dK/dV in the pool's own layout and adding
    them into the gradient pages is a plain add, not a transposing one (measured on the tiny shape's
    thought step before it took `_one_token_rows_backward`: 14 vs 65 us per add; a suffix step's add
    is the same kind); the mask hides the extra keys. Only the backward asks for whole rows: a
    forward gains nothing from them, and a generation step's row (a request's pages reserved for
    its whole life) can be far longer than its keys."""
    strided = _strided_rows(pool, batch)
    if strided is not None:
        return strided if whole_rows and not step_plan(batch).unmasked else strided[:, : batch.max_seqlen_k]
    page_size = pool.shape[1]
    num_pages = -(-batch.max_seqlen_k // page_size)
    table = batch.block_table[:, :num_pages].reshape(-1)
    rows = pool.flatten(1).index_select(0, table).view(batch.num_seqs, num_pages * page_size, *pool.shape[2:])
    return rows[:, : batch.max_seqlen_k]


def _padded_kv(pool: torch.Tensor, batch, whole_rows: bool = False) -> torch.Tensor:
    """Every sequence's K or V, heads first: `[B, kv_heads, keys, D]` (junk past k_len; `keys` as
    `_token_major_kv` has them)."""
    return _token_major_kv(pool, batch, whole_rows).transpose(1, 2)


def _rectangular(batch) -> bool:
    """Every sequence has max_q new tokens (a thought or decode step, an equal-length prefill):
    packed rows are then already `[B, max_q]` in order, and padding is a view."""
    return step_plan(batch).rectangular


def _pad_rows(x: torch.Tensor, batch) -> torch.Tensor:
    """Packed rows `[T, ...]` -> `[B, max_q, ...]` (zeros past each sequence's new tokens)."""
    if _rectangular(batch):
        return x[: batch.num_tokens].view(batch.num_seqs, batch.max_seqlen_q, *x.shape[1:])
    seq_idx, row_idx = batch.token_rows()
    out = x.new_zeros(batch.num_seqs, batch.max_seqlen_q, *x.shape[1:])
    out[seq_idx, row_idx] = x[: batch.num_tokens]
    return out


def _unpad_rows(x_pad: torch.Tensor, batch) -> torch.Tensor:
    """`[B, max_q, ...]` -> the packed rows `[T, ...]` of the step's new tokens."""
    if _rectangular(batch):
        return x_pad.reshape(batch.num_tokens, *x_pad.shape[2:])
    seq_idx, row_idx = batch.token_rows()
    return x_pad[seq_idx, row_idx]


def _padded_slots(batch, page_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool slot of every padded key position `[B, max_k]`, and which of them are real keys."""
    def build():
        pos = torch.arange(batch.max_seqlen_k, device=device)
        slots = batch.block_table.long()[:, pos // page_size] * page_size + pos % page_size
        real = pos[None, :] < torch.tensor(batch.k_lens, device=device)[:, None]
        return slots, real

    return batch.memo("padded_slots", build)


def _add_into_pool(grad_pool: torch.Tensor, padded_grad: torch.Tensor, batch) -> None:
    """Add padded key gradients `[B, kv_heads, keys, D]` into the gradient pages of the real keys.

    On a strided view the whole padded block is added: past each row's keys the gradient is exactly
    zero (masked keys get zero probability, padding query rows a zero output gradient)."""
    strided = _strided_rows(grad_pool, batch)
    if strided is not None:
        strided[:, : padded_grad.shape[2]] += as_dtype(padded_grad.transpose(1, 2), grad_pool.dtype)
        return
    slots, real = _padded_slots(batch, grad_pool.shape[1], padded_grad.device)
    rows = padded_grad.transpose(1, 2)[real]
    grad_pool.view(-1, *grad_pool.shape[2:]).index_add_(0, slots[real], rows.to(grad_pool.dtype))


def _visible(batch, device, keys: int) -> torch.Tensor:
    """Causal visibility `[B, 1, max_q, keys]`: padded query row i of sequence b sees key j.

    Key 0 is visible to every row, so that padding rows (which nothing reads) are never fully
    masked; real rows see key 0 anyway. Built once per step.
    """
    def build():
        i = torch.arange(batch.max_seqlen_q, device=device)
        j = torch.arange(keys, device=device)
        if _rectangular(batch):  # every row is real, at position k_len - max_q + i: it sees key 0
            q_pos = batch.seq_lens_k.to(device)[:, None] + (i - batch.max_seqlen_q)[None, :]
            return (j[None, None, :] <= q_pos[:, :, None])[:, None]
        q_lens = torch.tensor(batch.q_lens, device=device)
        k_lens = torch.tensor(batch.k_lens, device=device)
        q_pos = (k_lens - q_lens)[:, None] + i[None, :]
        seen = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < k_lens[:, None, None])
        return (seen | (j == 0))[:, None]

    return batch.memo(f"visible_{keys}", build)


def _mask(batch, dtype: torch.dtype, keys: int) -> tuple[torch.Tensor | None, bool]:
    """The fused kernel's (additive mask over `keys` keys, is_causal) for this step: no mask where
    every sequence has the same lengths and the step is a decode or a prefill from empty."""
    if step_plan(batch).unmasked:
        return None, batch.max_seqlen_q > 1

    def build():
        return torch.zeros((), dtype=dtype, device=batch.positions.device).masked_fill(
            ~_visible(batch, batch.positions.device, keys), float("-inf"))

    return batch.memo(f"additive_mask_{dtype}_{keys}", build), False


def _repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def _step_rows(pool: torch.Tensor, batch) -> list[torch.Tensor]:
    """A prefill from empty: each sequence's new K or V rows `[n, kv_heads, D]` (views of the pool
    where its pages are strided runs, else read back at the step's slots)."""
    strided = _strided_rows(pool, batch)
    if strided is not None:
        return [strided[b, :n] for b, n in enumerate(batch.q_lens) if n]
    rows = pool.reshape(-1, *pool.shape[2:])[batch.slot_mapping]
    return [rows[seq] for seq, _ in _sequences(batch)]


def _add_step_rows(grad_pool: torch.Tensor, grads: list[torch.Tensor], batch) -> None:
    """Add each sequence's new-row gradients (as `_step_rows` returned the rows) into the gradient pages."""
    strided = _strided_rows(grad_pool, batch)
    if strided is not None:
        for b, g in zip((b for b, n in enumerate(batch.q_lens) if n), grads):
            strided[b, : len(g)] += g.to(grad_pool.dtype)
        return
    grad_pool.view(-1, *grad_pool.shape[2:]).index_add_(0, batch.slot_mapping, torch.cat(grads).to(grad_pool.dtype))


def _sequences(batch):
    """(rows of q, new-token count) of every sequence with new tokens."""
    start = 0
    for n in batch.q_lens:
        if n:
            yield slice(start, start + n), n
            start += n


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    """`[n, heads, D]` -> `[1, heads, n, D]` (a view)."""
    return x.transpose(0, 1).unsqueeze(0)


# -- forward paths -------------------------------------------------------------------------------

def _fresh_prefill(q, k_pool, v_pool, batch, scale: float, out, lse, fused: bool) -> None:
    """A ragged prefill from empty: plain causal attention per sequence over its own rows."""
    group = q.shape[1] // k_pool.shape[2]
    for (rows, _), k, v in zip(_sequences(batch), _step_rows(k_pool, batch), _step_rows(v_pool, batch)):
        q_b, k_b, v_b = _heads_first(q[rows]), _heads_first(k.to(q.dtype)), _heads_first(v.to(q.dtype))
        if fused:
            o, lse_b = _fused_cpu_kernels()[0](q_b, k_b, v_b, 0.0, True, scale=scale)
            if lse is not None:
                lse[rows] = lse_b[0].transpose(0, 1)
        else:
            o = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=scale, enable_gqa=group > 1)
        out[rows] = o[0].transpose(0, 1).to(out.dtype)


def _sdpa(q_pad, k, v, batch, scale: float) -> torch.Tensor:
    """SDPA over the padded step (no mask where the lengths allow; a boolean mask is slow on CPU)."""
    group = q_pad.shape[1] // k.shape[1]
    if step_plan(batch).unmasked:
        return F.scaled_dot_product_attention(q_pad, k, v, is_causal=batch.max_seqlen_q > 1, scale=scale,
                                              enable_gqa=group > 1)
    return F.scaled_dot_product_attention(q_pad, k, v, attn_mask=_visible(batch, q_pad.device, k.shape[2]), scale=scale,
                                          enable_gqa=group > 1)


# -- one-token steps (a continuous thought, a decode step) ----------------------------------------
# A training thought step (strided rows) runs `_one_token_rows_backward`: batched products over
# block rows, which need no heads-first copy of K/V. Other one-token steps (pages gathered through
# the block table): one query per sequence, the products elementwise over the pool's own
# [B, keys, kv_heads, D] layout, in fp32, each of K, V and their gradient pages read or updated in
# place once or twice; the fused CPU flash backward tiles for long query blocks: 3x slower for one
# query (gpt2-6l thought step: 2.3 vs 0.75 ms). Its forward is fast, so with it only the backward runs
# here. The broadcast products run over chunks of keys, so their temporaries stay bounded at long contexts.

ONE_TOKEN_CHUNK_ELEMENTS = 1 << 22  # elements of one chunk's broadcast product (16 MB in fp32)
# Up to this many query-head x key x head_dim elements (B * heads * max_k * D), a one-token step's
# backward is the fused flash kernel's after all: its fixed cost beats the ~20 elementwise ops'
# (8 sequences x 4 heads x 250-320 keys x 16, the tiny shape's thought step: 0.24 vs 0.41 ms); at 2^18
# the two are level within this machine's noise, from 2^19 the elementwise path wins (8 x 8 x 250-320
# x 64: 15 vs 27 ms). Measured in benchmarks/README.md (issue 19), on strided thought steps, which
# now take `_one_token_rows_backward` instead; the threshold serves the gathered one-token steps.
ONE_TOKEN_FUSED_MAX_ELEMENTS = 1 << 18
# Up to this many kv heads a training thought step's backward is `_one_token_rows_backward`'s batched
# products, whose block rows do kv_heads times the needed arithmetic; above it the elementwise path
# wins. Isolated, one thread, 8-16 sequences over 300-512 keys, fp32 (rows vs elementwise, ms):
# 4 kv heads 1.0 vs 8.8, 12: 3.0 vs 4.2, 16: 24.0 vs 25.6, 25 (GPT-2 XL): 48.7 vs 40.1.
ONE_TOKEN_ROWS_MAX_KV_HEADS = 16


def _key_chunks(rows: torch.Tensor, per_key: int) -> list[slice]:
    """Slices of the keys (dim 1 of `rows`) whose broadcast products hold at most ONE_TOKEN_CHUNK_ELEMENTS."""
    step = max(1, ONE_TOKEN_CHUNK_ELEMENTS // max(1, rows.shape[0] * per_key))
    return [slice(start, start + step) for start in range(0, rows.shape[1], step)]


def _dot_keys(rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """`[B, keys, kv_heads, group]`: each key row `[B, keys, kv_heads, D]` dotted with `vectors`
    (`[B, kv_heads, group, D]`, fp32)."""
    out = vectors.new_empty(*rows.shape[:3], vectors.shape[2])
    for keys in _key_chunks(rows, vectors[0].numel()):
        out[:, keys] = (rows[:, keys].unsqueeze(3) * vectors.unsqueeze(1)).sum(-1)
    return out


def _sum_over_keys(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`[B, kv_heads, group, D]`: the key rows weighted by `weights` (`[B, keys, kv_heads, group]`), summed."""
    out = None
    for keys in _key_chunks(rows, weights.shape[2] * weights.shape[3] * rows.shape[-1]):
        part = (weights[:, keys].unsqueeze(-1) * rows[:, keys].unsqueeze(3)).sum(1)
        out = part if out is None else out.add_(part)
    return out


def _small_one_token_step(q: torch.Tensor, batch) -> bool:
    """A one-token step small enough that the fused kernel's backward is the cheaper (ONE_TOKEN_FUSED_MAX_ELEMENTS)."""
    return batch.num_seqs * q.shape[1] * batch.max_seqlen_k * q.shape[2] <= ONE_TOKEN_FUSED_MAX_ELEMENTS


def _one_token_keys(batch, device, keys: int) -> torch.Tensor:
    """`[B, keys]`: the padded key positions a one-token step attends to (key 0 always, so that a
    sequence without a new token, a padding row that nothing reads, is never fully masked)."""
    def build():
        j = torch.arange(keys, device=device)
        return (j[None, :] < torch.tensor(batch.k_lens, device=device)[:, None]) | (j == 0)

    return batch.memo(f"one_token_keys_{keys}", build)


def _one_token_rows(x: torch.Tensor, batch, kv_heads: int) -> torch.Tensor:
    """The step's rows `[T, heads, ...]` as fp32 `[B, kv_heads, group, ...]` (zeros for a sequence without one)."""
    x = _pad_rows(x, batch)[:, 0].float()
    return x.view(batch.num_seqs, kv_heads, x.shape[1] // kv_heads, *x.shape[2:])


def _one_token_probs(q32, k_rows, batch, scale: float, lse=None):
    """Probabilities `[B, keys, kv_heads, group]` of the queries `q32` (`[B, kv_heads, group, D]`) over
    `k_rows` (`[B, keys, kv_heads, D]`), and the log-sum-exp `[B, kv_heads, group]` (computed if not given)."""
    scores = _dot_keys(k_rows, q32).mul_(scale)
    scores.masked_fill_(~_one_token_keys(batch, scores.device, scores.shape[1])[:, :, None, None], float("-inf"))
    if lse is None:
        lse = torch.logsumexp(scores, dim=1)
    return scores.sub_(lse.unsqueeze(1)).exp_(), lse


def _one_token_step(q, k_pool, v_pool, batch, scale: float, out, lse) -> None:
    """Forward of a step in which every sequence has at most one new token."""
    kv_heads = k_pool.shape[2]
    q32 = _one_token_rows(q, batch, kv_heads)
    probs, step_lse = _one_token_probs(q32, _token_major_kv(k_pool, batch), batch, scale)
    o = _sum_over_keys(probs, _token_major_kv(v_pool, batch))  # [B, kv, group, D]
    out[: batch.num_tokens] = _unpad_rows(o.view(batch.num_seqs, 1, *q.shape[1:]), batch).to(out.dtype)
    if lse is not None:
        lse[:] = _unpad_rows(step_lse.view(batch.num_seqs, 1, q.shape[1]), batch)


def _one_token_step_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float):
    """Backward of `_one_token_step`: dq, and dK/dV added into the gradient pages in place."""
    kv_heads = k_pool.shape[2]
    q32, do32, o32 = (_one_token_rows(t, batch, kv_heads) for t in (q, dout, out))
    step_lse = None if lse is None else _one_token_rows(lse, batch, kv_heads)
    k_rows, v_rows = _token_major_kv(k_pool, batch), _token_major_kv(v_pool, batch)
    probs, _ = _one_token_probs(q32, k_rows, batch, scale, step_lse)
    grad_probs = _dot_keys(v_rows, do32)
    grad_scores = grad_probs.sub_((do32 * o32).sum(-1).unsqueeze(1)).mul_(probs)  # P (dP - rowsum(dO O))
    dq = _sum_over_keys(grad_scores, k_rows).mul_(scale)
    _add_one_token_grads(grad_k_pool, grad_scores, q32, batch, scale)
    _add_one_token_grads(grad_v_pool, probs, do32, batch, 1.0)
    return _unpad_rows(dq.view(batch.num_seqs, 1, *q.shape[1:]), batch).to(q.dtype)


def _add_one_token_grads(grad_pool, weights, vectors, batch, scale: float) -> None:
    """Key l of sequence b gets `scale * sum_g weights[b, l, :, g] * vectors[b, :, g]` (`weights`
    `[B, keys, kv_heads, group]`, `vectors` `[B, kv_heads, group, D]`): in place on the strided view
    of the gradient pages (exactly zero past each sequence's keys), else added at the keys' slots."""
    strided = _strided_rows(grad_pool, batch)
    if strided is not None and weights.shape[-1] == 1:
        strided[:, : weights.shape[1]].addcmul_(weights, vectors[:, None, :, 0], value=scale)
        return
    rows = weights.new_empty(*weights.shape[:3], vectors.shape[-1])  # [B, keys, kv_heads, D]
    for keys in _key_chunks(weights, vectors[0].numel()):
        rows[:, keys] = (weights[:, keys].unsqueeze(-1) * vectors.unsqueeze(1)).sum(3).mul_(scale)
    if strided is not None:
        strided[:, : rows.shape[1]] += rows
    else:
        _add_into_pool(grad_pool, rows.transpose(1, 2), batch)


def _one_token_row_views(k_pool, v_pool, q, batch):
    """A training thought step's K and V rows, views of the pool's strided rows over the step's keys
    (`[B, max_k, kv_heads, D]`, in q's dtype), and the additive mask over those keys (None where every
    sequence has max_k keys; the forward's padded path built the same one for the step); None where
    the pool does not hold the rows."""
    k_rows, v_rows = _strided_rows(k_pool, batch), _strided_rows(v_pool, batch)
    if k_rows is None:
        return None
    keys = batch.max_seqlen_k
    return (as_dtype(k_rows[:, :keys], q.dtype), as_dtype(v_rows[:, :keys], q.dtype),
            _mask(batch, q.dtype, keys)[0])


def _head_blocks(batch, heads: int, kv_heads: int, device) -> torch.Tensor:
    """`[heads, kv_heads, 1]` fp32: 1 where query head h reads kv head kh (h // group == kh), else 0."""
    def build():
        h = torch.arange(heads, device=device)
        return (h[:, None] // (heads // kv_heads) == torch.arange(kv_heads, device=device)[None, :]).float()[..., None]

    return batch.memo(f"head_blocks_{heads}_{kv_heads}", build)


def _one_token_rows_backward(dout, q, out, lse, k_rows, v_rows, mask, grad_k_pool, grad_v_pool, batch, scale: float):
    """Backward of a training thought step over the rows (`[B, keys, kv_heads, D]`, as
    `_one_token_row_views` gives them) as batched matrix products, in fp32, with dK/dV added into the
    gradient pages' rows in place (nothing zero-filled; for fp32 pools no temporary of the rows' size,
    for bf16/fp16 pools the rows' fp32 copies).

    Each sequence's K rows are one `[keys, kv_heads * D]` matrix; each query head becomes a row of
    `[heads, kv_heads * D]` that holds its query in its kv head's block and zeros elsewhere, so that
    one product over all heads gives every head's scores, and the same blocks carry dS back into dK.
    The zeros cost kv_heads times the products' arithmetic, which at one query per sequence is still
    far below the fused flash backward's (it tiles for long query blocks and zero-fills dK/dV
    buffers) and the elementwise path's broadcast temporaries: tiny shape's thought step 0.25 vs
    0.54 ms, gpt2-6l's 1.6 vs 2.6 ms, smollm2's (16 sequences) 2.6 vs 18 ms, isolated.
    Probabilities from the forward's log-sum-exp where given, else from a log-sum-exp of the scores.
    """
    num_seqs, keys, kv_heads, dim = k_rows.shape
    heads = q.shape[1]
    blocks = _head_blocks(batch, heads, kv_heads, q.device)
    k32 = k_rows.float().reshape(num_seqs, keys, kv_heads * dim)  # views for fp32 pools
    v32 = v_rows.float().reshape(num_seqs, keys, kv_heads * dim)
    q_blocks = (q.float().unsqueeze(2) * blocks).view(num_seqs, heads, kv_heads * dim)
    do32 = dout.float()
    do_blocks = (do32.unsqueeze(2) * blocks).view(num_seqs, heads, kv_heads * dim)
    logits = torch.bmm(q_blocks, k32.transpose(1, 2)).mul_(scale)  # [B, heads, keys]
    if mask is not None:
        logits.add_(mask.view(num_seqs, 1, keys))
    if lse is None:
        lse = torch.logsumexp(logits, dim=-1)
    probs = logits.sub_(lse.float().unsqueeze(-1)).exp_()
    # dS = P (dP - rowsum(dO O))
    grad_logits = torch.bmm(do_blocks, v32.transpose(1, 2)).sub_((do32 * out.float()).sum(-1, keepdim=True)).mul_(probs)
    dq = (torch.bmm(grad_logits, k32).view(num_seqs, heads, kv_heads, dim) * blocks).sum(2).mul_(scale)
    grad_k = _strided_rows(grad_k_pool, batch)[:, :keys].view(num_seqs, keys, kv_heads * dim)
    grad_v = _strided_rows(grad_v_pool, batch)[:, :keys].view(num_seqs, keys, kv_heads * dim)
    grad_k.baddbmm_(grad_logits.transpose(1, 2), q_blocks, alpha=scale)
    grad_v.baddbmm_(probs.transpose(1, 2), do_blocks)
    return dq.to(q.dtype)


# Up to this many new tokens per sequence, a step over pages that are not strided runs reads each
# query's keys in place, run by run (`_short_step_runs`): a decode step (1), and a generation step in
# which a sequence feeds its last thought and its <eot> (2), mixed with one-token sequences.
RUNS_MAX_Q = 2


def _reads_runs_in_place(pool: torch.Tensor, batch) -> bool:
    """Whether a short step reads each sequence's keys as runs of the pool (`AttentionBatch.kv_runs`):
    where the pages are not strided runs (those are one view for the whole batch)."""
    return batch.kv_runs is not None and _strided_rows(pool, batch) is None


def _first_keys(runs, keys: int) -> list[tuple[int, int]]:
    """The runs `(first slot, keys)` that hold a sequence's first `keys` keys."""
    out = []
    for start, n in runs:
        if keys <= 0:
            break
        out.append((start, min(n, keys)))
        keys -= n
    return out


def _short_step_runs(q, k_pool, v_pool, batch, scale: float, out, lse) -> None:
    """A step of at most RUNS_MAX_Q new tokens per sequence over pages that are not strided runs (a
    decode step; generation's last thought with its <eot>): each query attends to the keys it sees
    (causal: all but its sequence's later new tokens) run by run, each run a view of the pool, with
    the fused kernel (no gather, no padding to the longest sequence, no mask: a ragged step costs what
    an equal-length one does); a query over several runs merges them by their log-sum-exps."""
    forward = _fused_cpu_kernels()[0]
    # heads-first views of the whole pool and of every query: a run or a query is then one slice
    k_all = k_pool.view(-1, *k_pool.shape[2:]).transpose(0, 1).unsqueeze(0)  # [1, kv_heads, slots, D]
    v_all = v_pool.view(-1, *v_pool.shape[2:]).transpose(0, 1).unsqueeze(0)
    q_all = q.unsqueeze(2)  # [T, heads, 1, D]
    outs, lses, row = [], [], 0
    for q_len, k_len, runs in zip(batch.q_lens, batch.k_lens, batch.kv_runs):
        for i in range(q_len):
            seen = runs if i == q_len - 1 else _first_keys(runs, k_len - q_len + 1 + i)
            _one_query_over_runs(forward, q_all[row : row + 1], k_all, v_all, seen, scale, outs, lses)
            row += 1
    out[:row] = torch.cat(outs).view(row, *q.shape[1:])  # one copy for the step, not one per query
    if lse is not None:
        lse[:row] = torch.cat(lses).view(row, q.shape[1])


def _one_query_over_runs(forward, q_b, k_all, v_all, runs, scale: float, outs: list, lses: list) -> None:
    """Attention of one query `q_b` (`[1, heads, 1, D]`) over `runs` of the heads-first pool views;
    appends its output and log-sum-exp to `outs` / `lses`."""
    parts = [forward(q_b, as_dtype(k_all[:, :, s : s + n], q_b.dtype), as_dtype(v_all[:, :, s : s + n], q_b.dtype),
                     0.0, False, scale=scale)[:2] for s, n in runs]
    o, lse_b = parts[0]
    if len(parts) > 1:  # [1, heads, 1, D] outputs weighted by exp(run lse - total lse)
        lses_b = torch.stack([p[1] for p in parts])
        lse_b = torch.logsumexp(lses_b, dim=0)
        weights = (lses_b - lse_b).exp_().unsqueeze(-1)
        o = (torch.stack([p[0].float() for p in parts]) * weights).sum(0)
    outs.append(o)
    lses.append(lse_b)


def _softmax_attention(q_pad, k, v, batch, scale: float, dropout: AttentionDropout | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Explicit scores and softmax in fp32, for a forward that must return the log-sum-exp without
    the fused kernel, or drops probabilities; returns (out, lse `[B, heads, max_q]`, before dropout)."""
    group = q_pad.shape[1] // k.shape[1]
    scores = torch.matmul(q_pad.float(), _repeat_kv(k.float(), group).transpose(-1, -2)) * scale
    scores = scores.masked_fill_(~_visible(batch, q_pad.device, k.shape[2]), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp_(scores.sub_(lse[..., None]))
    if dropout is not None:
        probs = dropped(probs, _padded_keep(batch, dropout, q_pad.shape[1]), dropout)
    return torch.matmul(probs, _repeat_kv(v.float(), group)), lse


def _padded_keep(batch, dropout: AttentionDropout, heads: int) -> torch.Tensor:
    """The dropout keep mask of the padded step, `[B, heads, max_q, max_k]` (junk in padding rows and keys)."""
    device = dropout.rows.device

    def positions():
        i = torch.arange(batch.max_seqlen_q, device=device)
        starts = torch.tensor(batch.k_lens, device=device) - torch.tensor(batch.q_lens, device=device)
        return starts[:, None] + i[None, :], torch.arange(batch.max_seqlen_k, device=device)

    q_pos, k_pos = batch.memo("padded_positions", positions)
    return keep_mask(dropout, dropout.rows[:, None, None, None], torch.arange(heads, device=device)[None, :, None, None],
                     q_pos[:, None, :, None], k_pos)


# -- backward paths ------------------------------------------------------------------------------

def _fused_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float):
    """The fused CPU flash backward over the padded step, from the forward's log-sum-exp."""
    q_pad = _pad_rows(q, batch).transpose(1, 2)
    do_pad = _pad_rows(as_dtype(dout, q.dtype), batch).transpose(1, 2)
    o_pad = _pad_rows(out, batch).transpose(1, 2)
    lse_pad = _pad_rows(lse, batch).transpose(1, 2).contiguous()
    k, v = as_dtype(_padded_kv(k_pool, batch, True), q.dtype), as_dtype(_padded_kv(v_pool, batch, True), q.dtype)
    mask, causal = _mask(batch, q.dtype, k.shape[2])
    dq, dk, dv = _fused_cpu_kernels()[1](do_pad, q_pad, k, v, o_pad, lse_pad, 0.0, causal, attn_mask=mask, scale=scale)
    _add_into_pool(grad_k_pool, dk, batch)
    _add_into_pool(grad_v_pool, dv, batch)
    return as_dtype(_unpad_rows(dq.transpose(1, 2), batch), q.dtype)


def _fresh_prefill_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float):
    """Backward of the per-sequence prefill: the fused flash backward of each sequence."""
    backward = _fused_cpu_kernels()[1]

    def grads(rows, q_b, k_b, v_b, do_b):
        lse_b = lse[rows].transpose(0, 1).unsqueeze(0).contiguous()
        return backward(do_b, q_b, k_b, v_b, _heads_first(out[rows]), lse_b, 0.0, True, scale=scale)

    return _per_sequence_backward(grads, dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch)


def _recompute_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float,
                        dropout: AttentionDropout | None = None):
    """Backward without the fused kernel: probabilities recomputed (from `lse`, or by a softmax); with
    `dropout`, its mask drawn again (dV from the kept probabilities, dP through the kept entries only)."""
    if lse is None and dropout is None and step_plan(batch).per_sequence_prefill:  # as the forward ran it
        return _fresh_prefill_backward_autograd(dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale)
    group = q.shape[1] // k_pool.shape[2]
    q_pad = _pad_rows(q.float(), batch).transpose(1, 2)
    do_pad = _pad_rows(dout.float(), batch).transpose(1, 2)
    delta = _pad_rows((dout.float() * out.float()).sum(-1), batch).transpose(1, 2)  # rowsum(dO * O)
    k, v = _padded_kv(k_pool, batch).float(), _padded_kv(v_pool, batch).float()
    k_rep, v_rep = _repeat_kv(k, group), _repeat_kv(v, group)
    scores = torch.matmul(q_pad, k_rep.transpose(-1, -2)).mul_(scale).masked_fill_(~_visible(batch, q.device, k.shape[2]),
                                                                                   float("-inf"))
    if lse is None:
        probs = torch.softmax(scores, dim=-1)
    else:
        probs = scores.sub_(_pad_rows(lse, batch).transpose(1, 2)[..., None]).exp_()
    grad_probs = torch.matmul(do_pad, v_rep.transpose(-1, -2))
    if dropout is None:
        dv = torch.matmul(probs.transpose(-1, -2), do_pad)
    else:
        keep = _padded_keep(batch, dropout, q.shape[1])
        dv = torch.matmul(dropped(probs, keep, dropout).transpose(-1, -2), do_pad)
        grad_probs = dropped(grad_probs, keep, dropout)
    ds = probs.mul_(grad_probs.sub_(delta[..., None]))
    dq = torch.matmul(ds, k_rep).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), q_pad).mul_(scale)
    b, h, n, d = dk.shape
    if group > 1:
        dk = dk.view(b, h // group, group, n, d).sum(2)
        dv = dv.view(b, h // group, group, n, d).sum(2)
    _add_into_pool(grad_k_pool, dk, batch)
    _add_into_pool(grad_v_pool, dv, batch)
    return _unpad_rows(dq.transpose(1, 2), batch).to(q.dtype)


def _fresh_prefill_backward_autograd(dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float):
    """Backward of the per-sequence prefill without a log-sum-exp: each sequence's causal SDPA re-run
    under autograd."""
    group = q.shape[1] // k_pool.shape[2]

    def grads(rows, q_b, k_b, v_b, do_b):
        with torch.enable_grad():
            q_b, k_b, v_b = (t.detach().requires_grad_() for t in (q_b, k_b, v_b))
            o = F.scaled_dot_product_attention(q_b, k_b, v_b, is_causal=True, scale=scale, enable_gqa=group > 1)
            return torch.autograd.grad(o, (q_b, k_b, v_b), do_b.to(o.dtype))

    return _per_sequence_backward(grads, dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch)


def _per_sequence_backward(grads, dout, q, k_pool, v_pool, grad_k_pool, grad_v_pool, batch) -> torch.Tensor:
    """Run `grads(rows, q_b, k_b, v_b, do_b)` (inputs and results `[1, heads, n, D]`) for each sequence
    of a prefill from empty; returns dq and adds dK/dV into the gradient pages of the step's rows."""
    dq, dks, dvs = torch.empty_like(q), [], []
    dout = dout.to(q.dtype)
    for (rows, _), k, v in zip(_sequences(batch), _step_rows(k_pool, batch), _step_rows(v_pool, batch)):
        g_q, g_k, g_v = grads(rows, _heads_first(q[rows]), _heads_first(k.to(q.dtype)), _heads_first(v.to(q.dtype)),
                              _heads_first(dout[rows]))
        dq[rows] = g_q[0].transpose(0, 1)
        dks.append(g_k[0].transpose(0, 1))
        dvs.append(g_v[0].transpose(0, 1))
    _add_step_rows(grad_k_pool, dks, batch)
    _add_step_rows(grad_v_pool, dvs, batch)
    return dq
