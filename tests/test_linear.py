"""coconut_engine.linear: the MLP's activation recomputed in the backward, the deferred weight
gradients, and the LM head's cross-entropy node give the plain composition's results and gradients;
the recompute saves only the pre-activation, the head keeps one logits-sized tensor, and a weight's
gradient is made once, by the backward of its first use."""
import pytest
import torch
import torch.nn.functional as F

from coconut_engine.bench import peak_tensor_bytes
from coconut_engine.linear import (ACTIVATIONS, DeferredWeightGrads, activation_linear, embedding, linear,
                                   linear_cross_entropy)


def plain(h, kind, weight, bias):
    if kind == "identity":
        return F.linear(h, weight, bias)
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, weight, bias)
    return F.linear(F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none"), weight, bias)


def inputs(kind, with_bias, tokens=37, hidden=24, inner=40):
    h = torch.randn(tokens, 2 * inner if kind == "swiglu" else inner, requires_grad=True)
    weight = torch.randn(hidden, inner, requires_grad=True)
    bias = torch.randn(hidden, requires_grad=True) if with_bias else None
    return h, weight, bias


def grads(fn, h, kind, weight, bias, grad_out):
    leaves = [t for t in (h, weight, bias) if t is not None]
    out = fn(h, kind, weight, bias)
    return out, torch.autograd.grad(out, leaves, grad_out)


@pytest.mark.parametrize("kind", ACTIVATIONS)
@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_plain_autograd_fp32(kind, with_bias):
    h, weight, bias = inputs(kind, with_bias)
    grad_out = torch.randn(h.shape[0], weight.shape[0])
    out, got = grads(activation_linear, h, kind, weight, bias, grad_out)
    ref_out, expected = grads(plain, h, kind, weight, bias, grad_out)
    torch.testing.assert_close(out, ref_out, rtol=1e-6, atol=1e-6)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ACTIVATIONS)
def test_bf16_autocast_keeps_fp32_master_gradients(kind):
    h, weight, bias = inputs(kind, True)
    grad_out = torch.randn(h.shape[0], weight.shape[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h_bf16 = h.to(torch.bfloat16)  # as an autocast up projection would hand it over
        out = activation_linear(h_bf16, kind, weight, bias)
        ref = plain(h_bf16, kind, weight, bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref)
    got = torch.autograd.grad(out, (h, weight, bias), grad_out.to(out.dtype))
    expected = torch.autograd.grad(ref, (h, weight, bias), grad_out.to(ref.dtype))
    for g, e, leaf in zip(got, expected, (h, weight, bias)):
        assert g.dtype == leaf.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kind", [k for k in ACTIVATIONS if k != "identity"])
def test_saves_only_the_pre_activation(kind):
    h, weight, bias = inputs(kind, True)
    h_in = h * 1.0  # a non-leaf, like the up projection's output
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        activation_linear(h_in, kind, weight, bias)
    activations = [t for t in saved if t.data_ptr() not in (weight.data_ptr(), bias.data_ptr())]
    assert len(activations) == 1 and activations[0].data_ptr() == h_in.data_ptr()

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain(h_in, kind, weight, bias)
    plain_bytes = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != weight.data_ptr())
    assert plain_bytes >= 2 * h_in.numel() * h_in.element_size()  # what the recompute saves: 1x


def test_without_grad_is_the_plain_composition():
    h, weight, bias = inputs("gelu", True)
    with torch.no_grad():
        out = activation_linear(h, "gelu", weight, bias)
    assert out.grad_fn is None
    torch.testing.assert_close(out, plain(h, "gelu", weight, bias).detach(), rtol=0, atol=0)


def test_rejects_unknown_activation():
    h, weight, bias = inputs("gelu", True)
    with pytest.raises(ValueError, match="relu"):
        activation_linear(h, "relu", weight, bias)


def chain(x, layers, deferred=None, steps=3):
    """A small recurrence like the thought steps: each step feeds its output back through the layers."""
    outs = []
    for _ in range(steps):
        h = linear(x, layers[0], deferred)
        x = activation_linear(h, "gelu", layers[1].weight, layers[1].bias, deferred)
        outs.append(x)
    return torch.stack(outs)


def test_deferred_weight_gradients_equal_the_per_step_ones():
    layers = [torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)]
    x = torch.randn(5, 16, requires_grad=True)
    grad_out = torch.randn(3, 5, 16)
    leaves = [x, *(p for layer in layers for p in layer.parameters())]
    expected = torch.autograd.grad(chain(x, layers), leaves, grad_out)
    deferred = DeferredWeightGrads()
    got = torch.autograd.grad(chain(x, layers, deferred), leaves, grad_out)  # autograd.grad sees them too
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_deferred_weight_gradient_arrives_once_after_every_step():
    """The parameter's hook fires once, with the whole gradient; a weight also used outside the
    deferred calls gets both parts."""
    layers = [torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)]
    x = torch.randn(5, 16)
    seen = []
    layers[0].weight.register_hook(lambda g: seen.append(g.clone()))
    deferred = DeferredWeightGrads()
    out = chain(x, layers, deferred)
    out.sum().backward()
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], layers[0].weight.grad)
    expected = layers[0].weight.grad.clone()
    layers[0].zero_grad()
    chain(x, layers).sum().backward()
    torch.testing.assert_close(expected, layers[0].weight.grad, rtol=1e-5, atol=1e-6)
    # used by direct (non-deferred) calls as well: both parts add up
    layers[0].zero_grad()
    (chain(x, layers, DeferredWeightGrads()).sum() + linear(x, layers[0]).sum()).backward()
    both = layers[0].weight.grad.clone()
    layers[0].zero_grad()
    (chain(x, layers).sum() + linear(x, layers[0]).sum()).backward()
    torch.testing.assert_close(both, layers[0].weight.grad, rtol=1e-5, atol=1e-6)


