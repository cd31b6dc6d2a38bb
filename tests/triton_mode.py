"""How the test run executes Triton kernels: in the CPU interpreter, or compiled for a CUDA GPU.

One process can only do one of the two (`@triton.jit` reads TRITON_INTERPRET when a kernel is defined).
The default is the interpreter even on a CUDA host, so the CPU tests (which hand CPU tensors to the
kernels) pass everywhere; COCONUT_GPU_TESTS=1 asks for compiled kernels, which the GPU tests
(tests/test_gpu_kernels.py) need and which benchmarks/gpu_check.sh runs in a second pytest process.
An explicit TRITON_INTERPRET wins (read as Triton reads it: 1, true, on, yes); asking for compiled
kernels (TRITON_INTERPRET=0 or COCONUT_GPU_TESTS=1) where torch sees no CUDA GPU is a TritonModeError.
"""
from __future__ import annotations

from typing import Mapping

INTERPRET = "interpret"
COMPILED = "compiled"


class TritonModeError(Exception):
    """The environment asks for a mode this machine cannot run."""


def choose(cuda_available: bool, environ: Mapping[str, str]) -> str:
    """INTERPRET or COMPILED for this run, from the CUDA check and the environment."""
    if "TRITON_INTERPRET" in environ:
        # as Triton reads it (kernels/_launch.py, not imported here: it must not load Triton's kernels yet)
        if environ["TRITON_INTERPRET"].lower() in ("1", "true", "on", "yes"):
            return INTERPRET
        if not cuda_available:
            raise TritonModeError(f"TRITON_INTERPRET={environ['TRITON_INTERPRET']} asks for compiled kernels, and "
                                  "torch sees no CUDA GPU: unset it to run the kernels in the interpreter")
        return COMPILED
    if environ.get("COCONUT_GPU_TESTS", "0") == "1":
        if not cuda_available:
            raise TritonModeError("COCONUT_GPU_TESTS=1 needs a CUDA GPU, and torch sees none")
        return COMPILED
    return INTERPRET
