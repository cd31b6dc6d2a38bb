"""Test setup: choose how Triton kernels run (tests/triton_mode.py) before any kernel is defined.

TRITON_INTERPRET must be set before the first @triton.jit function is defined, so this happens at
import time of the conftest, before any test module imports a kernel. Without COCONUT_GPU_TESTS=1 the
kernels run in the CPU interpreter, on a CUDA host too.
"""
import os

import torch

import triton_mode

if triton_mode.choose(torch.cuda.is_available(), os.environ) == triton_mode.INTERPRET:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ["TRITON_INTERPRET"] = "0"

import pytest  # noqa: E402

from tiny_models import FAMILIES, build_hf_model  # noqa: E402,F401


def pytest_addoption(parser):
    parser.addoption("--slow", action="store_true", help="also run the tests marked slow (full AOT matrix)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long checks left out of the default run (run them with --slow)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--slow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