def test_deferred_weight_gradient_through_a_retained_graph_twice():
    layers = [torch.nn.Linear(16, 40), torch.nn.Linear(40, 16)]
    out = chain(torch.randn(5, 16), layers, DeferredWeightGrads()).sum()
    first = torch.autograd.grad(out, layers[0].weight, retain_graph=True)[0]
    second = torch.autograd.grad(out, layers[0].weight)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_direct_first_use_makes_the_gradient_the_recorded_steps_add_into():
    """A first call given `direct()` (the prefill) makes the weight gradient; the later, recorded calls'
    product is added into it: the gradients are the plain ones, and the backward never holds two
    weight-sized gradients (plain autograd holds the last call's until the first call's arrives)."""
    big = [torch.nn.Linear(512, 512), torch.nn.Linear(512, 512)]
    x = torch.randn(4, 512, requires_grad=True)
    leaves = [x, *(p for layer in big for p in layer.parameters())]

    def run(deferred):
        first = linear(x, big[0], deferred.direct() if deferred else None)
        return chain(first, big, deferred, steps=3).sum() + first.sum()

    expected = torch.autograd.grad(run(None), leaves)
    got = torch.autograd.grad(run(DeferredWeightGrads()), leaves)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)

    weight_bytes = sum(layer.weight.numel() * 4 for layer in big)
    for p in (p for layer in big for p in layer.parameters()):
        p.grad = torch.zeros_like(p)  # as a trainer has them: the backward adds into them
    plain_loss, deferred_loss = run(None), run(DeferredWeightGrads())
    assert peak_tensor_bytes(plain_loss.backward) >= 1.9 * weight_bytes
    assert peak_tensor_bytes(deferred_loss.backward) < 1.5 * weight_bytes


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_linear_cross_entropy_matches_the_composition(reduction):
    h = torch.randn(13, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    loss = linear_cross_entropy(h, weight, targets, reduction)
    ref = F.cross_entropy(F.linear(h, weight), targets, reduction=reduction)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(3.0 * loss, (h, weight))  # an upstream gradient other than 1 scales it
    expected = torch.autograd.grad(3.0 * ref, (h, weight))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, targets, reduction), ref.detach())


