"""Hand freed host memory back to the operating system when a CPU run's heap has grown.

glibc's malloc keeps freed heap memory for reuse. A CPU training step frees gigabytes of activations
whose sizes change every step (ragged batches); the next step's tensors do not fit the holes exactly, so
the heap grows and the process's resident memory climbs although its live tensors do not (SmolLM2-135M,
batch 16 of short ProsQA questions, bf16 autocast: 3.7 -> 7.5 GB in 12 steps with 2.3 GB of live
tensors). `malloc_trim(0)` returns the free pages inside the heap to the system. (The same recipe's
kills for memory at 15-24 GB were mostly something else: replaced training pools leaked through an
autograd cycle, fixed in `attention.py`; with both, its 12 epochs peak at 6.5 GB.) A call costs milliseconds and the next step faults the pages
back in (a small model's step ran 10-15 % slower trimmed every step), so `HostMemoryGuard` trims only
after resident memory has grown by a margin since the last trim.
"""
from __future__ import annotations

import ctypes
import os


def _find_malloc_trim():
    """glibc's `malloc_trim` from the running process's C library, or None where there is none
    (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _find_malloc_trim()
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def can_release_host_memory() -> bool:
    """Whether `release_freed_host_memory` can do anything here (glibc)."""
    return _MALLOC_TRIM is not None


def release_freed_host_memory() -> bool:
    """Return the free pages of the C heap to the operating system (glibc `malloc_trim(0)`). True when
    memory was released; False when there was none to release or the C library cannot."""
    return bool(_MALLOC_TRIM(0)) if _MALLOC_TRIM is not None else False


def resident_bytes() -> int | None:
    """The process's resident memory (Linux `/proc/self/statm`), or None where it cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class HostMemoryGuard:
    """Trims the C heap when resident memory has grown by `margin_bytes` since the last trim (or since
    the guard was made): a run whose memory stays level pays one read of /proc per check."""

    def __init__(self, margin_bytes: int = 256 * 2**20):
        self.margin_bytes = margin_bytes
        self.enabled = can_release_host_memory() and resident_bytes() is not None
        self.level = resident_bytes() if self.enabled else None
        self.trims = 0

    def check(self) -> bool:
        """Trim if memory grew past the margin; True when a trim ran."""
        if not self.enabled:
            return False
        now = resident_bytes()
        if now is None or now < self.level + self.margin_bytes:
            return False
        release_freed_host_memory()
        self.trims += 1
        self.level = resident_bytes() or now
        return True
