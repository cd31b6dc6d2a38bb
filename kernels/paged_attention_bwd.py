"""Triton kernels: backward of paged attention (flash-attention style, from the saved log-sum-exp).

- dQ: one program per (sequence, query tile, kv head), the same tiling as the forward; it walks the
  keys the tile can see, recomputes P, and accumulates dS @ K.
- dK/dV: one program per (sequence, key tile, kv head); it walks the new query tokens that can see
  the tile (all query heads of the kv group in each row tile) and accumulates P^T dO and dS^T Q, then
  adds the result into the gradient pages that mirror the K/V pools. Without atomics: a key slot
  belongs to one sequence and one program per step. Sequences that share pages (forks) exist only in
  generation, never in a training step, so no two programs of a step write the same gradient slot.
- One-token steps (every q_len <= 1, a continuous-thought step): one fused kernel per (sequence, kv
  head, key split) reads each K/V tile once for dK/dV and dQ; each split accumulates its share of dQ
  in fp32 and the shares are summed on the device.

Launch configurations come from a small table keyed on head_dim (the interpreter uses big tiles).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from coconut_engine.errors import KernelInputError

from ._launch import check_dtype, check_same_device, device_guard, interpreting
from .dropout import AttentionDropout
from .paged_attention import (_LOG2E, TileConfig, _dot, _dropout_keep, _dropout_row_hash, _load_kv_tile, _query_rows,
                              check_attention_inputs, check_dropout, dropout_args, dropout_values, split_keys)


@triton.jit(do_not_specialize=["drop_seed", "drop_threshold"])
def _bwd_dq_kernel(
    Q, DO, LSE, DELTA, K_POOL, V_POOL, DQ,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE, DROP_ROWS,
    scale, scale_log2, drop_seed, drop_threshold, drop_scale,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_dqt, stride_dqh, stride_lt,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_bt, stride_bp,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
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
        if DROPOUT:
            row_hash = _dropout_row_hash(drop_seed, DROP_ROWS, seq, head, q_pos)
        for start in range(0, kv_end, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < kv_end
            k, v, _, _ = _load_kv_tile(K_POOL, V_POOL, table, stride_bp, k_pos, k_ok, kv_head, dims, dim_ok,
                                       stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                       PAGE_SIZE, UPCAST)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            dp = _dot(do, tl.trans(v), IEEE)
            if DROPOUT:  # the gradient reaches the probabilities through the kept entries only
                dp = tl.where(_dropout_keep(row_hash, k_pos, drop_threshold), dp * drop_scale, 0.0)
            ds = p * (dp - delta[:, None])
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
def _dropout_grads(p, dp, drop_seed, DROP_ROWS, seq, head, q_pos, k_pos, drop_threshold, drop_scale,
                   DROPOUT: tl.constexpr):
    """(the probabilities the forward multiplied V by, the gradient of the probabilities before dropout)
    from the recomputed probabilities `p` and dO V^T `dp`: both masked and scaled as the forward's mask.
    Without DROPOUT they are `p` and `dp`."""
    if DROPOUT:
        keep = _dropout_keep(_dropout_row_hash(drop_seed, DROP_ROWS, seq, head, q_pos), k_pos, drop_threshold)
        p = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    return p, dp


@triton.jit(do_not_specialize=["drop_seed", "drop_threshold"])
def _bwd_dkdv_kernel(
    Q, DO, LSE, DELTA, K_POOL, V_POOL, DK_POOL, DV_POOL,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE, DROP_ROWS,
    scale, scale_log2, drop_seed, drop_threshold, drop_scale,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_lt,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_gkp, stride_gks, stride_gkh, stride_gvp, stride_gvs, stride_gvh, stride_bt, stride_bp,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
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
        k, v, page, in_page = _load_kv_tile(K_POOL, V_POOL, BLOCK_TABLE + seq.to(tl.int64) * stride_bt, stride_bp,
                                            k_pos, k_ok,
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
            p_kept, dp = _dropout_grads(p, _dot(do, tl.trans(v), IEEE), drop_seed, DROP_ROWS, seq, head, q_pos, k_pos,
                                        drop_threshold, drop_scale, DROPOUT)
            dv += _dot(tl.trans(p_kept.to(do.dtype)), do, IEEE)
            ds = p * (dp - delta[:, None])
            dk += _dot(tl.trans(ds.to(q.dtype)), q, IEEE)
        dk = dk * scale
        kv_mask = k_ok[:, None] & dim_ok[None, :]
        gk = DK_POOL + page[:, None] * stride_gkp + in_page[:, None] * stride_gks + kv_head * stride_gkh + dims[None, :]
        gv = DV_POOL + page[:, None] * stride_gvp + in_page[:, None] * stride_gvs + kv_head * stride_gvh + dims[None, :]
        tl.store(gk, tl.load(gk, mask=kv_mask, other=0.0) + dk, mask=kv_mask)
        tl.store(gv, tl.load(gv, mask=kv_mask, other=0.0) + dv, mask=kv_mask)


@triton.jit(do_not_specialize=["num_splits", "drop_seed", "drop_threshold"])
def _bwd_one_token_kernel(
    Q, DO, LSE, DELTA, K_POOL, V_POOL, DK_POOL, DV_POOL, DQ,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE, DROP_ROWS,
    scale, scale_log2, split_size, num_splits, drop_seed, drop_threshold, drop_scale,
    stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, stride_dqt, stride_dqh, stride_dqs,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_gkp, stride_gks, stride_gkh, stride_gvp, stride_gvs, stride_gvh, stride_bt, stride_bp,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
):
    """Backward of a step whose sequences have at most one new token: each K/V tile is read once for
    dK, dV and this split's share of dQ."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // num_splits
    split = tl.program_id(1) % num_splits
    q_begin = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_begin
    if q_len > 0:
        k_len = tl.load(SEQ_LENS_K + seq)
        tok, head, row_ok, q_pos = _query_rows(0, q_len, k_len, kv_head, GROUP, BLOCK_M)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        q, do, lse2, delta, t = _load_query_grads(Q, DO, LSE, DELTA, q_begin, tok, head, row_ok, dims, dim_ok,
                                                  stride_qt, stride_qh, stride_dot, stride_doh, stride_lt, UPCAST)
        kv_lo = split * split_size
        kv_hi = tl.minimum(k_len, kv_lo + split_size)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        table = BLOCK_TABLE + seq.to(tl.int64) * stride_bt
        for start in range(kv_lo, kv_hi, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < kv_hi
            k, v, page, in_page = _load_kv_tile(K_POOL, V_POOL, table, stride_bp, k_pos, k_ok, kv_head, dims,
                                                dim_ok, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs,
                                                stride_vh, PAGE_SIZE, UPCAST)
            s = _dot(q, tl.trans(k), IEEE) * scale_log2
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :] & row_ok[:, None]
            p = tl.where(visible, tl.exp2(s - lse2[:, None]), 0.0)
            p_kept, dp = _dropout_grads(p, _dot(do, tl.trans(v), IEEE), drop_seed, DROP_ROWS, seq, head, q_pos, k_pos,
                                        drop_threshold, drop_scale, DROPOUT)
            dv = _dot(tl.trans(p_kept.to(do.dtype)), do, IEEE)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, IEEE) * scale
            dq += _dot(ds.to(k.dtype), k, IEEE)
            kv_mask = k_ok[:, None] & dim_ok[None, :]
            gk = (DK_POOL + page[:, None] * stride_gkp + in_page[:, None] * stride_gks + kv_head * stride_gkh
                  + dims[None, :])
            gv = (DV_POOL + page[:, None] * stride_gvp + in_page[:, None] * stride_gvs + kv_head * stride_gvh
                  + dims[None, :])
            tl.store(gk, tl.load(gk, mask=kv_mask, other=0.0) + dk, mask=kv_mask)
            tl.store(gv, tl.load(gv, mask=kv_mask, other=0.0) + dv, mask=kv_mask)
        tl.store(DQ + t[:, None] * stride_dqt + head[:, None] * stride_dqh + split * stride_dqs + dims[None, :],
                 (dq * scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])


