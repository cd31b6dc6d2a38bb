"""Triton kernel: write new tokens' K and V into the page pools at their slots."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from coconut_engine.errors import KernelInputError

from ._launch import ATTENTION_DTYPES, check_dtype, check_same_device, device_guard, interpreting


@triton.jit
def _store_kv_kernel(K, V, K_POOL, V_POOL, SLOTS, num_tokens, stride_k, stride_v,
                     ROW: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    # One program writes BLOCK_T tokens; a token's row is its kv_heads * head_dim values.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    col = tl.arange(0, BLOCK_R)
    slot = tl.load(SLOTS + tok, mask=tok < num_tokens, other=-1)
    mask = (slot >= 0)[:, None] & (col < ROW)[None, :]
    tok64 = tok.to(tl.int64)[:, None]
    dst = slot[:, None] * ROW + col[None, :]
    k = tl.load(K + tok64 * stride_k + col[None, :], mask=mask)
    tl.store(K_POOL + dst, k.to(K_POOL.dtype.element_ty), mask=mask)
    v = tl.load(V + tok64 * stride_v + col[None, :], mask=mask)
    tl.store(V_POOL + dst, v.to(V_POOL.dtype.element_ty), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slot_mapping: torch.Tensor,
             every_slot_valid: bool = False) -> None:
    """Write `k`, `v` (`[T, kv_heads, head_dim]`, heads and dims contiguous) at `slot_mapping` (-1 = skip).

    `every_slot_valid` (no slot is -1) is accepted for the torch backend's signature; the kernel
    masks -1 slots on the device either way.

    k and v are converted to the pools' dtype on the way; wrong dtypes or devices raise KernelInputError.
    """
    op = "store_kv"
    for name, t in (("k", k), ("v", v), ("k_pool", k_pool), ("v_pool", v_pool)):
        check_dtype(op, name, t, ATTENTION_DTYPES)
    check_dtype(op, "slot_mapping", slot_mapping, torch.int64)
    check_same_device(op, {"k": k, "v": v, "k_pool": k_pool, "v_pool": v_pool, "slot_mapping": slot_mapping})
    if k.dim() != 3 or v.shape != k.shape or k_pool.dim() != 4 or v_pool.shape != k_pool.shape \
            or k.shape[1:] != k_pool.shape[2:]:
        # the kernel writes kv_heads * head_dim values per slot: other shapes would land in the wrong slots
        raise KernelInputError(f"{op}: k and v must be [tokens, kv_heads, head_dim] and k_pool, v_pool "
                               f"[pages, page_size, kv_heads, head_dim] with the same kv_heads and head_dim; got "
                               f"k {tuple(k.shape)}, v {tuple(v.shape)}, k_pool {tuple(k_pool.shape)}, "
                               f"v_pool {tuple(v_pool.shape)}")
    if slot_mapping.shape != k.shape[:1] or (k.shape[0] > 1 and slot_mapping.stride(0) != 1):
        raise KernelInputError(f"{op}: slot_mapping must be 1-D with one consecutive entry per token "
                               f"({k.shape[0]}), got shape {tuple(slot_mapping.shape)} strides {slot_mapping.stride()}")
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    row = k.shape[1] * k.shape[2]
    for name, t in (("k", k), ("v", v)):
        if t.stride(2) != 1 or t.stride(1) != t.shape[2]:
            raise ValueError(f"store_kv: {name} must have contiguous [kv_heads, head_dim] rows, strides {t.stride()}")
    for name, pool in (("k_pool", k_pool), ("v_pool", v_pool)):
        if not pool.is_contiguous():
            raise ValueError(f"store_kv: {name} must be contiguous")
    block_t = 64 if interpreting() else 8
    grid = (triton.cdiv(num_tokens, block_t),)
    with device_guard(k.device):
        _store_kv_kernel[grid](k, v, k_pool, v_pool, slot_mapping, num_tokens, k.stride(0), v.stride(0),
                               ROW=row, BLOCK_T=block_t, BLOCK_R=triton.next_power_of_2(row))
