"""GPU checks of the Triton kernels (bf16, fp16, and fp32 with exact dots); skipped without CUDA.

Run by benchmarks/gpu_check.sh on a GPU machine.
"""
import os

import pytest
import torch

from coconut_engine.kernels import reference
from paged_cases import make_case

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU and compiled kernels: COCONUT_GPU_TESTS=1 (benchmarks/gpu_check.sh sets it)")

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def to_cuda(case):
    q, k_pool, v_pool, batch = case
    for name in ("cu_seqlens_q", "seq_lens_k", "block_table", "slot_mapping", "positions"):
        setattr(batch, name, getattr(batch, name).cuda())
    return q.cuda(), k_pool.cuda(), v_pool.cuda(), batch


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group,head_dim,page", [(1, 64, 16), (2, 128, 16), (7, 64, 8), (4, 80, 64), (8, 128, 128)])
@pytest.mark.parametrize("kind", ["extend", "decode", "last-thought"])
def test_forward_on_gpu(dtype, group, head_dim, page, kind):
    """Compiled forward vs the reference; "last-thought": a decode step in which some sequences feed
    two tokens (a last thought with its <eot>), split across programs by the default split count."""
    from coconut_engine.kernels.paged_attention import paged_attention

    prefix = [1, page - 1, page, page + 1, 700, 0, 3000]
    q_lens = {"extend": [3, 1, 0, page + 2, 17, 64, 1], "decode": [1, 1, 0, 1, 1, 1, 1],
              "last-thought": [2, 1, 0, 2, 1, 2, 2]}[kind]
    q, k_pool, v_pool, batch = to_cuda(make_case(group, head_dim, page, dtype, prefix, q_lens))
    scale = head_dim ** -0.5
    out, lse = paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True, ieee=dtype == torch.float32)
    ref, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=1e-2 if dtype == torch.bfloat16 else 0)
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=1e-2 if dtype == torch.bfloat16 else 0)


def check_backward_on_gpu(dtype, group: int, head_dim: int, prefix: list[int], q_lens: list[int]) -> None:
    """The Triton backward (dQ, dK/dV into fp32 gradient pages) vs autograd through the reference."""
    from coconut_engine.kernels.paged_attention_bwd import paged_attention_backward

    q, k_pool, v_pool, batch = to_cuda(make_case(group, head_dim, 16, dtype, prefix, q_lens))
    scale = head_dim ** -0.5
    out, lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    dout = torch.randn_like(out)
    grad_k = torch.zeros(k_pool.shape, dtype=torch.float32, device="cuda")
    grad_v = torch.zeros_like(grad_k)
    dq = paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k, grad_v, batch, scale,
                                  ieee=dtype == torch.float32)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k_pool, v_pool))
    (reference.paged_attention(qr, kr, vr, batch, scale) * dout.float()).sum().backward()
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in ((dq.float(), qr.grad), (grad_k, kr.grad), (grad_v, vr.grad)):
        assert ((got - want).norm() / want.norm()).item() < limit


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_on_gpu(dtype):
    check_backward_on_gpu(dtype, 4, 128, [5, 300, 0, 17], [7, 1, 40, 16])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["extend", "decode"])
def test_attention_dropout_on_gpu(dtype, kind):
    """The compiled kernels draw the reference's dropout mask (their uint32 hash is torch's int64 one):
    forward and backward, a decode step split across programs as the default split count does."""
    from coconut_engine.kernels.dropout import AttentionDropout
    from coconut_engine.kernels.paged_attention import paged_attention
    from coconut_engine.kernels.paged_attention_bwd import paged_attention_backward

    prefix = [1, 15, 16, 17, 3000, 0]
    q_lens = [3, 1, 0, 18, 17, 64] if kind == "extend" else [1, 1, 0, 1, 1, 1]
    q, k_pool, v_pool, batch = to_cuda(make_case(4, 64, 16, dtype, prefix, q_lens))
    dropout = AttentionDropout(0.3, 0xC0FFEE42, torch.tensor([4, 0, 5, 2, 1, 3], dtype=torch.int32, device=q.device))
    scale, ieee = 64 ** -0.5, dtype == torch.float32
    out, lse = paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True, ieee=ieee, dropout=dropout)
    qr, kr, vr = (t.detach().float().requires_grad_() for t in (q, k_pool, v_pool))
    ref = reference.paged_attention(qr, kr, vr, batch, scale, dropout=dropout)
    torch.testing.assert_close(out.float(), ref.detach(), atol=TOL[dtype], rtol=1e-2 if dtype == torch.bfloat16 else 0)
    dout = torch.randn_like(out)
    (ref * dout.float()).sum().backward()
    grad_k = torch.zeros(k_pool.shape, dtype=torch.float32, device=q.device)
    grad_v = torch.zeros_like(grad_k)
    dq = paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k, grad_v, batch, scale, ieee=ieee,
                                  dropout=dropout)
    limit = 1e-4 if dtype == torch.float32 else 2e-2
    for got, want in ((dq.float(), qr.grad), (grad_k, kr.grad), (grad_v, vr.grad)):
        assert ((got - want).norm() / want.norm()).item() < limit


def test_attention_dropout_hash_at_extremes_on_gpu():
    """The compiled uint32 hash draws `keep_mask`'s bits for seeds, rows, heads and positions up to 2**31."""
    from test_attention_dropout import check_kernel_hash_at_extremes

    check_kernel_hash_at_extremes("cuda")


