"""What the Triton wrappers check and choose before a launch (CPU, kernels in the interpreter):
input validation, the device guard, block-table strides, the on-device split merge, the split count,
the fused one-token backward, and how the test run picks interpreted or compiled kernels."""
import dataclasses

import pytest
import torch

import triton_mode
from coconut_engine.errors import KernelInputError
from coconut_engine.kernels import _launch, paged_attention_bwd, reference
from coconut_engine.kernels import paged_attention as fwd_module
from coconut_engine.kernels.paged_attention import MAX_SPLITS, choose_num_splits, paged_attention
from coconut_engine.kernels.paged_attention_bwd import paged_attention_backward
from coconut_engine.kernels.store_kv import store_kv
from paged_cases import make_case
from test_kernels_backward import check_backward

PREFIX = [0, 7, 8, 9, 70]  # lengths 1, page-1, page, page+1 at page 8, and a few pages
DECODE = [1, 1, 0, 1, 1]
EXTEND = [2, 1, 0, 3, 9]


def check_forward(q, k_pool, v_pool, batch, want_batch=None, **kwargs):
    scale = q.shape[-1] ** -0.5
    out, lse = paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True, **kwargs)
    ref, ref_lse = reference.paged_attention(q, k_pool, v_pool, want_batch or batch, scale, return_lse=True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


# ---- 9: dtypes and devices are checked, launches run under the tensors' device

def test_mixed_dtypes_are_a_clear_error_naming_the_tensors():
    q, k_pool, v_pool, batch = make_case(2, 64, 16, torch.float32, [5, 20], [1, 1])
    with pytest.raises(KernelInputError, match=r"q bfloat16, k_pool float32, v_pool float32"):
        paged_attention(q.bfloat16(), k_pool, v_pool, batch, 0.1)
    out, lse = reference.paged_attention(q, k_pool, v_pool, batch, 0.1, return_lse=True)
    grads = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    with pytest.raises(KernelInputError, match=r"dout must be float32, got float16"):
        paged_attention_backward(out.half(), q, out, lse, k_pool, v_pool, *grads, batch, 0.1)
    with pytest.raises(KernelInputError, match=r"grad_k_pool must be float32, got float16"):
        paged_attention_backward(out, q, out, lse, k_pool, v_pool, grads[0].half(), grads[1], batch, 0.1)
    with pytest.raises(KernelInputError, match=r"q must be float16 or bfloat16 or float32, got int64"):
        paged_attention(q.long(), k_pool.long(), v_pool.long(), batch, 0.1)
    with pytest.raises(KernelInputError, match=r"batch.block_table must be int32, got int64"):
        paged_attention(q, k_pool, v_pool, dataclasses.replace(batch, block_table=batch.block_table.long()), 0.1)
    k = torch.zeros(2, 2, 64)
    with pytest.raises(KernelInputError, match=r"slot_mapping must be int64, got int32"):
        store_kv(k, k, k_pool, v_pool, torch.zeros(2, dtype=torch.int32))


def test_shapes_and_strides_the_kernels_assume_are_checked():
    """What a kernel would misread without an error (wrong slots, wrong lengths, past the end) is a
    KernelInputError naming the tensor."""
    q, k_pool, v_pool, batch = make_case(2, 64, 16, torch.float32, [5, 20], [1, 1])
    k = torch.zeros(2, 2, 32)  # head_dim 32 into a head_dim-64 pool: 64 values per slot written at 128 apart
    with pytest.raises(KernelInputError, match=r"same kv_heads and head_dim"):
        store_kv(k, k, k_pool, v_pool, torch.zeros(2, dtype=torch.int64))
    k = torch.zeros(3, 2, 64)
    with pytest.raises(KernelInputError, match=r"slot_mapping must be 1-D with one consecutive entry per token"):
        store_kv(k, k, k_pool, v_pool, torch.zeros(2, dtype=torch.int64))
    with pytest.raises(KernelInputError, match=r"slot_mapping must be 1-D"):
        store_kv(k, k, k_pool, v_pool, torch.zeros(6, dtype=torch.int64)[::2])
    strided = dataclasses.replace(batch, seq_lens_k=torch.stack([batch.seq_lens_k, batch.seq_lens_k], 1)[:, 0])
    assert strided.seq_lens_k.stride(0) == 2
    with pytest.raises(KernelInputError, match=r"batch.seq_lens_k must be 1-D with consecutive entries"):
        paged_attention(q, k_pool, v_pool, strided, 0.1)
    with pytest.raises(KernelInputError, match=r"one entry more than batch.seq_lens_k"):
        paged_attention(q, k_pool, v_pool, dataclasses.replace(batch, seq_lens_k=batch.seq_lens_k[:1]), 0.1)
    with pytest.raises(KernelInputError, match=r"out must have q's shape"):
        paged_attention(q, k_pool, v_pool, batch, 0.1, out=torch.empty(q.shape[0], q.shape[1], 32))
    out, lse = reference.paged_attention(q, k_pool, v_pool, batch, 0.1, return_lse=True)
    grads = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    with pytest.raises(KernelInputError, match=r"dout and out must have q's shape"):
        paged_attention_backward(out[:1], q, out, lse, k_pool, v_pool, *grads, batch, 0.1)
    with pytest.raises(KernelInputError, match=r"lse \(2, 4\)"):
        paged_attention_backward(out, q, out, lse[:, :2], k_pool, v_pool, *grads, batch, 0.1)


def test_tensors_on_different_devices_are_a_clear_error_naming_them():
    q, k_pool, v_pool, batch = make_case(2, 64, 16, torch.float32, [5, 20], [1, 1])
    with pytest.raises(KernelInputError, match=r"q on meta, k_pool on cpu"):
        paged_attention(q.to("meta"), k_pool, v_pool, batch, 0.1)
    k = torch.zeros(2, 2, 64)
    with pytest.raises(KernelInputError, match=r"k_pool on meta"):
        store_kv(k, k, k_pool.to("meta"), v_pool, torch.zeros(2, dtype=torch.int64))


def test_device_guard_makes_the_tensors_cuda_device_current():
    guard = _launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(_launch.device_guard(torch.device("cpu")), torch.cuda.device)


@pytest.mark.parametrize("decode", [False, True])
def test_every_launch_runs_under_the_device_guard(monkeypatch, decode):
    """Forward, merge and backward kernels launch inside `device_guard(q.device)`."""
    active = []

    class Recording:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            active.append(self.device)

        def __exit__(self, *exc):
            active.pop()

    launched = []
    for module, names in ((fwd_module, ["_paged_attention_fwd_kernel", "_merge_splits_kernel"]),
                          (paged_attention_bwd, ["_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_one_token_kernel"])):
        monkeypatch.setattr(module, "device_guard", Recording)
        for name in names:
            kernel = getattr(module, name)

            class Spy:
                def __init__(self, kernel, name):
                    self.kernel, self.name = kernel, name

                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        launched.append((self.name, list(active)))
                        return self.kernel[grid](*args, **kwargs)
                    return launch

            monkeypatch.setattr(module, name, Spy(kernel, name))
    q, k_pool, v_pool, batch = make_case(2, 32, 8, torch.float32, PREFIX, DECODE if decode else EXTEND)
    out, lse = paged_attention(q, k_pool, v_pool, batch, 0.1, return_lse=True, num_splits=3)
    paged_attention_backward(torch.ones_like(out), q, out, lse, k_pool, v_pool, torch.zeros_like(k_pool),
                             torch.zeros_like(v_pool), batch, 0.1, num_splits=2)
    assert launched and all(devices == [torch.device("cpu")] for _, devices in launched), launched
    names = {name for name, _ in launched}
    assert names == ({"_paged_attention_fwd_kernel", "_merge_splits_kernel", "_bwd_one_token_kernel"} if decode
                     else {"_paged_attention_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"})


# ---- 10: the block table's stride along pages is honoured

def with_strided_table(batch):
    """The same batch with a block table whose pages are 3 entries apart (a column slice of a wider table)."""
    wide = torch.full((batch.block_table.shape[0], 3 * batch.block_table.shape[1]), -7, dtype=torch.int32)
    wide[:, ::3] = batch.block_table
    table = wide[:, ::3]
    assert table.stride(1) == 3
    return dataclasses.replace(batch, block_table=table, _memo={})


@pytest.mark.parametrize("q_lens", [EXTEND, DECODE], ids=["extend", "decode"])
def test_block_table_with_a_page_stride(q_lens):
    q, k_pool, v_pool, batch = make_case(2, 32, 8, torch.float32, PREFIX, q_lens)
    strided = with_strided_table(batch)
    check_forward(q, k_pool, v_pool, strided, want_batch=batch, num_splits=2)
    check_backward(paged_attention_backward, q, k_pool, v_pool, strided)  # vs autograd over the plain table


# ---- 4: split-KV merge on the device, nothing built from host lists per layer

class NoHostLists(tuple):
    """A batch's host-side length lists that fail when a kernel wrapper reads them."""

    def _fail(self, *args):
        raise AssertionError("a kernel wrapper read the batch's host-side per-sequence lists")

    __iter__ = __len__ = __getitem__ = _fail


def without_host_lists(batch):
    return dataclasses.replace(batch, q_lens=NoHostLists(), k_lens=NoHostLists(), _memo={})


@pytest.mark.parametrize("splits", [3, 19])  # 19: more than the merge kernel's 16 splits per chunk
def test_split_merge_reads_only_device_metadata(splits):
    q, k_pool, v_pool, batch = make_case(2, 32, 8, torch.float32, PREFIX, DECODE)
    check_forward(q, k_pool, v_pool, without_host_lists(batch), want_batch=batch, num_splits=splits)


def test_split_merge_of_a_sequence_without_keys_in_a_split_and_none_at_all():
    """Splits past a sequence's keys are empty (-inf lse, weight 0); a token with no key gets 0 and -inf."""
    q, k_pool, v_pool, batch = make_case(2, 32, 16, torch.float32, [0, 2, 200], [1, 1, 1])
    check_forward(q, k_pool, v_pool, batch, num_splits=4)


def test_one_token_backward_reads_only_device_metadata():
    q, k_pool, v_pool, batch = make_case(2, 32, 8, torch.float32, PREFIX, DECODE)
    check_backward(lambda dout, q, out, lse, k_pool, v_pool, gk, gv, _, scale: paged_attention_backward(
        dout, q, out, lse, k_pool, v_pool, gk, gv, without_host_lists(batch), scale, num_splits=3),
        q, k_pool, v_pool, batch)


# ---- 6: split count chosen for occupancy

@pytest.mark.parametrize("sms", [132, 108])
def test_split_count_fills_the_gpu_for_a_small_decode_batch(sms):
    """Qwen2.5-0.5B (2 kv heads) at batch 1 over 32k keys: ~2-4 programs per SM, or the cap of 128 splits."""
    splits = choose_num_splits(1, 2, 32768, sms)
    assert splits == MAX_SPLITS or 2 * splits >= 2 * sms
    assert 2 * splits <= 4 * sms
    assert 32768 / splits >= 256


def test_split_count_keeps_at_least_256_keys_per_split_and_at_most_128_splits():
    assert choose_num_splits(1, 2, 4096, 132) == 4096 // 256
    assert choose_num_splits(1, 1, 1 << 20, 132) == 128
    assert choose_num_splits(1, 8, 100, 132) == 1


def test_a_step_with_a_program_per_sm_is_not_split():
    assert choose_num_splits(66, 2, 32768, 132) == 1
    assert choose_num_splits(4, 8, 32768, 132) > 1


# ---- 8: a one-token step's backward is one fused kernel (K/V read once), dq split across keys

class Forbidden:
    """Stands in for a kernel that must not launch: `kernel[grid](...)` fails."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise AssertionError("a one-token step ran the separate dq / dK-dV kernels")
        return launch


@pytest.mark.parametrize("splits", [1, 4])
@pytest.mark.parametrize("group,head_dim,page", [(1, 32, 16), (7, 80, 8)])  # all ratios: test_kernels_backward
def test_one_token_backward_is_one_fused_kernel(monkeypatch, splits, group, head_dim, page):
    for name in ("_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        monkeypatch.setattr(paged_attention_bwd, name, Forbidden())
    case = make_case(group, head_dim, page, torch.float32, PREFIX, DECODE)
    check_backward(lambda *a: paged_attention_backward(*a, num_splits=splits), *case)


# ---- 3, 7, 8: the tiles the GPU launches (not the interpreter's big ones), run in the interpreter

@pytest.mark.parametrize("ieee", [False, True], ids=["tf32-tiles", "ieee-tiles"])
@pytest.mark.parametrize("q_lens", [EXTEND, DECODE], ids=["extend", "decode"])
def test_gpu_tile_configs_compute_the_reference(monkeypatch, q_lens, ieee):
    """Forward (split and not) and backward with the compiled path's tile table (GQA 7 in 16-row tiles,
    16- and 32-key tiles at head_dim 80, page 8): the masks of those tiles are right. fp32, so the
    interpreter's dots are exact whatever `ieee` says; only the tile choice follows it."""
    for module in (fwd_module, paged_attention_bwd):
        monkeypatch.setattr(module, "interpreting", lambda: False)  # UPCAST stays on: fp32 inputs
    q, k_pool, v_pool, batch = make_case(7, 80, 8, torch.float32, PREFIX, q_lens)
    decode = max(q_lens) <= 1
    configs = (fwd_module.forward_config(7, 80, torch.float32, ieee, decode),
               paged_attention_bwd.backward_config(7, 80, torch.float32, ieee, decode))
    assert all(c.num_stages == 2 for c in configs), configs  # the compiled table (the interpreter's has 1 stage)
    for splits in ([None, 3] if decode else [None]):
        check_forward(q, k_pool, v_pool, batch, num_splits=splits, ieee=ieee)
        check_backward(lambda *a: paged_attention_backward(*a, num_splits=splits, ieee=ieee), q, k_pool, v_pool, batch)


