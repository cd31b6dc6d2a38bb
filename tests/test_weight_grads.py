"""WeightGradBatcher: deferred weight gradients equal those of plain linears, step by step."""
import torch
import torch.nn.functional as F

from coconut_engine.weight_grads import WeightGradBatcher


def run(linear, weight, bias, frozen, x0):
    """Three small dependent steps through the same weights (like thought steps), plus a frozen layer."""
    h = x0
    for _ in range(3):
        h = torch.tanh(linear(h, weight, bias))
        h = linear(h, frozen, None)
    return (h * torch.linspace(-1, 1, h.shape[-1])).sum()


def test_deferred_weight_gradient_equals_plain_linear():
    torch.manual_seed(0)
    weight = torch.randn(6, 6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    frozen = torch.randn(6, 6)  # needs no gradient: plain F.linear, nothing collected
    x0 = torch.randn(4, 6, requires_grad=True)
    batcher = WeightGradBatcher()
    deferred = torch.autograd.grad(run(batcher.linear, weight, bias, frozen, x0), (weight, bias, x0))
    plain = torch.autograd.grad(run(F.linear, weight, bias, frozen, x0), (weight, bias, x0))
    for got, want in zip(deferred, plain):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert deferred[0].is_contiguous()
    assert len(batcher._proxies) == 1  # one proxy for the trained weight, reused by every step


def test_without_autograd_it_is_a_plain_linear():
    weight, x = torch.randn(3, 5, requires_grad=True), torch.randn(2, 5)
    with torch.no_grad():
        out = WeightGradBatcher().linear(x, weight, None)
    torch.testing.assert_close(out, x @ weight.t())
    assert out.grad_fn is None