def test_pool_beyond_32_bit_offsets():
    """Pages whose element offsets exceed 2**31: store and attend at the top of a ~4.3 GB pool."""
    from coconut_engine.cache import AttentionBatch
    from coconut_engine.kernels.paged_attention import paged_attention
    from coconut_engine.kernels.store_kv import store_kv

    page, kv_heads, dim = 16, 8, 128
    num_pages = (2**31) // (page * kv_heads * dim) + 64
    k_pool = torch.zeros(num_pages, page, kv_heads, dim, dtype=torch.bfloat16, device="cuda")
    v_pool = torch.zeros_like(k_pool)
    pages = torch.arange(num_pages - 40, num_pages, device="cuda", dtype=torch.int32)
    length = 40 * page - 3
    pos = torch.arange(length, device="cuda")
    slots = pages[pos // page].long() * page + pos % page
    k = torch.randn(length, kv_heads, dim, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    store_kv(k, v, k_pool, v_pool, slots)
    assert torch.equal(k_pool.view(-1, kv_heads, dim)[slots], k)
    q = torch.randn(1, kv_heads * 4, dim, device="cuda", dtype=torch.bfloat16)
    batch = AttentionBatch(torch.tensor([0, 1], dtype=torch.int32, device="cuda"),
                           torch.tensor([length], dtype=torch.int32, device="cuda"), pages[None], slots[-1:],
                           pos[-1:], 1, length, (1,), (length,))
    out = paged_attention(q, k_pool, v_pool, batch, dim ** -0.5)
    ref, _ = reference.attend_one(q, k, v, 4, dim ** -0.5)
    torch.testing.assert_close(out.float(), ref, atol=1.5e-2, rtol=1e-2)


def test_model_paged_steps_match_a_full_forward_in_bf16(tmp_path):
    """A bf16 model on the GPU over bf16 pools on the GPU: the Triton backend matches the torch backend."""
    from coconut_engine.loader import load_model
    from test_model_cache import run_on_cache
    from tiny_models import build_hf_model

    build_hf_model("llama", tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16, device="cuda", attention_backend="triton")
    with torch.no_grad():
        rows_triton, _ = run_on_cache(model, page_size=16, pool_dtype=torch.bfloat16)
        model.attention_backend = "torch"
        rows_torch, _ = run_on_cache(model, page_size=16, pool_dtype=torch.bfloat16)
    for s in rows_triton:
        got, want = torch.stack(rows_triton[s]), torch.stack(rows_torch[s])
        assert got.dtype == torch.bfloat16 and got.device.type == "cuda"
        torch.testing.assert_close(got.float(), want.float(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_token_backward_on_gpu(dtype):
    """The fused one-token backward, its keys split across programs by the occupancy heuristic."""
    check_backward_on_gpu(dtype, 7, 64, [3000, 17, 0, 900], [1, 1, 1, 0])


def test_decode_over_32k_keys_with_the_default_split_count():
    """Batch 1, 2 kv heads (Qwen2.5-0.5B): the heuristic splits the keys many ways; the merge is exact."""
    from coconut_engine.kernels.paged_attention import choose_num_splits, paged_attention

    q, k_pool, v_pool, batch = to_cuda(make_case(7, 64, 16, torch.float32, [32767], [1]))
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    assert choose_num_splits(1, 2, 32768, sms) >= 64
    out, lse = paged_attention(q, k_pool, v_pool, batch, 0.125, return_lse=True, ieee=True)
    ref, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, 0.125, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


def test_fp32_defaults_to_tf32_dots():
    """Without `ieee`, fp32 runs TF32 dots: close to the exact result at TF32's precision, not bit-equal."""
    from coconut_engine.kernels.paged_attention import paged_attention

    q, k_pool, v_pool, batch = to_cuda(make_case(4, 128, 16, torch.float32, [300, 17], [40, 1]))
    out = paged_attention(q, k_pool, v_pool, batch, 128 ** -0.5)
    ref = reference.paged_attention(q, k_pool, v_pool, batch, 128 ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=0)


def test_tensors_on_cpu_and_gpu_are_a_clear_error():
    from coconut_engine.errors import KernelInputError
    from coconut_engine.kernels.paged_attention import paged_attention

    q, k_pool, v_pool, batch = to_cuda(make_case(2, 64, 16, torch.bfloat16, [30], [1]))
    with pytest.raises(KernelInputError, match="k_pool on cpu"):
        paged_attention(q, k_pool.cpu(), v_pool, batch, 0.1)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_run_on_their_tensors_gpu():
    """Tensors on cuda:1 while cuda:0 is current: the launch runs on cuda:1 (the device guard)."""
    from coconut_engine.kernels.paged_attention import paged_attention

    q, k_pool, v_pool, batch = make_case(2, 64, 16, torch.bfloat16, [300, 17], [1, 1])
    dev = torch.device("cuda", 1)
    for name in ("cu_seqlens_q", "seq_lens_k", "block_table", "slot_mapping", "positions"):
        setattr(batch, name, getattr(batch, name).to(dev))
    q, k_pool, v_pool = q.to(dev), k_pool.to(dev), v_pool.to(dev)
    with torch.cuda.device(0):
        out = paged_attention(q, k_pool, v_pool, batch, 0.125)
    ref = reference.paged_attention(q, k_pool, v_pool, batch, 0.125)
    torch.testing.assert_close(out.float(), ref.float(), atol=1.5e-2, rtol=1e-2)
