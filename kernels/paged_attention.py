"""Triton kernel: varlen causal GQA attention of packed queries over a paged KV cache.

One program handles a tile of query rows of one sequence and one kv head. The rows of a tile are
(token, query head of the kv group) pairs, so the query heads that share a kv head are computed
together by one `tl.dot` of at least 16 rows, whatever the q length (a decode step still fills the
tile with the group's heads). Keys are read position by position through the block table, so the
key tile is independent of the page size. Softmax is online with fp32 accumulators.

For decode steps (every q_len <= 1) the key range can be split across programs ("flash-decoding");
each split writes a partial output and its log-sum-exp, merged afterwards.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot with exact fp32 products when IEEE (for comparisons), the fast default otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _query_rows(tile, q_len, k_len, kv_head, GROUP: tl.constexpr, BLOCK_M: tl.constexpr):
    """The rows of a query tile: (token index in the sequence, query head, valid, absolute position).

    Row r is token `tile * TOKENS + r // GROUP` with head `kv_head * GROUP + r % GROUP`, so the
    query heads that share a kv head fill the tile together.
    """
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    rows = tl.arange(0, BLOCK_M)
    tok = tile * TOKENS + rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < TOKENS * GROUP) & (tok < q_len)
    return tok, head, row_ok, k_len - q_len + tok


@triton.jit
def _load_kv_tile(K_POOL, V_POOL, table, k_pos, k_ok, kv_head, dims, dim_ok,
                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                  PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """K and V rows of key positions `k_pos` of one sequence, read through its block table.

    Returns (k, v, page, offset in page); the tile size is independent of the page size.
    """
    page = tl.load(table + k_pos // PAGE_SIZE, mask=k_ok, other=0).to(tl.int64)
    in_page = k_pos % PAGE_SIZE
    mask = k_ok[:, None] & dim_ok[None, :]
    k = tl.load(K_POOL + page[:, None] * stride_kp + in_page[:, None] * stride_ks + kv_head * stride_kh
                + dims[None, :], mask=mask, other=0.0)
    v = tl.load(V_POOL + page[:, None] * stride_vp + in_page[:, None] * stride_vs + kv_head * stride_vh
                + dims[None, :], mask=mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v, page, in_page


@triton.jit
def _paged_attention_fwd_kernel(
    Q, K_POOL, V_POOL, O, LSE,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE,
    scale_log2, split_size,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_lt, stride_ls,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr, STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    TOKENS: tl.constexpr = BLOCK_M // GROUP

    q_begin = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_begin
    if tile * TOKENS < q_len:
        k_len = tl.load(SEQ_LENS_K + seq)
        tok, head, row_ok, q_pos = _query_rows(tile, q_len, k_len, kv_head, GROUP, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q_row = (q_begin + tok).to(tl.int64)
        q = tl.load(Q + q_row[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        if UPCAST:
            q = q.to(tl.float32)

        # Keys this tile can see: up to its last query's position; this split's share of them.
        last_tok = tl.minimum(tile * TOKENS + TOKENS, q_len) - 1
        kv_end = k_len - q_len + last_tok + 1
        kv_lo = split * split_size
        kv_hi = tl.minimum(kv_end, kv_lo + split_size)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = BLOCK_TABLE + seq.to(tl.int64) * stride_bt
        for start in range(kv_lo, kv_hi, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < kv_hi
            k, v, _, _ = _load_kv_tile(K_POOL, V_POOL, table, k_pos, k_ok, kv_head, dims, dim_ok,
                                       stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                       PAGE_SIZE, UPCAST)
            s = _dot(q, tl.trans(k), IEEE)
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            s = tl.where(visible, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            m_i = m_new

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        # log-sum-exp in natural-log units; -inf for an empty split.
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
        o_ptr = O + q_row[:, None] * stride_ot + head[:, None] * stride_oh + split * stride_os + dims[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
        if STORE_LSE:
            tl.store(LSE + q_row * stride_lt + head * stride_ls + split, lse, mask=row_ok)


def _tiles(group: int, head_dim: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N): big tiles under the interpreter (its cost is programs x iterations)."""
    base_m = 64 if interpreting() else (64 if head_dim <= 128 else 32)
    block_m = max(16, triton.next_power_of_2(group), base_m)
    block_n = 64 if interpreting() else (64 if head_dim <= 128 else 32)
    return block_m, block_n


