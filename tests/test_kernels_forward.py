"""Triton store_kv and paged_attention vs the PyTorch reference (interpreter on CPU)."""
import pytest
import torch

from coconut_engine.kernels import reference, torch_backend
from coconut_engine.kernels.paged_attention import paged_attention
from coconut_engine.kernels.store_kv import store_kv
from paged_cases import make_case

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def lengths(page):
    """Prefix lengths covering 1, page-1, page, page+1 and a few hundred, plus an empty prefix."""
    return [1, page - 1, page, page + 1, 300, 0]


# (group, head_dim, page_size, dtype): every GQA ratio, head dim and page size appears at least once.
SHAPES = [
    (1, 32, 16, torch.float32),
    (2, 64, 8, torch.float32),
    (7, 80, 16, torch.float32),
    (2, 128, 64, torch.float32),
    (7, 32, 64, torch.float16),
    (1, 128, 8, torch.float16),
    (2, 80, 16, torch.float16),
]


def check(q, k_pool, v_pool, batch, dtype, **kwargs):
    scale = q.shape[-1] ** -0.5
    out, lse = paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True, **kwargs)
    ref_out, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    assert out.dtype == q.dtype
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("group,head_dim,page,dtype", SHAPES)
def test_extend_over_existing_prefix(group, head_dim, page, dtype):
    prefix = lengths(page)
    q_lens = [3, 1, 0, page + 2, 17, 40]  # one sequence gets no new tokens
    check(*make_case(group, head_dim, page, dtype, prefix, q_lens), dtype)


@pytest.mark.parametrize("group,head_dim,page,dtype", SHAPES)
def test_decode_step(group, head_dim, page, dtype):
    prefix = lengths(page)
    q_lens = [1, 1, 1, 0, 1, 1]
    check(*make_case(group, head_dim, page, dtype, prefix, q_lens), dtype)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("q_lens", [[1, 1, 0, 1, 1, 1], [2, 1, 0, 2, 2, 1]], ids=["one-token", "last-thought-eot"])
def test_split_kv_decode_merges_by_lse(splits, q_lens, monkeypatch):
    """Keys split across programs, merged by log-sum-exp: a one-token step, and a step in which some
    sequences feed two tokens (generation's last thought with its <eot>), whose first query does not
    see the second's key (a split may hold no key it sees)."""
    from coconut_engine.kernels import paged_attention as kernel_module

    merges, merge_kernel = [], kernel_module._merge_splits_kernel

    class RecordingMerge:
        def __getitem__(self, grid):
            merges.append(grid)
            return merge_kernel[grid]

    monkeypatch.setattr(kernel_module, "_merge_splits_kernel", RecordingMerge())
    prefix = [0, 15, 16, 17, 300, 5]
    check(*make_case(2, 64, 16, torch.float32, prefix, q_lens), torch.float32, num_splits=splits)
    assert merges, "the step's keys were not split"


@pytest.mark.parametrize("group", [2, 8, 16])
def test_split_two_token_steps_with_compiled_size_tiles(group, monkeypatch):
    """The decode tiles a GPU compiles (the kv group's heads only: one or two tokens per tile at group
    8 or 16) and small key blocks, under the interpreter: a two-token step over 2-3 splits, in which a
    split can hold only the second token's key (prefix 15 + 2 new = 17 keys, 16 keys per split)."""
    from coconut_engine.kernels import paged_attention as kernel_module

    def compiled_size(group_, head_dim, dtype, ieee, decode):
        rows = max(16, 1 << (group_ - 1).bit_length())
        return kernel_module.TileConfig(rows if decode else max(rows, 64), 16, 4, 1)

    monkeypatch.setattr(kernel_module, "forward_config", compiled_size)
    case = make_case(group, 32, 16, torch.float32, [15, 33, 0, 16], [2, 1, 0, 2])
    for splits in (2, 3):
        check(*case, torch.float32, num_splits=splits)


def test_prefill_from_empty():
    q_lens = [1, 15, 16, 17, 130]
    check(*make_case(7, 64, 16, torch.float32, [0] * 5, q_lens), torch.float32)


@pytest.mark.parametrize("splits", [None, 3])
def test_rows_of_no_sequence_are_never_written(splits):
    q, k_pool, v_pool, batch = make_case(2, 32, 8, torch.float32, [5, 9, 20], [1, 0, 1])
    out = torch.full((q.shape[0] + 4, *q.shape[1:]), float("nan"))
    paged_attention(q, k_pool, v_pool, batch, 0.2, out=out, num_splits=splits)
    assert not out[: q.shape[0]].isnan().any()
    assert out[q.shape[0]:].isnan().all()


