"""Attention backward (Triton under the interpreter, and the torch backend) vs autograd through the reference."""
import pytest
import torch

from coconut_engine import ModelConfig, PagedKVCache
from coconut_engine.attention import attention, varlen_attention
from coconut_engine.cache import AttentionBatch
from coconut_engine.kernels import reference, torch_backend
from coconut_engine.kernels.paged_attention_bwd import paged_attention_backward as triton_backward
from paged_cases import make_case
from test_kernels_forward import SHAPES, lengths


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def oracle_grads(q, k_pool, v_pool, batch, dout):
    """Autograd through the loop reference (which gathers copies of the pages)."""
    q, k_pool, v_pool = (t.detach().float().requires_grad_() for t in (q, k_pool, v_pool))
    out = reference.paged_attention(q, k_pool, v_pool, batch, q.shape[-1] ** -0.5)
    (out * dout).sum().backward()
    return q.grad, k_pool.grad, v_pool.grad


def torch_recompute_without_lse(dout, q, out, lse, *rest):
    """The torch backend's backward where it gets no log-sum-exp (recomputes the softmax)."""
    return torch_backend._recompute_backward(dout, q, out, None, *rest)


def torch_recompute_with_lse(*args):
    """The torch backend's non-fused backward from a log-sum-exp (a GPU without Triton)."""
    return torch_backend._recompute_backward(*args)


def torch_without_lse(dout, q, out, lse, *rest):
    """The torch backend's entry point given no log-sum-exp (a one-token step recomputes it)."""
    return torch_backend.paged_attention_backward(dout, q, out, None, *rest)


BACKWARDS = {"triton": triton_backward, "torch-fused": torch_backend.paged_attention_backward,
             "torch-recompute": torch_recompute_without_lse, "torch-recompute-lse": torch_recompute_with_lse,
             "torch-no-lse": torch_without_lse}


@pytest.mark.parametrize("backward", BACKWARDS.values(), ids=BACKWARDS.keys())
@pytest.mark.parametrize("q_kind", ["extend", "decode", "equal-decode", "equal-prefill"])
@pytest.mark.parametrize("group,head_dim,page,dtype", [s for s in SHAPES if s[3] == torch.float32])
def test_backward_matches_autograd(backward, q_kind, group, head_dim, page, dtype):
    prefix = lengths(page)
    if q_kind.startswith("equal"):  # every sequence equally long: the fused path runs without a mask
        prefix = [page + 1] * 4 if q_kind == "equal-decode" else [0] * 4
    q_lens = {"extend": [3, 1, 0, page + 2, 17, 40], "decode": [1, 1, 1, 0, 1, 1], "equal-decode": [1] * 4,
              "equal-prefill": [page + 3] * 4}[q_kind]
    check_backward(backward, *make_case(group, head_dim, page, dtype, prefix, q_lens))


def check_backward(backward, q, k_pool, v_pool, batch):
    """`backward`'s dq and the dK/dV it adds into zeroed gradient pools vs autograd through the
    reference; returns the gradient pools."""
    scale = q.shape[-1] ** -0.5
    out, lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    dout = torch.randn_like(out)
    grad_k, grad_v = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    dq = backward(dout, q, out, lse, k_pool, v_pool, grad_k, grad_v, batch, scale)
    want_q, want_k, want_v = oracle_grads(q, k_pool, v_pool, batch, dout)
    assert rel(dq, want_q) < 1e-4
    assert rel(grad_k, want_k) < 1e-4
    assert rel(grad_v, want_v) < 1e-4
    return grad_k, grad_v


@pytest.mark.parametrize("backward", [BACKWARDS["torch-fused"], BACKWARDS["torch-recompute"], BACKWARDS["torch-no-lse"]],
                         ids=["torch-fused", "torch-recompute", "torch-no-lse"])
