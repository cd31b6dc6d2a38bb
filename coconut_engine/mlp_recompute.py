"""The MLP's activation and down projection as one autograd node that saves only the pre-activation.

Plain autograd keeps, per MLP and token, the up projection's output (for the activation's backward)
and the activation's output (for the down projection's weight gradient), and for SwiGLU the
gate/up halves and their product besides. This node saves the up projection's output alone and
recomputes the activation (one elementwise pass) in the backward: GELU MLPs keep half the
activation memory, SwiGLU ones a half as well. Every training path (cache or no cache) gets it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu")


def _activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _activation_backward(grad: torch.Tensor, h: torch.Tensor, kind: str) -> torch.Tensor:
    """d(activation)/dh applied to `grad` (the gradient w.r.t. the activation's output)."""
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)), dim=-1)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if kind == "gelu_tanh" else "none")


class _ActivationLinear(torch.autograd.Function):
    """y = linear(activation(h), weight, bias), saving h (and the weights) only."""

    @staticmethod
    def forward(ctx, h, weight, bias, kind: str):
        ctx.save_for_backward(h, weight, bias)
        ctx.kind = kind
        return F.linear(_activate(h, kind), weight, bias)  # under autocast: in the autocast dtype

    @staticmethod
    def backward(ctx, grad_y):
        # dtypes are explicit (the products run in grad_y's dtype, the autocast one if the forward
        # had it), so the backward does not depend on whether autocast is active where it runs
        h, weight, bias = ctx.saved_tensors
        compute = grad_y.dtype
        grad_h = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_h = _activation_backward((grad_y @ weight.to(compute)).to(h.dtype), h, ctx.kind)
        if ctx.needs_input_grad[1]:
            a = _activate(h, ctx.kind).to(compute)
            grad_w = (grad_y.flatten(0, -2).t() @ a.flatten(0, -2)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_y.flatten(0, -2).sum(0).to(bias.dtype)
        return grad_h, grad_w, grad_b, None


def activation_linear(h: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(activation(h), weight, bias)` for `kind` in ACTIVATIONS ("swiglu": h is [gate | up]).

    Under autograd the activation is recomputed in the backward instead of being saved; the result
    and the gradients are those of the plain composition.
    """
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation {kind!r} is not one of {ACTIVATIONS}")
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ActivationLinear.apply(h, weight, bias, kind)
    return F.linear(_activate(h, kind), weight, bias)