@pytest.mark.parametrize("impl", [store_kv, torch_backend.store_kv], ids=["triton", "torch"])
@pytest.mark.parametrize("skip", [True, False], ids=["some-skipped", "all-stored"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("page", [8, 16])
def test_store_kv_matches_reference(impl, skip, dtype, page):
    num_pages, kv_heads, dim = 9, 3, 40
    k_pool = torch.randn(num_pages, page, kv_heads, dim).to(dtype)
    v_pool = torch.randn_like(k_pool)
    ref_k, ref_v = k_pool.clone(), v_pool.clone()
    tokens = 70
    slots = torch.randperm(num_pages * page)[:tokens]
    if skip:
        slots[::5] = -1  # skipped tokens
    # k/v as views of a fused projection, like the model's
    qkv = torch.randn(tokens, 2 * kv_heads * dim + 8)
    k = qkv[:, : kv_heads * dim].view(tokens, kv_heads, dim)
    v = qkv[:, kv_heads * dim : 2 * kv_heads * dim].view(tokens, kv_heads, dim)
    impl(k, v, k_pool, v_pool, slots)
    reference.store_kv(k, v, ref_k, ref_v, slots)
    assert torch.equal(k_pool, ref_k) and torch.equal(v_pool, ref_v)


@pytest.mark.parametrize("strided", [False, True], ids=["gathered", "strided"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "sdpa"])
@pytest.mark.parametrize("q_kind", ["extend", "decode", "equal-decode", "equal-prefill", "rectangular-decode",
                                    "rectangular-extend"])
@pytest.mark.parametrize("group,head_dim,page,dtype", SHAPES)
def test_torch_backend_matches_reference(strided, fused, q_kind, group, head_dim, page, dtype, monkeypatch):
    """The torch backend, with the fused CPU kernels and without (SDPA forward, explicit softmax for
    the lse), on permuted pages and on strided page runs (read as a view): output and log-sum-exp
    equal the loop reference; rows of no sequence stay unwritten. "rectangular": every sequence has
    the same new tokens over ragged prefixes (a training thought or suffix step), whose mask is built
    from the key lengths alone and whose output is the kernel's own (a view where q_len is 1)."""
    if not fused:
        monkeypatch.setattr(torch_backend, "uses_fused_kernels", lambda device: False)
    prefix = {"equal-decode": [page + 1] * 4, "equal-prefill": [0] * 4}.get(q_kind, lengths(page))
    q_lens = {"extend": [3, 1, 0, page + 2, 17, 40], "decode": [1, 1, 1, 0, 1, 1], "equal-decode": [1] * 4,
              "equal-prefill": [page + 3] * 4, "rectangular-decode": [1] * 6, "rectangular-extend": [3] * 6}[q_kind]
    q, k_pool, v_pool, batch = make_case(group, head_dim, page, dtype, prefix, q_lens, strided=strided)
    scale = head_dim ** -0.5
    ref_out, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    out = torch.full((q.shape[0] + 2, *q.shape[1:]), float("nan"), dtype=dtype)
    torch_backend.paged_attention(q, k_pool, v_pool, batch, scale, out=out)
    torch.testing.assert_close(out[: q.shape[0]].float(), ref_out.float(), atol=TOL[dtype], rtol=0)
    assert out[q.shape[0]:].isnan().all()
    out, lse = torch_backend.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), ref_out.float(), atol=TOL[dtype], rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("runs", ["permuted", "consecutive"])
@pytest.mark.parametrize("q_kind", ["decode", "ragged-decode", "two-token", "ragged-two-token"])
@pytest.mark.parametrize("group,head_dim,page,dtype", SHAPES + [(2, 64, 8, torch.bfloat16)])
def test_short_step_reads_key_runs_in_place(runs, q_kind, group, head_dim, page, dtype, monkeypatch):
    """A step of one token per sequence (a decode step), or of up to two (generation's last thought
    with its <eot>, next to one-token sequences), over pages that are not strided runs reads each
    query's keys run by run as views of the pool: nothing is gathered through the block table and
    nothing padded to the longest sequence; the first of two new tokens does not see the second (its
    keys may end a page, or a run, earlier); a query over several runs merges them by log-sum-exp.
    Output and log-sum-exp equal the loop reference."""
    def no_gather(*args):
        raise AssertionError("a short step with key runs gathered or padded the K/V")

    monkeypatch.setattr(torch_backend, "_token_major_kv", no_gather)
    ragged = q_kind.startswith("ragged")
    prefix = [page * 3 + 5, page - 1, 2 * page, 7 * page + 3] if ragged else lengths(page)
    q_lens = ([2, 2, 1, 2] if ragged else [2, 1, 2, 0, 1, 2]) if "two" in q_kind else [1, 1, 1, 0, 1, 1]
    q_lens = q_lens[: len(prefix)]
    q, k_pool, v_pool, batch = make_case(group, head_dim, page, dtype, prefix, q_lens, runs=runs)
    if runs == "consecutive":
        assert all(len(r) == 1 for r in batch.kv_runs)
    else:
        assert max(len(r) for r in batch.kv_runs) > 1
    scale = head_dim ** -0.5
    ref_out, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    out = torch.full((q.shape[0] + 2, *q.shape[1:]), float("nan"), dtype=dtype)
    out, lse = torch_backend.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True, out=out)
    torch.testing.assert_close(out[: q.shape[0]].float(), ref_out.float(), atol=TOL[dtype], rtol=0)
    assert out[q.shape[0]:].isnan().all()
    torch.testing.assert_close(lse, ref_lse, atol=TOL[dtype], rtol=0)
