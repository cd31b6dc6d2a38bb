"""Triton kernel: varlen causal GQA attention of packed queries over a paged KV cache.

One program handles a tile of query rows of one sequence and one kv head. The rows of a tile are
(token, query head of the kv group) pairs, so the query heads that share a kv head are computed
together by one `tl.dot` of at least 16 rows, whatever the q length (a decode step still fills the
tile with the group's heads). Keys are read position by position through the block table, so the
key tile is independent of the page size. Softmax is online with fp32 accumulators.

For decode steps (every q_len <= DECODE_MAX_Q: one token, or generation's last thought with its
`<eot>`) the key range can be split across programs ("flash-decoding"); each split writes a partial
output and its log-sum-exp per query row, and one merge kernel combines them on the device
(nothing is built on the host per layer). The split count is a runtime argument: a new count
compiles nothing new.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from coconut_engine.errors import KernelInputError

from ._launch import (ATTENTION_DTYPES, check_batch, check_dtype, check_same_device, check_same_dtype, device_guard,
                      interpreting, multiprocessor_count)
from .dropout import AttentionDropout, as_int32

_LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """tl.dot with exact fp32 products when IEEE (for comparisons), the fast default otherwise."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _mix32(x):
    """The 32-bit hash finaliser of `kernels/dropout.py` (`mix32`), on uint32 values."""
    x ^= x >> 16
    x *= 0x21F0AAAD
    x ^= x >> 15
    x *= 0x735A2D97
    x ^= x >> 15
    return x


@triton.jit
def _dropout_row_hash(seed, ROWS, seq, head, q_pos):
    """The hash of (layer seed, the sequence's mask row, each tile row's head and query position),
    `[BLOCK_M]` uint32: the part of `dropout.keep_mask` that does not depend on the key."""
    row = tl.load(ROWS + seq).to(tl.uint32)
    h = _mix32(seed.to(tl.uint32, bitcast=True) ^ row)
    h = _mix32(h ^ head.to(tl.uint32))
    return _mix32(h ^ q_pos.to(tl.uint32))


