"""Attention-probability dropout (the checkpoint's attn_pdrop / attention_dropout): one mask, a function of
(seed, sample, head, query position, key position), drawn identically by the Triton kernels, the torch
backend, the reference and the no-cache / contiguous-cache paths; so the four training modes agree on loss
and gradients with dropout on."""
import functools

import pytest
import torch
import triton
import triton.language as tl

from coconut_engine import model as model_module
from coconut_engine.coconut import MODES, CoconutModel
from coconut_engine.errors import InvalidArgumentError, KernelInputError
from coconut_engine.kernels import reference, torch_backend
from coconut_engine.kernels.dropout import AttentionDropout, as_int32, dropout_attention, keep_mask, mix32
from coconut_engine.kernels.paged_attention import _dropout_keep, _dropout_row_hash
from coconut_engine.kernels.paged_attention import paged_attention as triton_forward
from coconut_engine.kernels.paged_attention_bwd import paged_attention_backward as triton_backward
from coconut_engine.loader import load_model
from paged_cases import make_case
from test_coconut_modes import TOKENS, loss_and_grads, ragged_samples
from tiny_models import CORE_FAMILIES, build_hf_model

P = 0.3
# the checkpoint's own key for attention dropout, the other dropouts off (their masks depend on the layout)
DROPOUT_KEYS = {"gpt2": dict(attn_pdrop=P, embd_pdrop=0.0, resid_pdrop=0.0), "llama": dict(attention_dropout=P),
                "qwen2": dict(attention_dropout=P)}


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def dropping(request, tmp_path_factory):
    """A Coconut model whose checkpoint asks for attention dropout P, in training mode, with its
    paged (torch backend) loss and gradients under seed 5, and its loss in eval mode."""
    path = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, path, **DROPOUT_KEYS[request.param])
    decoder = load_model(path, attention_backend="torch")
    assert decoder.dropout.attn == P
    model = CoconutModel(decoder, TOKENS, page_size=4)
    with torch.no_grad():
        clean = model(ragged_samples()).item()
    decoder.train()
    torch.manual_seed(5)
    return model, loss_and_grads(model, ragged_samples(), "paged"), clean


def seeded_loss_and_grads(model, mode, backend, seed=5):
    model.decoder.attention_backend = backend
    try:
        torch.manual_seed(seed)
        return loss_and_grads(model, ragged_samples(), mode)
    finally:
        model.decoder.attention_backend = "torch"


# Every mode against the paged torch run for each family; the Triton kernels (interpreted) in the paged
# mode for each family and in two_pass (the same kernels, without a suffix step) for one.
AGREEMENT = [(family, mode, backend) for family in CORE_FAMILIES for mode, backend in (
    ("paged", "triton"), ("two_pass", "torch"), ("multipass", "torch"), ("recompute", "torch"))]
AGREEMENT.append(("gpt2", "two_pass", "triton"))


@pytest.mark.parametrize("dropping,mode,backend", AGREEMENT, indirect=["dropping"])
def test_modes_agree_with_attention_dropout(dropping, mode, backend):
    """Same seed: every mode and backend drops the same probabilities (same loss, same gradients as the
    paged torch run, at the mode-equality tolerances), and they are dropped (the loss is not the clean one)."""
    model, (ref_loss, ref_grads), clean = dropping
    loss, grads = seeded_loss_and_grads(model, mode, backend)
    assert abs(ref_loss - clean) > 1e-3  # dropout changed the loss ...
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)  # ... identically in every mode
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert (grad - ref).norm() <= 1e-4 * ref.norm() + 1e-12, name


def test_same_seed_same_loss_other_seed_other_loss(dropping):
    model, (ref_loss, ref_grads), _ = dropping
    again, grads = seeded_loss_and_grads(model, "paged", "torch")
    assert again == ref_loss and all(torch.equal(grads[n], ref_grads[n]) for n in grads)
    other, _ = seeded_loss_and_grads(model, "paged", "torch", seed=6)
    assert abs(other - ref_loss) > 1e-4


