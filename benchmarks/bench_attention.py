"""CPU microbenchmark (pytest-benchmark): paged attention for a decode batch, the PyTorch reference
loop and the vectorised torch backend, against SDPA on contiguous K/V.

    .venv/bin/python -m pytest benchmarks/bench_attention.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from coconut_engine.bench import contiguous_kv, paged_problem
from coconut_engine.kernels.reference import paged_attention
from coconut_engine.kernels.torch_backend import paged_attention as torch_backend_attention

SHAPE = dict(batch=16, context=512, q_len=1, heads=9, kv_heads=3, head_dim=64, page=16)  # SmolLM2-135M heads


@pytest.fixture(scope="module")
def problem():
    return paged_problem(**SHAPE, dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture(scope="module")
def ragged_problem():
    """The same batch with context lengths 385..512 (the masked path)."""
    q, k_pool, v_pool, meta = paged_problem(**SHAPE, dtype=torch.float32, device=torch.device("cpu"))
    k_lens = tuple(512 - 8 * i for i in range(SHAPE["batch"]))
    meta.k_lens = k_lens
    meta.seq_lens_k = torch.tensor(k_lens, dtype=torch.int32)
    return q, k_pool, v_pool, meta


def test_decode_paged_reference_loop(benchmark, problem):
    q, k_pool, v_pool, meta = problem
    benchmark(paged_attention, q, k_pool, v_pool, meta, 0.125)


def test_decode_paged_torch_backend(benchmark, problem):
    q, k_pool, v_pool, meta = problem
    benchmark(torch_backend_attention, q, k_pool, v_pool, meta, 0.125)


def test_decode_paged_torch_backend_ragged(benchmark, ragged_problem):
    q, k_pool, v_pool, meta = ragged_problem
    benchmark(torch_backend_attention, q, k_pool, v_pool, meta, 0.125)


def test_decode_sdpa_contiguous(benchmark, problem):
    q, k_pool, v_pool, meta = problem
    k, v = contiguous_kv(k_pool, v_pool, meta)
    qd = q.view(SHAPE["batch"], 1, SHAPE["heads"], SHAPE["head_dim"]).transpose(1, 2)
    benchmark(F.scaled_dot_product_attention, qd, k, v, scale=0.125, enable_gqa=True)