def _decode_splits(batch, num_kv_heads: int, device: torch.device) -> int:
    """How many programs share one (sequence, kv head) key range in a decode step."""
    if interpreting() or device.type != "cuda":
        return 1
    programs = max(1, batch.num_seqs * num_kv_heads)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(batch.max_seqlen_k, 512), 16))


def paged_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    batch,
    scale: float,
    return_lse: bool = False,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    ieee: bool | None = None,
):
    """Causal GQA attention of packed `q` (`[T, heads, head_dim]`) over the K/V page pools.

    `batch` is the step's AttentionBatch. Returns `out` (q's dtype), plus the natural-log
    log-sum-exp (`[T, heads]` fp32) when `return_lse`. `num_splits` forces the decode split count
    (only used when every q_len <= 1); `ieee` forces exact fp32 dots (default: for fp32 inputs).
    Rows of `out` that belong to no sequence's new tokens are never written.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    if num_heads % num_kv_heads:
        raise ValueError(f"paged_attention: {num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if head_dim > 256:
        raise ValueError(f"paged_attention: head_dim {head_dim} > 256 is not supported")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise ValueError(f"paged_attention: {name} must be contiguous in its last dimension")
    group = num_heads // num_kv_heads
    page_size = k_pool.shape[1]
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device) if return_lse else None
    if num_tokens == 0 or batch.num_seqs == 0:
        return (out, lse) if return_lse else out

    block_m, block_n = _tiles(group, head_dim)
    tokens_per_tile = block_m // group
    decode = batch.max_seqlen_q <= 1
    splits = (num_splits or _decode_splits(batch, num_kv_heads, q.device)) if decode else 1
    split_size = triton.cdiv(triton.cdiv(max(batch.max_seqlen_k, 1), splits), block_n) * block_n
    upcast = interpreting() or q.dtype == torch.float32
    ieee = (q.dtype == torch.float32) if ieee is None else ieee
    if splits > 1:
        o_dst = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
        o_strides = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(2))
        lse_strides = (lse_dst.stride(0), lse_dst.stride(1))
    else:
        o_dst, lse_dst = out, lse
        o_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    grid = (batch.num_seqs, triton.cdiv(batch.max_seqlen_q, tokens_per_tile), num_kv_heads * splits)
    _paged_attention_fwd_kernel[grid](
        q, k_pool, v_pool, o_dst, lse_dst if lse_dst is not None else out,
        batch.cu_seqlens_q, batch.seq_lens_k, batch.block_table,
        scale * _LOG2E, split_size,
        q.stride(0), q.stride(1), *o_strides,
        k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
        batch.block_table.stride(0), *lse_strides,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), GROUP=group,
        BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=page_size,
        NUM_SPLITS=splits, STORE_LSE=lse_dst is not None, UPCAST=upcast, IEEE=ieee,
    )
    if splits > 1:
        _merge_splits(o_dst, lse_dst, batch, out, lse)
    return (out, lse) if return_lse else out


def _merge_splits(o_parts: torch.Tensor, lse_parts: torch.Tensor, batch, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Combine split-KV partial results by their log-sum-exp, for the rows that exist."""
    rows = batch.last_token_indices()  # decode: each sequence has at most one new token
    part_lse = lse_parts[rows]
    total = torch.logsumexp(part_lse, dim=-1)
    weights = torch.exp(part_lse - total[..., None])
    out[rows] = (weights[..., None] * o_parts[rows]).sum(dim=-2).to(out.dtype)
    if lse is not None:
        lse[rows] = total