def test_each_layer_and_each_forward_draws_its_own_mask(dropping, monkeypatch):
    """Within one training forward every step of a layer uses that layer's seed and the layers' seeds
    differ (a mask shared by all layers would still let the modes agree); the next forward (the next
    micro-batch) draws new seeds for all of them."""
    model, _, _ = dropping
    seeds, real = [], model_module.attention

    def spy(q, k, v, batch, scale, backend, cache=None, layer=0, dropout=None):
        seeds[-1].append((layer, dropout.seed))
        return real(q, k, v, batch, scale, backend, cache, layer, dropout)

    monkeypatch.setattr(model_module, "attention", spy)
    torch.manual_seed(5)
    per_forward = []
    for _ in range(2):
        seeds.append([])
        model(ragged_samples(), mode="paged")
        by_layer = {}
        for layer, seed in seeds[-1]:
            by_layer.setdefault(layer, set()).add(seed)
        assert len(by_layer) == model.decoder.config.num_layers >= 2
        assert all(len(s) == 1 for s in by_layer.values()), by_layer  # one seed per layer per forward ...
        per_forward.append({next(iter(s)) for s in by_layer.values()})
        assert len(per_forward[-1]) == len(by_layer), by_layer  # ... and a different one for each layer
    assert per_forward[0].isdisjoint(per_forward[1])


def test_eval_and_no_grad_forwards_draw_nothing_and_drop_nothing(dropping):
    """Eval mode, and a training-mode forward without gradients (generation), compute the clean loss in
    every mode and consume no random numbers (no seed drawn: the kernels run their no-dropout variant)."""
    model, _, clean = dropping
    model.decoder.eval()
    try:
        state = torch.get_rng_state()
        with torch.no_grad():
            losses = [model(ragged_samples(), mode=mode).item() for mode in MODES]
        assert torch.equal(torch.get_rng_state(), state)
        assert model.decoder.attention_dropout_seed() is None
    finally:
        model.decoder.train()
    with torch.no_grad():
        losses.append(model(ragged_samples(), mode="paged").item())
    assert max(abs(loss - clean) for loss in losses) <= 1e-5 * abs(clean)


# -- the kernels against the reference -------------------------------------------------------------

def oracle(q, k_pool, v_pool, batch, dout, dropout):
    """Output and gradients by autograd through the loop reference with the same dropout."""
    q, k_pool, v_pool = (t.detach().float().requires_grad_() for t in (q, k_pool, v_pool))
    out = reference.paged_attention(q, k_pool, v_pool, batch, q.shape[-1] ** -0.5, dropout=dropout)
    (out * dout).sum().backward()
    return out.detach(), q.grad, k_pool.grad, v_pool.grad


BACKENDS = {"triton": (triton_forward, triton_backward),
            "torch": (torch_backend.paged_attention, torch_backend.paged_attention_backward)}


@pytest.mark.parametrize("backend,q_kind", [("triton", "extend"), ("triton", "decode"), ("triton", "decode-split"),
                                            ("torch", "extend"), ("torch", "decode")])