# ---- 2: interpreter or compiled kernels, with the CUDA check mocked

def test_a_cuda_host_runs_the_suite_in_the_interpreter_by_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert triton_mode.choose(torch.cuda.is_available(), {}) == triton_mode.INTERPRET


def test_gpu_tests_ask_for_compiled_kernels(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert triton_mode.choose(torch.cuda.is_available(), {"COCONUT_GPU_TESTS": "1"}) == triton_mode.COMPILED
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(triton_mode.TritonModeError, match="needs a CUDA GPU"):
        triton_mode.choose(torch.cuda.is_available(), {"COCONUT_GPU_TESTS": "1"})


def test_an_explicit_triton_interpret_wins():
    assert triton_mode.choose(True, {"TRITON_INTERPRET": "1", "COCONUT_GPU_TESTS": "1"}) == triton_mode.INTERPRET
    assert triton_mode.choose(True, {"TRITON_INTERPRET": "0"}) == triton_mode.COMPILED
    with pytest.raises(triton_mode.TritonModeError, match="TRITON_INTERPRET=0 asks for compiled kernels"):
        triton_mode.choose(False, {"TRITON_INTERPRET": "0"})  # every kernel test would fail without a driver
    assert triton_mode.choose(False, {}) == triton_mode.INTERPRET


@pytest.mark.parametrize("value,on", [("true", True), ("ON", True), ("yes", True), ("1", True), ("0", False),
                                      ("false", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """Triton turns its interpreter on for TRITON_INTERPRET=1, true, on or yes: the test run's mode, the
    wrappers' tile choice and the backend choice must read the variable the same way (an explicit
    TRITON_INTERPRET=true used to be taken for compiled kernels, and the conftest then set it to 0)."""
    from triton import knobs

    from coconut_engine.attention import triton_available

    assert triton_mode.choose(True, {"TRITON_INTERPRET": value}) == (triton_mode.INTERPRET if on else triton_mode.COMPILED)
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert knobs.runtime.interpret is on  # Triton's own reading
    assert _launch.interpreting() is on
    assert triton_available(torch.device("cpu")) is on


def test_auto_backend_uses_torch_for_cuda_tensors_under_the_interpreter(monkeypatch):
    from coconut_engine.attention import resolve_backend

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("COCONUT_ATTENTION_BACKEND", raising=False)
    assert resolve_backend("auto", torch.device("cuda", 0)) == "torch"
    assert resolve_backend("auto", torch.device("cpu")) == "triton"
    assert resolve_backend("triton", torch.device("cuda", 0)) == "triton"