@pytest.mark.parametrize("q_kind", ["extend", "decode", "rectangular-decode", "rectangular-extend"])
@pytest.mark.parametrize("group,head_dim,page,dtype", [s for s in SHAPES if s[3] == torch.float32])
def test_torch_backward_on_strided_pages(backward, q_kind, group, head_dim, page, dtype):
    """Pages laid out as strided runs (a training cache): K/V read as a view and the padded dK/dV
    added back whole; the junk between and after the runs gets exactly nothing. "rectangular": the
    same new tokens for every sequence over ragged prefixes (a training thought or suffix step)."""
    q_lens = {"extend": [3, 1, 0, page + 2, 17, 40], "decode": [1, 1, 1, 0, 1, 1], "rectangular-decode": [1] * 6,
              "rectangular-extend": [3] * 6}[q_kind]
    q, k_pool, v_pool, batch = make_case(group, head_dim, page, dtype, lengths(page), q_lens, strided=True)
    grad_k, grad_v = check_backward(backward, q, k_pool, v_pool, batch)
    keys = torch.zeros(k_pool.shape[:2], dtype=torch.bool)  # the pool rows that hold a real key
    for b, k_len in enumerate(batch.k_lens):
        pos = torch.arange(k_len)
        keys[batch.block_table[b, pos // page].long(), pos % page] = True
    assert not grad_k[~keys].any() and not grad_v[~keys].any()


CONFIG = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 64, "intermediate_size": 8,
                                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                "vocab_size": 8})


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_steps_reading_earlier_stores_give_full_recompute_gradients(backend):
    """Prefix, thoughts one by one (each thought's q/k/v derived from the previous output), suffix:
    gradients through the store/attention Functions equal autograd over one full causal forward."""
    torch.manual_seed(0)
    heads, kv_heads, dim = CONFIG.num_heads, CONFIG.num_kv_heads, CONFIG.head_dim
    prompt_lens, thoughts, suffix_lens = [5, 9, 1], [2, 0, 3], [4, 2, 6]
    proj = torch.randn(heads * dim, (heads + 2 * kv_heads) * dim) * 0.05
    prompt_x = [torch.randn(n, heads * dim, requires_grad=True) for n in prompt_lens]
    suffix_x = [torch.randn(n, heads * dim, requires_grad=True) for n in suffix_lens]
    scale = dim ** -0.5

    def qkv(x):
        q, k, v = (x @ proj).split((heads * dim, kv_heads * dim, kv_heads * dim), dim=-1)
        return q.reshape(-1, heads, dim), k.reshape(-1, kv_heads, dim), v.reshape(-1, kv_heads, dim)

    def run_paged():
        cache = PagedKVCache(CONFIG, num_pages=16, page_size=4, requires_grad=True)
        cache.begin_training_step()
        for b in range(3):
            cache.add_sequence(b)
        outs = {b: [] for b in range(3)}
        batch = cache.prepare([0, 1, 2], prompt_lens)
        o = attention(*qkv(torch.cat(prompt_x)), batch, scale, backend, cache)
        last = o.reshape(-1, heads * dim)[batch.last_token_indices()]
        for b, chunk in enumerate(o.split(prompt_lens)):
            outs[b].append(chunk)
        for t in range(1, max(thoughts) + 1):
            active = [b for b in range(3) if thoughts[b] >= t]
            batch = cache.prepare(active, [1] * len(active))
            rows = torch.tensor([b for b in range(3) if thoughts[b] >= t])
            o = attention(*qkv(last[rows]), batch, scale, backend, cache)
            for i, b in enumerate(active):
                outs[b].append(o[i : i + 1])
            last = last.index_copy(0, rows, o.reshape(-1, heads * dim))
        batch = cache.prepare([0, 1, 2], suffix_lens)
        o = attention(*qkv(torch.cat(suffix_x)), batch, scale, backend, cache)
        for b, chunk in enumerate(o.split(suffix_lens)):
            outs[b].append(chunk)
        return outs

    def run_full():
        """No cache: thoughts recomputed from full forwards, then one forward over everything."""
        xs = [list(p) for p in prompt_x]
        for t in range(1, max(thoughts) + 1):
            for b in range(3):
                if thoughts[b] >= t:
                    x = torch.stack(xs[b])
                    o = varlen_attention(*qkv(x), AttentionBatch.packed([len(x)]), scale)
                    xs[b].append(o.reshape(-1, heads * dim)[-1])
        outs = {}
        for b in range(3):
            x = torch.cat([torch.stack(xs[b]), suffix_x[b]])
            outs[b] = [varlen_attention(*qkv(x), AttentionBatch.packed([len(x)]), scale)]
        return outs

    weights = {b: torch.randn(prompt_lens[b] + thoughts[b] + suffix_lens[b], heads, dim) for b in range(3)}
    grads = []
    for run in (run_paged, run_full):
        outs = run()
        loss = sum((torch.cat(outs[b]) * weights[b]).sum() for b in range(3))
        grads.append(torch.autograd.grad(loss, prompt_x + suffix_x))
    for got, want in zip(*grads):
        assert rel(got, want) < 1e-4


def test_backward_after_cache_reuse_is_a_clear_error():
    cache = PagedKVCache(CONFIG, num_pages=4, page_size=4, requires_grad=True)
    cache.begin_training_step()
    cache.add_sequence(0)
    q = torch.randn(3, 4, 16, requires_grad=True)
    k, v = torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    out = attention(q, k, v, cache.prepare([0], [3]), 0.25, "torch", cache)
    cache.begin_training_step()
    with pytest.raises(RuntimeError, match="reused .* before the backward"):
        out.sum().backward()


