"""Launch-time helpers shared by the kernel wrappers: interpreter detection, input checks, device guard."""
from __future__ import annotations

import contextlib
import functools
import os

import torch

from coconut_engine.errors import KernelInputError

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The values Triton itself reads as true for a boolean variable such as TRITON_INTERPRET (case-insensitive).
TRUE_VALUES = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, or true / on / yes as
    Triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in TRUE_VALUES


def device_guard(device: torch.device):
    """The context a launch runs under: `device` made current for CUDA (rank k's kernels run on GPU k)."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (read once per device)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_same_device(op: str, tensors: dict[str, torch.Tensor]) -> torch.device:
    """The one device of `tensors`; a KernelInputError naming each tensor's device otherwise."""
    devices = {name: t.device for name, t in tensors.items()}
    first = next(iter(devices.values()))
    if any(d != first for d in devices.values()):
        listing = ", ".join(f"{name} on {d}" for name, d in devices.items())
        raise KernelInputError(f"{op}: all tensors must be on one device, got {listing}")
    return first


def check_dtype(op: str, name: str, t: torch.Tensor, allowed) -> None:
    """KernelInputError naming `name` unless `t.dtype` is one of `allowed` (a dtype or a tuple of them)."""
    allowed = allowed if isinstance(allowed, tuple) else (allowed,)
    if t.dtype not in allowed:
        want = " or ".join(str(d).replace("torch.", "") for d in allowed)
        raise KernelInputError(f"{op}: {name} must be {want}, got {str(t.dtype).replace('torch.', '')}")


def check_same_dtype(op: str, tensors: dict[str, torch.Tensor]) -> None:
    """KernelInputError naming each tensor's dtype unless they all share one."""
    dtypes = {name: t.dtype for name, t in tensors.items()}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} {str(d).replace('torch.', '')}" for name, d in dtypes.items())
        raise KernelInputError(f"{op}: these tensors must share one dtype, got {listing}")


def check_batch(op: str, batch) -> dict[str, torch.Tensor]:
    """Check the step metadata a kernel reads (dtypes, the block table's page stride); returns it by name."""
    meta = {"batch.cu_seqlens_q": batch.cu_seqlens_q, "batch.seq_lens_k": batch.seq_lens_k,
            "batch.block_table": batch.block_table}
    for name, t in meta.items():
        check_dtype(op, name, t, torch.int32)
    if batch.block_table.dim() != 2:
        raise KernelInputError(f"{op}: batch.block_table must be 2-D [sequences, pages], got shape "
                               f"{tuple(batch.block_table.shape)}")
    # The kernels read entry b of these at offset b (the block table's strides are passed instead), and
    # one row per sequence: anything else reads the wrong lengths, or past the end, without an error.
    num_seqs = batch.cu_seqlens_q.shape[0] - 1 if batch.cu_seqlens_q.dim() == 1 else -1
    for name in ("batch.cu_seqlens_q", "batch.seq_lens_k"):
        t = meta[name]
        if t.dim() != 1 or (t.shape[0] > 1 and t.stride(0) != 1):
            raise KernelInputError(f"{op}: {name} must be 1-D with consecutive entries, got shape {tuple(t.shape)} "
                                   f"strides {t.stride()}")
    if batch.seq_lens_k.shape[0] != num_seqs or batch.block_table.shape[0] != num_seqs:
        raise KernelInputError(f"{op}: batch.cu_seqlens_q {tuple(batch.cu_seqlens_q.shape)} must have one entry more "
                               f"than batch.seq_lens_k {tuple(batch.seq_lens_k.shape)} and batch.block_table's rows "
                               f"{tuple(batch.block_table.shape)}")
    return meta