def backward_config(group: int, head_dim: int, dtype: torch.dtype, ieee: bool, one_token: bool) -> TileConfig:
    """Tiles and launch options of the backward kernels, by head_dim (the interpreter: big tiles).

    dK/dV keeps two [BLOCK_N, head_dim] fp32 accumulators live: from head_dim 80 up it runs 8 warps
    with smaller key tiles so that nothing spills (kernels/aot_check.py checks it for sm_90a and sm_80);
    exact fp32 (IEEE) dots get smaller tiles still.
    """
    rows = max(16, triton.next_power_of_2(group))
    if interpreting():
        return TileConfig(max(rows, 64), 64, 4, 1)
    exact = ieee and dtype == torch.float32
    tf32 = dtype == torch.float32 and not exact  # fp32 operands are twice as wide: smaller tiles, 4 warps fit
    if one_token:
        return TileConfig(rows, 16 if exact else 32, 8, 2)
    if head_dim <= 64:
        return TileConfig(max(rows, 32 if exact or tf32 else 64), 32, 4, 2)
    if head_dim <= 128:
        if tf32:
            return TileConfig(max(rows, 32), 16, 4, 2)
        return TileConfig(max(rows, 32), 16 if exact else 32, 8, 2)
    return TileConfig(max(rows, 16), 16, 8, 2)


def paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k_pool, grad_v_pool, batch, scale: float,
                             ieee: bool | None = None, num_splits: int | None = None,
                             dropout: AttentionDropout | None = None) -> torch.Tensor:
    """Gradients of `paged_attention`: returns dq; adds dK/dV (fp32) into the gradient pools.

    A step whose sequences have at most one new token each runs the fused one-token kernel (its keys
    split across programs as the forward's; `num_splits` forces the count). `ieee` asks for exact fp32
    dots (default: TF32 dots for fp32 inputs on the GPU). `dropout` must be the forward's: its mask is
    recomputed from the seed (FlashAttention-2's backward with dropout; delta = rowsum(dO * O) still).
    """
    op = "paged_attention_backward"
    check_attention_inputs(op, q, k_pool, v_pool, batch)
    check_dropout(op, dropout, batch)
    check_same_device(op, {"q": q, "dout": dout, "out": out, "lse": lse, "grad_k_pool": grad_k_pool,
                           "grad_v_pool": grad_v_pool})
    for name, t in (("dout", dout), ("out", out)):
        check_dtype(op, name, t, q.dtype)
    for name, t in (("lse", lse), ("grad_k_pool", grad_k_pool), ("grad_v_pool", grad_v_pool)):
        check_dtype(op, name, t, torch.float32)
    if dout.shape != q.shape or out.shape != q.shape or lse.shape != q.shape[:2]:
        raise KernelInputError(f"{op}: dout and out must have q's shape {tuple(q.shape)} and lse {tuple(q.shape[:2])}; "
                               f"got dout {tuple(dout.shape)}, out {tuple(out.shape)}, lse {tuple(lse.shape)}")
    if grad_k_pool.shape != k_pool.shape or grad_v_pool.shape != k_pool.shape:
        raise KernelInputError(f"{op}: grad_k_pool {tuple(grad_k_pool.shape)} and grad_v_pool "
                               f"{tuple(grad_v_pool.shape)} must have k_pool's shape {tuple(k_pool.shape)}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    num_seqs = batch.cu_seqlens_q.shape[0] - 1
    group = num_heads // num_kv_heads
    dq = torch.empty_like(q)
    if num_tokens == 0 or num_seqs == 0:
        return dq
    dout = dout.contiguous()
    delta = (dout.float() * out.float()).sum(-1).contiguous()
    lse = lse.contiguous()
    ieee = bool(ieee)
    one_token = batch.max_seqlen_q <= 1
    cfg = backward_config(group, head_dim, q.dtype, ieee, one_token)
    common = dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), GROUP=group,
                  BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_SIZE=k_pool.shape[1],
                  UPCAST=interpreting() or q.dtype == torch.float32, IEEE=ieee, DROPOUT=dropout is not None,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    pools = (k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), v_pool.stride(0), v_pool.stride(1), v_pool.stride(2))
    grads = (grad_k_pool.stride(0), grad_k_pool.stride(1), grad_k_pool.stride(2),
             grad_v_pool.stride(0), grad_v_pool.stride(1), grad_v_pool.stride(2))
    table = batch.block_table
    meta = (batch.cu_seqlens_q, batch.seq_lens_k, table, *dropout_args(dropout, batch))
    drop = dropout_values(dropout)
    with device_guard(q.device):
        if one_token:
            splits, split_size = split_keys(num_splits, q, num_seqs, num_kv_heads, batch.max_seqlen_k, cfg.block_n)
            dq_dst = dq if splits == 1 else torch.empty((num_tokens, num_heads, splits, head_dim),
                                                        dtype=torch.float32, device=q.device)
            _bwd_one_token_kernel[(num_seqs, num_kv_heads * splits)](
                q, dout, lse, delta, k_pool, v_pool, grad_k_pool, grad_v_pool, dq_dst, *meta,
                scale, scale * _LOG2E, split_size, splits, *drop,
                q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
                dq_dst.stride(0), dq_dst.stride(1), dq_dst.stride(2) if splits > 1 else 0,
                *pools, *grads, table.stride(0), table.stride(1), **common,
            )
            if splits > 1:
                dq.copy_(dq_dst.sum(2))
            return dq
        _bwd_dq_kernel[(num_seqs, triton.cdiv(batch.max_seqlen_q, cfg.block_m // group), num_kv_heads)](
            q, dout, lse, delta, k_pool, v_pool, dq, *meta,
            scale, scale * _LOG2E, *drop,
            q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0),
            *pools, table.stride(0), table.stride(1), **common,
        )
        _bwd_dkdv_kernel[(num_seqs, triton.cdiv(batch.max_seqlen_k, cfg.block_n), num_kv_heads)](
            q, dout, lse, delta, k_pool, v_pool, grad_k_pool, grad_v_pool, *meta,
            scale, scale * _LOG2E, *drop,
            q.stride(0), q.stride(1), dout.stride(0), dout.stride(1), lse.stride(0),
            *pools, *grads, table.stride(0), table.stride(1), **common,
        )
    return dq