@pytest.mark.parametrize("strided", [False, True], ids=["gathered", "strided"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "recompute"])
@pytest.mark.parametrize("group", [1, 2])
def test_torch_backend_long_fresh_prefill(group, fused, strided, monkeypatch):
    """A ragged prefill from empty past FRESH_PREFILL_MIN_TOKENS runs per sequence, forward and
    backward: with the fused CPU kernels (the log-sum-exp saved), and without them (the backward
    re-runs SDPA under autograd, as on a GPU without Triton)."""
    if not fused:
        monkeypatch.setattr(torch_backend, "uses_fused_kernels", lambda device: False)
    lens = [torch_backend.FRESH_PREFILL_MIN_TOKENS + 3, 40, torch_backend.FRESH_PREFILL_MIN_TOKENS + 70]
    q, k_pool, v_pool, batch = make_case(group, 32, 16, torch.float32, [0, 0, 0], lens, strided=strided)
    # the pools hold exactly what this step stored at its slots
    for pool in (k_pool, v_pool):
        pool.view(-1, *pool.shape[2:])[batch.slot_mapping] = torch.randn(sum(lens), *pool.shape[2:])
    calls = []
    names = ["_fresh_prefill", "_fresh_prefill_backward" if fused else "_fresh_prefill_backward_autograd"]
    for name in names:
        original = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    scale = 32 ** -0.5
    out, lse = torch_backend.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=fused) if fused else (
        torch_backend.paged_attention(q, k_pool, v_pool, batch, scale), None)
    ref_out, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    if fused:
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    dout = torch.randn_like(out)
    grad_k, grad_v = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    dq = torch_backend.paged_attention_backward(dout, q, out, lse, k_pool, v_pool, grad_k, grad_v, batch, scale)
    want_q, want_k, want_v = oracle_grads(q, k_pool, v_pool, batch, dout)
    assert rel(dq, want_q) < 1e-4 and rel(grad_k, want_k) < 1e-4 and rel(grad_v, want_v) < 1e-4
    assert calls == names


@pytest.mark.parametrize("strided", [False, True], ids=["gathered", "strided"])
@pytest.mark.parametrize("group", [1, 2])
def test_one_token_step_over_key_chunks(group, strided, monkeypatch):
    """A one-token step whose broadcast products run over several chunks of keys (long contexts)
    gives the reference's output, log-sum-exp and gradients."""
    monkeypatch.setattr(torch_backend, "ONE_TOKEN_CHUNK_ELEMENTS", 6 * 2 * group * 32 * 7)  # 7 keys per chunk
    monkeypatch.setattr(torch_backend, "uses_fused_kernels", lambda device: False)  # the forward runs here too
    q, k_pool, v_pool, batch = make_case(group, 32, 8, torch.float32, lengths(8), [1, 1, 1, 0, 1, 1],
                                         strided=strided)
    scale = 32 ** -0.5
    ref_out, ref_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    out, lse = torch_backend.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)
    check_backward(torch_backend.paged_attention_backward, q, k_pool, v_pool, batch)


def _record_calls(monkeypatch, *names: str) -> list[str]:
    """Wrap the torch backend's functions `names` so that each call appends its name to the returned list."""
    calls = []
    for name in names:
        original = getattr(torch_backend, name)
        monkeypatch.setattr(torch_backend, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    return calls


@pytest.mark.parametrize("strided", [False, True], ids=["gathered", "strided"])
@pytest.mark.parametrize("small", [True, False], ids=["small", "large"])
def test_one_token_backward_picks_the_fused_kernel_for_small_steps(small, strided, monkeypatch):
    """On CPU a one-token step's backward is the fused flash kernel's up to ONE_TOKEN_FUSED_MAX_ELEMENTS
    (its fixed cost is the lower one there) and the elementwise one above; both give the reference's
    gradients."""
    q, k_pool, v_pool, batch = make_case(2, 32, 8, torch.float32, lengths(8), [1, 1, 1, 0, 1, 1], strided=strided)
    size = batch.num_seqs * q.shape[1] * batch.max_seqlen_k * q.shape[2]
    monkeypatch.setattr(torch_backend, "ONE_TOKEN_FUSED_MAX_ELEMENTS", size if small else size - 1)
    calls = _record_calls(monkeypatch, "_fused_backward", "_one_token_step_backward")
    check_backward(torch_backend.paged_attention_backward, q, k_pool, v_pool, batch)
    assert calls == ["_fused_backward" if small else "_one_token_step_backward"]


@pytest.mark.parametrize("many_kv_heads", [False, True], ids=["rows", "elementwise"])
def test_thought_step_backward_takes_the_batched_products_up_to_a_kv_head_count(many_kv_heads, monkeypatch):
    """A training thought step (one token per sequence over strided rows) takes
    `_one_token_rows_backward` up to ONE_TOKEN_ROWS_MAX_KV_HEADS kv heads (its block rows cost kv_heads
    times the arithmetic) and the elementwise backward above; both give the reference's gradients."""
    q, k_pool, v_pool, batch = make_case(2, 16, 8, torch.float32, lengths(8), [1] * 6, num_kv_heads=4, strided=True)
    monkeypatch.setattr(torch_backend, "ONE_TOKEN_ROWS_MAX_KV_HEADS", 3 if many_kv_heads else 4)
    monkeypatch.setattr(torch_backend, "ONE_TOKEN_FUSED_MAX_ELEMENTS", 0)
    calls = _record_calls(monkeypatch, "_one_token_rows_backward", "_one_token_step_backward")
    check_backward(torch_backend.paged_attention_backward, q, k_pool, v_pool, batch)
    assert calls == ["_one_token_step_backward" if many_kv_heads else "_one_token_rows_backward"]