def test_linear_cross_entropy_rows_in_several_logsumexp_chunks(monkeypatch):
    import coconut_engine.linear as linear_module

    monkeypatch.setattr(linear_module, "LSE_CHUNK_ELEMENTS", 3 * 50)  # 3 rows per chunk, a short last one
    h = torch.randn(13, 24, requires_grad=True)
    weight = torch.randn(50, 24)
    targets = torch.randint(0, 50, (13,))
    loss = linear_cross_entropy(h, weight, targets)
    torch.testing.assert_close(loss, F.cross_entropy(F.linear(h, weight), targets), rtol=1e-6, atol=1e-6)


def test_linear_cross_entropy_through_a_retained_graph_twice():
    """The first backward turns the saved logits into their gradient in place; a second one recomputes them."""
    h = torch.randn(9, 16, requires_grad=True)
    weight = torch.randn(30, 16, requires_grad=True)
    loss = linear_cross_entropy(h, weight, torch.randint(0, 30, (9,)))
    first = torch.autograd.grad(loss, (h, weight), retain_graph=True)
    second = torch.autograd.grad(loss, (h, weight))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_linear_cross_entropy_bf16_autocast():
    h = torch.randn(13, 24, requires_grad=True)
    weight = torch.randn(50, 24, requires_grad=True)
    targets = torch.randint(0, 50, (13,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(h, weight, targets)
        ref = F.cross_entropy(F.linear(h, weight).float(), targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-3, atol=1e-3)
    got = torch.autograd.grad(loss, (h, weight))
    expected = torch.autograd.grad(ref, (h, weight))
    for g, e in zip(got, expected):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=2e-2, atol=2e-2)


def test_linear_cross_entropy_keeps_one_logits_sized_tensor(monkeypatch):
    import coconut_engine.linear as linear_module

    monkeypatch.setattr(linear_module, "LSE_CHUNK_ELEMENTS", 8 * 20000)  # logsumexp temporaries: 1/8 of the logits
    h = torch.randn(64, 32, requires_grad=True)
    weight = torch.randn(20000, 32, requires_grad=True)
    targets = torch.randint(0, 20000, (64,))
    logits_bytes = 64 * 20000 * 4
    weight.grad = torch.zeros_like(weight)
    composed = peak_tensor_bytes(lambda: F.cross_entropy(F.linear(h, weight), targets).backward())
    fused = peak_tensor_bytes(lambda: linear_cross_entropy(h, weight, targets).backward())
    weight_grad_bytes = weight.numel() * 4  # made by the backward, then added into .grad
    assert composed >= 2.5 * logits_bytes + weight_grad_bytes
    assert fused < 1.3 * logits_bytes + weight_grad_bytes


def test_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long), "none")


def test_tied_head_gradient_is_made_once_by_the_embedding_backward():
    """The embedding (first use) and the tied head (recorded) share one alias: the gradient equals the
    plain one and the backward never holds a second vocab x hidden gradient beside the embedding's."""
    vocab, hidden = 30000, 32
    table = torch.randn(vocab, hidden, requires_grad=True)
    mix = torch.nn.Linear(hidden, hidden)
    ids = torch.randint(0, vocab, (40,))
    targets = torch.randint(0, vocab, (40,))

    def run(deferred):
        x = embedding(ids, table, deferred)
        return linear_cross_entropy(torch.tanh(mix(x)), table, targets, deferred=deferred)

    expected = torch.autograd.grad(run(None), (table, mix.weight))
    got = torch.autograd.grad(run(DeferredWeightGrads()), (table, mix.weight))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)

    table.grad = torch.zeros_like(table)
    table_bytes = vocab * hidden * 4
    plain_loss, deferred_loss = run(None), run(DeferredWeightGrads())
    assert peak_tensor_bytes(plain_loss.backward) >= 1.9 * table_bytes
    assert peak_tensor_bytes(deferred_loss.backward) < 1.3 * table_bytes
