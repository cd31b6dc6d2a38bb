"""Test setup: run the Triton kernels in the CPU interpreter when there is no GPU.

TRITON_INTERPRET must be set before the first @triton.jit function is defined, so this happens at
import time of the conftest, before any test module imports a kernel.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from tiny_models import FAMILIES, build_hf_model  # noqa: E402,F401


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