@pytest.mark.parametrize("group,head_dim,page", [(1, 32, 16), (7, 80, 16), (2, 64, 8)])
def test_kernels_match_the_reference_with_dropout(backend, q_kind, group, head_dim, page):
    """Forward (output and the un-dropped log-sum-exp) and backward (dq, dK/dV from the recomputed mask)
    of each backend vs autograd through the reference, on ragged permuted pages with GQA; "decode-split"
    splits the keys of the one-token kernels over 3 programs (merged by log-sum-exp, as on a GPU)."""
    forward, backward = BACKENDS[backend]
    if q_kind == "decode-split":
        forward, backward = (functools.partial(f, num_splits=3) for f in (forward, backward))
    q_lens = [3, 1, 0, page + 2, 17, 40] if q_kind == "extend" else [1, 1, 1, 0, 1, 1]
    q, k_pool, v_pool, batch = make_case(group, head_dim, page, torch.float32, [1, page - 1, page, page + 1, 70, 0],
                                         q_lens)
    dropout = AttentionDropout(P, 0xC0FFEE42, torch.tensor([4, 0, 5, 2, 1, 3], dtype=torch.int32))
    scale = head_dim ** -0.5
    n = batch.num_tokens
    out, lse = forward(q, k_pool, v_pool, batch, scale, return_lse=True, dropout=dropout)
    dout = torch.randn_like(out)
    want_out, want_q, want_k, want_v = oracle(q, k_pool, v_pool, batch, dout, dropout)
    _, want_lse = reference.paged_attention(q, k_pool, v_pool, batch, scale, return_lse=True)
    clean = reference.paged_attention(q, k_pool, v_pool, batch, scale)
    assert (want_out[:n] - clean[:n]).abs().max() > 0.1  # the reference drops ...
    assert (out[:n] - want_out[:n]).abs().max() < 1e-5  # ... and the backend drops the same
    assert (lse[:n] - want_lse[:n]).abs().max() < 1e-5
    grad_k, grad_v = torch.zeros_like(k_pool), torch.zeros_like(v_pool)
    dq = backward(dout, q, out, lse, k_pool, v_pool, grad_k, grad_v, batch, scale, dropout=dropout)
    assert rel(dq[:n], want_q[:n]) < 1e-4
    assert rel(grad_k, want_k) < 1e-4
    assert rel(grad_v, want_v) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_rate_and_scale(backend):
    """Uniform probabilities (q = 0) over one-hot values: each output entry is its probability after
    dropout, so it is 0 or 1 / (k_len (1 - p)); about 1 - p of them are kept, and they are exactly the
    entries of `keep_mask`."""
    forward, _ = BACKENDS[backend]
    q_len, heads, dim = 96, 4, 128
    q, k_pool, v_pool, batch = make_case(heads, dim, 16, torch.float32, [0], [q_len], num_kv_heads=1)
    q.zero_()
    v_pool.zero_()
    for pos in range(q_len):
        v_pool[batch.block_table[0, pos // 16], pos % 16, 0, pos] = 1.0
    dropout = AttentionDropout(P, 12345, torch.tensor([7], dtype=torch.int32))
    out = forward(q, k_pool, v_pool, batch, 1.0, dropout=dropout)[:, :, :q_len]  # [q, heads, keys]
    rows = torch.arange(q_len)
    visible = rows[None, :] <= rows[:, None]
    kept_value = (1 / (1 - P)) / (rows + 1).float()[:, None, None]  # row i sees i + 1 keys
    kept = out > 0
    assert not kept.transpose(1, 2)[~visible].any()
    assert torch.allclose(out[kept], kept_value.expand_as(out)[kept], rtol=1e-5)
    want = keep_mask(dropout, dropout.rows[0], torch.arange(heads)[None, :, None], rows[:, None, None],
                     rows[None, None, :]) & visible[:, None, :]
    assert torch.equal(kept, want)
    rate = kept.sum().item() / (visible.sum().item() * heads)
    assert abs(rate - (1 - P)) < 0.03, rate


def test_dropout_arguments_are_checked():
    with pytest.raises(InvalidArgumentError, match="p must be in"):
        AttentionDropout(1.0, 1, torch.zeros(1, dtype=torch.int32))
    q, k_pool, v_pool, batch = make_case(1, 32, 16, torch.float32, [3, 4], [2, 1])
    with pytest.raises(KernelInputError, match=r"dropout.rows must be 1-D with one .* \(2\)"):
        triton_forward(q, k_pool, v_pool, batch, 1.0, dropout=AttentionDropout(P, 1, torch.zeros(3, dtype=torch.int32)))
    with pytest.raises(KernelInputError, match="dropout.rows must be int32"):
        triton_backward(q, q, q, torch.zeros(q.shape[:2]), k_pool, v_pool, torch.zeros_like(k_pool),
                        torch.zeros_like(v_pool), batch, 1.0, dropout=AttentionDropout(P, 1, torch.zeros(2)))


def test_mask_hash_is_32_bit_exact():
    """The torch hash is the uint32 arithmetic the kernels do (known values of the finaliser), for Python
    ints and int64 tensors alike, and the keep test draws (almost) independent bits per coordinate."""
    values = [0, 1, 0xDEADBEEF, 0xFFFFFFFF]
    want = []
    for x in values:  # the finaliser written with explicit modulo arithmetic
        x ^= x >> 16
        x = (x * 0x21F0AAAD) % (1 << 32)
        x ^= x >> 15
        x = (x * 0x735A2D97) % (1 << 32)
        want.append(x ^ (x >> 15))
    assert [mix32(x) for x in values] == want
    tensor = torch.tensor(values, dtype=torch.int64)
    assert mix32(tensor).tolist() == want and tensor.tolist() == values
    dropout = AttentionDropout(0.5, 99, torch.zeros(1, dtype=torch.int32))
    pos = torch.arange(256)
    mask = keep_mask(dropout, torch.tensor(0), torch.tensor(0), pos[:, None], pos[None, :])
    assert abs(mask.float().mean().item() - 0.5) < 0.01
    neighbours = (mask[:, 1:] == mask[:, :-1]).float().mean().item()  # adjacent keys: no correlation
    assert abs(neighbours - 0.5) < 0.01


@triton.jit
def _keep_probe_kernel(ROWS, HEAD, Q_POS, K_POS, KEEP, seed, threshold, N: tl.constexpr):
    """The kernels' keep bits for row i = (ROWS[i], HEAD[i], Q_POS[i]) over keys K_POS: KEEP `[N, N]`."""
    i = tl.arange(0, N)
    row_hash = _dropout_row_hash(seed, ROWS, i, tl.load(HEAD + i), tl.load(Q_POS + i))
    keep = _dropout_keep(row_hash, tl.load(K_POS + i), threshold)
    tl.store(KEEP + i[:, None] * N + i[None, :], keep.to(tl.int32))


def check_kernel_hash_at_extremes(device: str = "cpu") -> None:
    """The kernels' uint32 hash (the functions they call, in one program) against `keep_mask`'s int64
    one where the arithmetic could part: seeds across 2**31, rows, heads and positions beyond 2**16
    up to 2**31 - 1, and p near 0 and 1 (threshold 0 and 2**24 - 1)."""
    n = 16
    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([0, 1, 65535, 65536, 2**20, 2**31 - 1, 7, 3] * 2, dtype=torch.int32)
    heads = torch.tensor([0, 1, 63, 64, 127, 255, 1000, 2**16 + 3] * 2, dtype=torch.int32)
    q_pos = torch.tensor([0, 1, 2**16 - 1, 2**16, 2**20, 2**24 + 5, 2**31 - 1, 100000] * 2, dtype=torch.int32)
    k_pos = torch.randint(0, 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
    k_pos[:4] = torch.tensor([0, 1, 2**16, 2**31 - 1])
    for seed in (0, 1, 0x7FFFFFFF, 0x80000000, 0xC0FFEE42, 0xFFFFFFFF):
        for p in (1e-9, 0.1, 0.5, 0.999999):
            dropout = AttentionDropout(p, seed, rows)
            keep = torch.zeros(n, n, dtype=torch.int32, device=device)
            _keep_probe_kernel[(1,)](rows.to(device), heads.to(device), q_pos.to(device), k_pos.to(device), keep,
                                     as_int32(seed), dropout.threshold, N=n)
            want = keep_mask(dropout, rows[:, None], heads[:, None], q_pos[:, None], k_pos[None, :])
            assert torch.equal(keep.cpu().bool(), want), (seed, p)


def test_kernel_hash_equals_the_torch_hash_at_extremes():
    check_kernel_hash_at_extremes()


def test_no_cache_dropout_attention_saves_no_probabilities():
    """The no-cache attention with dropout (two_pass's and recompute's full forwards, the multipass cache)
    keeps what SDPA's flash kernel keeps for its backward, never a `[heads, q, k]` tensor per layer (19 MB
    per layer per sequence of 512 tokens with 12 heads, plain autograd kept 32 MB); its gradients are
    autograd's through the same probabilities, with GQA and a visibility mask with a fully masked row."""
    torch.manual_seed(0)
    heads, kv_heads, n, dim = 6, 2, 40, 16
    q = torch.randn(2, heads, n, dim, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, n, dim, requires_grad=True) for _ in range(2))
    visible = torch.ones(n, n, dtype=torch.bool).tril()[None, None].repeat(2, 1, 1, 1)
    visible[1, :, :, :3] = False  # left padding: three keys nobody sees, three rows that see nothing
    visible[1, :, :3] = False
    dropout = AttentionDropout(P, 0xC0FFEE42, torch.tensor([3, 1], dtype=torch.int32))
    pos = torch.arange(n).expand(2, n)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = dropout_attention(q, k, v, visible, 0.25, dropout, dropout.rows, pos, pos)
    assert max(saved) < heads * n * n, saved  # nothing of size [heads, q, k] (visible is [1, q, k] per sequence)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # the same function under plain autograd
    rep = heads // kv_heads
    scores = q @ k.repeat_interleave(rep, 1).transpose(-1, -2) * 0.25
    probs = torch.softmax(scores.masked_fill(~visible, torch.finfo(torch.float32).min), dim=-1)
    keep = keep_mask(dropout, dropout.rows[:, None, None, None], torch.arange(heads)[None, :, None, None],
                     pos[:, None, :, None], pos[:, None, None, :])
    want = torch.where(keep, probs / (1 - P), 0.0) @ v.repeat_interleave(rep, 1)
    assert (out - want).abs().max() < 1e-5
    for got, ref in zip(grads, torch.autograd.grad(want, (q, k, v), dout)):
        assert rel(got, ref) < 1e-5