@triton.jit
def _dropout_keep(row_hash, k_pos, threshold):
    """`[BLOCK_M, BLOCK_N]` keep mask of the tile's rows (`_dropout_row_hash`) over keys `k_pos`."""
    h = _mix32(row_hash[:, None] ^ k_pos.to(tl.uint32)[None, :])
    return (h >> 8).to(tl.int32) >= threshold


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
def _load_kv_tile(K_POOL, V_POOL, table, stride_bp, k_pos, k_ok, kv_head, dims, dim_ok,
                  stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                  PAGE_SIZE: tl.constexpr, UPCAST: tl.constexpr):
    """K and V rows of key positions `k_pos` of one sequence, read through its block table row `table`
    (entries `stride_bp` apart). Returns (k, v, page, offset in page); the tile size is independent of
    the page size.
    """
    page = tl.load(table + (k_pos // PAGE_SIZE) * stride_bp, mask=k_ok, other=0).to(tl.int64)
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


# The split count and the strides that follow from it are not specialised: a new count compiles nothing.
# The dropout seed and threshold are not specialised either: a new seed per forward compiles nothing new.
@triton.jit(do_not_specialize=["num_splits", "stride_lt", "stride_ls", "drop_seed", "drop_threshold"])
def _paged_attention_fwd_kernel(
    Q, K_POOL, V_POOL, O, LSE,
    CU_SEQLENS_Q, SEQ_LENS_K, BLOCK_TABLE, DROP_ROWS,
    scale_log2, split_size, num_splits, drop_seed, drop_threshold, drop_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_os,
    stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
    stride_bt, stride_bp, stride_lt, stride_ls,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    STORE_LSE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, DROPOUT: tl.constexpr,
):
    seq = tl.program_id(0)
    tile = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits
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
        if DROPOUT:
            row_hash = _dropout_row_hash(drop_seed, DROP_ROWS, seq, head, q_pos)
        for start in range(kv_lo, kv_hi, BLOCK_N):
            k_pos = start + tl.arange(0, BLOCK_N)
            k_ok = k_pos < kv_hi
            k, v, _, _ = _load_kv_tile(K_POOL, V_POOL, table, stride_bp, k_pos, k_ok, kv_head, dims, dim_ok,
                                       stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh,
                                       PAGE_SIZE, UPCAST)
            s = _dot(q, tl.trans(k), IEEE)
            visible = (k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :]
            s = tl.where(visible, s * scale_log2, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp2(s - m_safe[:, None])
            alpha = tl.exp2(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)  # the normaliser sums the probabilities before dropout
            if DROPOUT:
                p = tl.where(_dropout_keep(row_hash, k_pos, drop_threshold), p * drop_scale, 0.0)
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



@triton.jit(do_not_specialize=["num_splits", "stride_lpt", "stride_lph"])
def _merge_splits_kernel(
    O_PARTS, LSE_PARTS, OUT, LSE, CU_SEQLENS_Q, num_splits,
    stride_pt, stride_ph, stride_ps, stride_lpt, stride_lph, stride_ot, stride_oh, stride_lt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, STORE_LSE: tl.constexpr,
):
    """Flash-decoding's second stage: one program per (sequence, query head) combines, for each of
    the sequence's new tokens (at most DECODE_MAX_Q), the split partial outputs by their log-sum-exp."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    q_begin = tl.load(CU_SEQLENS_Q + seq)
    q_len = tl.load(CU_SEQLENS_Q + seq + 1) - q_begin
    for t in range(0, q_len):
        row = (q_begin + t).to(tl.int64)
        dims = tl.arange(0, BLOCK_D)
        dim_ok = dims < HEAD_DIM
        lse_row = LSE_PARTS + row * stride_lpt + head * stride_lph
        m = tl.max(tl.full([BLOCK_S], float("-inf"), tl.float32), 0)
        for s0 in range(0, num_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            m = tl.maximum(m, tl.max(tl.load(lse_row + s, mask=s < num_splits, other=float("-inf")), 0))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        total = tl.zeros([BLOCK_D], tl.float32)
        weight = tl.sum(tl.zeros([BLOCK_S], tl.float32), 0)
        for s0 in range(0, num_splits, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < num_splits
            w = tl.exp(tl.load(lse_row + s, mask=s_ok, other=float("-inf")) - m_safe)
            o = tl.load(O_PARTS + row * stride_pt + head * stride_ph + s[:, None] * stride_ps + dims[None, :],
                        mask=s_ok[:, None] & dim_ok[None, :], other=0.0)
            total += tl.sum(w[:, None] * o, 0)
            weight += tl.sum(w, 0)
        out = total / tl.where(weight == 0.0, 1.0, weight)
        tl.store(OUT + row * stride_ot + head * stride_oh + dims, out.to(OUT.dtype.element_ty), mask=dim_ok)
        if STORE_LSE:
            tl.store(LSE + row * stride_lt + head, tl.where(weight == 0.0, float("-inf"), m_safe + tl.log(weight)))


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options of one kernel variant."""

    block_m: int  # query rows (token, head) per tile
    block_n: int  # keys per tile
    num_warps: int
    num_stages: int


MAX_SPLITS = 128
# A step of at most this many new tokens per sequence is a decode step: its tiles hold the kv group's
# heads only and its keys may be split. One token, or two: generation feeds a sequence's last thought
# and its <eot> in one step, next to one-token sequences.
DECODE_MAX_Q = 2
MIN_KEYS_PER_SPLIT = 256
_MERGE_BLOCK_S = 16


def forward_config(group: int, head_dim: int, dtype: torch.dtype, ieee: bool, decode: bool) -> TileConfig:
    """Tiles of the forward kernel. Under the interpreter: big tiles (its cost is programs x iterations).

    Compiled: a decode step (DECODE_MAX_Q) fills a tile with the kv group's heads only; exact fp32 (IEEE) dots keep
    three times the products live, so they get smaller key tiles.
    """
    rows = max(16, triton.next_power_of_2(group))
    if interpreting():
        return TileConfig(max(rows, 64), 64, 4, 1)
    exact = ieee and dtype == torch.float32
    block_m = rows if decode else max(rows, 64 if head_dim <= 128 and not exact else 32)
    if exact:
        block_n = 32 if head_dim <= 64 else 16
    else:
        block_n = 64 if head_dim <= 128 else 32
    return TileConfig(block_m, block_n, 4 if head_dim <= 64 else 8, 2)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_seqlen_k: int, num_sms: int) -> int:
    """Split count of a decode step for occupancy (FlashAttention-2's num_splits idea).

    A step with at least one program per SM is not split. Otherwise aim at ~4 programs per SM, with at
    least MIN_KEYS_PER_SPLIT keys per split and at most MAX_SPLITS splits.
    """
    programs = max(1, num_seqs * num_kv_heads)
    if programs >= num_sms:
        return 1
    wanted = triton.cdiv(4 * num_sms, programs)
    return max(1, min(wanted, triton.cdiv(max(max_seqlen_k, 1), MIN_KEYS_PER_SPLIT), MAX_SPLITS))


def split_keys(num_splits: int | None, q: torch.Tensor, num_seqs: int, num_kv_heads: int, max_seqlen_k: int,
               block_n: int) -> tuple[int, int]:
    """(splits, keys per split) of a decode step: `num_splits` when given, one split under the
    interpreter or off CUDA, else `choose_num_splits`; each split a whole number of key tiles."""
    if num_splits is not None:
        splits = max(1, int(num_splits))
    elif interpreting() or q.device.type != "cuda":
        splits = 1
    else:
        splits = choose_num_splits(num_seqs, num_kv_heads, max_seqlen_k, multiprocessor_count(q.device))
    return splits, triton.cdiv(triton.cdiv(max(max_seqlen_k, 1), splits), block_n) * block_n


def check_attention_inputs(op: str, q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, batch,
                           **more: torch.Tensor) -> None:
    """Dtypes, devices and shapes a paged-attention kernel relies on, each failure a KernelInputError."""
    check_dtype(op, "q", q, ATTENTION_DTYPES)
    check_same_dtype(op, {"q": q, "k_pool": k_pool, "v_pool": v_pool})
    meta = check_batch(op, batch)
    check_same_device(op, {"q": q, "k_pool": k_pool, "v_pool": v_pool, **more, **meta})
    if q.dim() != 3 or k_pool.dim() != 4 or v_pool.shape != k_pool.shape:
        raise KernelInputError(f"{op}: q must be [tokens, heads, head_dim] and k_pool, v_pool one shape "
                               f"[pages, page_size, kv_heads, head_dim]; got q {tuple(q.shape)}, "
                               f"k_pool {tuple(k_pool.shape)}, v_pool {tuple(v_pool.shape)}")
    if k_pool.shape[3] != q.shape[2]:
        raise KernelInputError(f"{op}: q head_dim {q.shape[2]} != k_pool head_dim {k_pool.shape[3]}")
    if q.shape[1] % k_pool.shape[2]:
        raise KernelInputError(f"{op}: {q.shape[1]} query heads are not a multiple of {k_pool.shape[2]} kv heads")
    if q.shape[2] > 256:
        raise KernelInputError(f"{op}: head_dim {q.shape[2]} > 256 is not supported")
    for name, t in (("q", q), ("k_pool", k_pool), ("v_pool", v_pool)):
        if t.stride(-1) != 1:
            raise KernelInputError(f"{op}: {name} must be contiguous in its last dimension, strides {t.stride()}")


def check_dropout(op: str, dropout: AttentionDropout | None, batch) -> None:
    """The dropout's mask rows: int32, one per sequence, on the batch's device (a KernelInputError otherwise)."""
    if dropout is None:
        return
    check_dtype(op, "dropout.rows", dropout.rows, torch.int32)
    num_seqs = batch.cu_seqlens_q.shape[0] - 1
    if dropout.rows.dim() != 1 or dropout.rows.shape[0] != num_seqs or (num_seqs > 1 and dropout.rows.stride(0) != 1):
        raise KernelInputError(f"{op}: dropout.rows must be 1-D with one consecutive entry per sequence ({num_seqs}), "
                               f"got shape {tuple(dropout.rows.shape)} strides {dropout.rows.stride()}")
    check_same_device(op, {"dropout.rows": dropout.rows, "batch.cu_seqlens_q": batch.cu_seqlens_q})


def dropout_args(dropout: AttentionDropout | None, batch) -> tuple[torch.Tensor]:
    """The kernels' mask-row pointer argument (any int32 tensor of the step when there is no dropout)."""
    return (dropout.rows if dropout is not None else batch.cu_seqlens_q,)


def dropout_values(dropout: AttentionDropout | None) -> tuple[int, int, float]:
    """The kernels' (seed as int32, threshold, scale) arguments; unused values without dropout."""
    if dropout is None:
        return 0, 0, 1.0
    return as_int32(dropout.seed), dropout.threshold, dropout.scale


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
    dropout: AttentionDropout | None = None,
):
    """Causal GQA attention of packed `q` (`[T, heads, head_dim]`) over the K/V page pools.

    `batch` is the step's AttentionBatch. Returns `out` (q's dtype), plus the natural-log
    log-sum-exp (`[T, heads]` fp32) when `return_lse`. `num_splits` forces the decode split count
    (only used when every q_len <= DECODE_MAX_Q); `ieee` asks for exact fp32 dots (default: TF32 dots
    for fp32 inputs on the GPU). `dropout` drops attention probabilities (training; `kernels/dropout.py`; the
    log-sum-exp is that of the probabilities before dropout); without it the kernel has no dropout code.
    Rows of `out` that belong to no sequence's new tokens are never written.
    Reads only device metadata and the batch's host ints: no host-device synchronisation.
    """
    op = "paged_attention"
    check_attention_inputs(op, q, k_pool, v_pool, batch, **({"out": out} if out is not None else {}))
    check_dropout(op, dropout, batch)
    if out is not None:
        check_dtype(op, "out", out, q.dtype)
        if out.dim() != 3 or out.shape[0] < q.shape[0] or out.shape[1:] != q.shape[1:] or out.stride(-1) != 1:
            raise KernelInputError(f"{op}: out must have q's shape {tuple(q.shape)} (or more rows), contiguous in "
                                   f"its last dimension; got shape {tuple(out.shape)} strides {out.stride()}")
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pool.shape[2]
    num_seqs = batch.cu_seqlens_q.shape[0] - 1
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device) if return_lse else None
    if num_tokens == 0 or num_seqs == 0:
        return (out, lse) if return_lse else out

    ieee = bool(ieee)
    decode = batch.max_seqlen_q <= DECODE_MAX_Q
    cfg = forward_config(group, head_dim, q.dtype, ieee, decode)
    splits, split_size = split_keys(num_splits if decode else 1, q, num_seqs, num_kv_heads, batch.max_seqlen_k,
                                    cfg.block_n)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if splits > 1:
        o_dst = torch.empty((num_tokens, num_heads, splits, head_dim), dtype=torch.float32, device=q.device)
        lse_dst = torch.empty((num_tokens, num_heads, splits), dtype=torch.float32, device=q.device)
        o_strides = (o_dst.stride(0), o_dst.stride(1), o_dst.stride(2))
        lse_strides = (lse_dst.stride(0), lse_dst.stride(1))
    else:
        o_dst, lse_dst = out, lse
        o_strides = (out.stride(0), out.stride(1), 0)
        lse_strides = (lse.stride(0), lse.stride(1)) if lse is not None else (0, 0)
    table = batch.block_table
    grid = (num_seqs, triton.cdiv(batch.max_seqlen_q, cfg.block_m // group), num_kv_heads * splits)
    with device_guard(q.device):
        _paged_attention_fwd_kernel[grid](
            q, k_pool, v_pool, o_dst, lse_dst if lse_dst is not None else out,
            batch.cu_seqlens_q, batch.seq_lens_k, table, *dropout_args(dropout, batch),
            scale * _LOG2E, split_size, splits, *dropout_values(dropout),
            q.stride(0), q.stride(1), *o_strides,
            k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
            v_pool.stride(0), v_pool.stride(1), v_pool.stride(2),
            table.stride(0), table.stride(1), *lse_strides,
            HEAD_DIM=head_dim, BLOCK_D=block_d, GROUP=group,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, PAGE_SIZE=k_pool.shape[1],
            STORE_LSE=lse_dst is not None, UPCAST=interpreting() or q.dtype == torch.float32, IEEE=ieee,
            DROPOUT=dropout is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        if splits > 1:
            _merge_splits_kernel[(num_seqs, num_heads)](
                o_dst, lse_dst, out, lse if lse is not None else lse_dst, batch.cu_seqlens_q, splits,
                o_dst.stride(0), o_dst.stride(1), o_dst.stride(2), lse_dst.stride(0), lse_dst.stride(1),
                out.stride(0), out.stride(1), lse.stride(0) if lse is not None else 0,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=_MERGE_BLOCK_S, STORE_LSE=lse is not None,
            )
    return (out, lse) if return_lse else out
