"""coconut_engine.linear: the MLP's activation recomputed in the backward, and the thought steps'
deferred weight gradients, give the plain composition's results and gradients; the recompute saves
only the pre-activation."""
import pytest
import torch
import torch.nn.functional as F

from coconut_engine.linear import ACTIVATIONS, DeferredWeightGrads, activation_linear, linear


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
