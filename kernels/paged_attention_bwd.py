"""Triton kernels: backward of paged attention (flash-attention style, from the saved log-sum-exp).

- dQ: one program per (sequence, query tile, kv head), the same tiling as the forward; it walks the
  keys the tile can see, recomputes P, and accumulates dS @ K.
- dK/dV: one program per (sequence, key tile, kv head); it walks the new query tokens that can see
  the tile (all query heads of the kv group in each row tile) and accumulates P^T dO and dS^T Q, then
  adds the result into the gradient pages that mirror the K/V pools. Without atomics: a key slot
  belongs to one sequence and one program per step. Sequences that share pages (forks) exist only in
  generation, never in a training step, so no two programs of a step write the same gradient slot.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import interpreting
from .paged_attention import _LOG2E, _dot, _load_kv_tile, _query_rows, _tiles


@triton.jit
def _bwd_dq_kernel(
    Q, DO, LSE, DELTA, K_POOL, V_POOL, DQ,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE,
    scale, scale_log2,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lt,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q_begin = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_begin
    if tile * TOKENS < q_len:
        k_len = tl.load(SEQ_LENS_K + seq)
        tok, head, row_ok, q_pos = _query_rows(tile, q_len, k_len, kv_head, GROUP, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q, do, lse2, delta, t = _load_query_grads(Q, DO, LSE, DELTA, q_begin, tok, head, row_ok, dims, dim_ok,
                                                  stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, UPCAST)
        last_tok = tl.minimum(tile * TOKENS + TOKENS, q_len) - 1
        kv_end = k_len - q_len + last_tok + 1
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = BLOCK_TABLE + seq.to(tl.int64) * stride_bt
        for start in range(0, kv_end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < kv_end
            k, v, _, _ = _load_kv_tile(K_POOL, V_POOL, table, k_pos, k_ok, kv_head, dims, dim_ok,
                                       stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                       PAGE_SIZE, UPCAST)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dq += _dot(ds.to(k.dtype), k, IEEE)
        dq = dq * scale
        tl.store(DQ + t[:, None] * stride_dqt + head[:, None] * stride_dqh + dims[None, :],
                 dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _load_query_grads(Q, DO, LSE, DELTA, q_begin, tok, head, row_ok, dims, dim_ok,
                      stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, UPCAST: tl.constexpr):
    """q, dO, the log-sum-exp (log2 units) and delta of a tile's rows, and their packed token index."""
    row_mask = row_ok[:, None] & dim_ok[None, :]
    t = (q_begin + tok).to(tl.int64)
    q = tl.load(Q + t[:, None] * stride_qt + head[:, None] * stride_qh + dims[None, :], mask=row_mask, other=0.0)
    do = tl.load(DO + t[:, None] * stride_dot + head[:, None] * stride_doh + dims[None, :], mask=row_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(LSE + t * stride_lt + head, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + t * stride_lt + head, mask=row_ok, other=0.0)
    return q, do, lse2, delta, t


@triton.jit
def _bwd_dkdv_kernel(
    Q, DO, LSE, DELTA, K_POOL, V_POOL, DK_POOL, DV_POOL,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE,
    scale, scale_log2,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_gkp, stride_gks, stride_gkh, stride_gvp, stride_gvs, stride_gvh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    k_start = tl.program_id(1) * BLOCK_N
    kv_head = tl.program_id(2)
    TOKENS: tl.constexpr = BLOCK_M // GROUP
    q_begin = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_begin
    k_len = tl.load(SEQ_LENS_K + seq)
    if (q_len > 0) & (k_start < k_len):
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        k_pos = k_start + tl.arange(0, BLOCK_N)
        k_ok = k_pos < k_len
        k, v, page, in_page = _load_kv_tile(K_POOL, V_POOL, BLOCK_TABLE + seq.to(tl.int64) * stride_bt, k_pos, k_ok,
                                            kv_head, dims, dim_ok, stride_kp, stride_ks, stride_kh,
                                            stride_vp, stride_vs, stride_vh, PAGE_SIZE, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        first_tile = tl.maximum(k_start - (k_len - q_len), 0) // TOKENS  # earlier queries cannot see this tile
        for tile in range(first_tile, tl.cdiv(q_len, TOKENS)):
            tok, head, row_ok, q_pos = _query_rows(tile, q_len, k_len, kv_head, GROUP, BLOCK_M)
            q, do, lse2, delta, _ = _load_query_grads(Q, DO, LSE, DELTA, q_begin, tok, head, row_ok, dims, dim_ok,
                                                      stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, UPCAST)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            dv += _dot(tl.trans(p.to(do.dtype)), do, IEEE)
            ds = p * (_dot(do, tl.trans(v), IEEE) - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        dk = dk * scale
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        gk = DK_POOL + page[:, None] * stride_gkp + in_page[:, None] * stride_gks + kv_head * stride_gkh + dims[None, :]
        gv = DV_POOL + page[:, None] * stride_gvp + in_page[:, None] * stride_gvs + kv_head * stride_gvh + dims[None, :]
        tl.store(gk, tl.load(gk, mask=kv_mask, other=0.0) + dk, mask=kv_mask)
        tl.store(gv, tl.load(gv, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


def paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float,
                             ieee: bool | None = None) -> torch.Tensor:
    """Gradients of `paged_attention`: returns dq; adds dK/dV (fp32) into the gradient pools."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    group = num_heads // num_kv_heads
    dq = torch.empty_like(q)
    if num_tokens == 0:
        return dq
    if grad_k_pool.dtype != torch.float32 or grad_v_pool.dtype != torch.float32:
        raise ValueError("paged_attention_backward: gradient pools must be float32")
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    block_m, block_n = _tiles(group, head_dim)
    tokens_per_tile = block_m // group
    upcast = interpreting() or q.dtype == torch.float32
    ieee = (q.dtype == torch.float32) if ieee is None else ieee
    common = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), GROUP=group,
                  BLOCK_M=block_m, BLOCK_N=block_n, PAGE_SIZE=k_pool.shape[1], UPCAST=upcast, IEEE=ieee)
    pools = (k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2))
    _bwd_dq_kernel[(batch.num_seqs, triton.cdiv(batch.max_seqlen_q, tokens_per_tile), num_kv_heads)](
        q, dout, lse, delta, k_pool, v_pool, dq,
        batch.cu_seqlens_q, batch.seq_lens_k, batch.block_table,
        scale, scale * _LOG2E,
        q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
        *pools, batch.block_table.stride(0), **common,
    )
    _bwd_dkdv_kernel[(batch.num_seqs, triton.cdiv(batch.max_seqlen_k, block_n), num_kv_heads)](
        q, dout, lse, delta, k_pool, v_pool, grad_k_pool, grad_v_pool,
        batch.cu_seqlens_q, batch.seq_lens_k, batch.block_table,
        scale, scale * _LOG2E,
        q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
        *pools,
        grad_k_pool.stride(0), grad_k_pool.stride(1), grad_k_pool.stride(2),
        grad_v_pool.stride(0), grad_v_pool.stride(1), grad_v_pool.stride(2), batch.block_table.stride(0),
        **common,
    )
    return dq
