"""The decoder's linear layers as autograd nodes that keep less and write less than plain autograd.

- Activation recompute (every training forward): the MLP's activation and down projection are one
  node that saves the up projection's output alone and recomputes the activation in the backward.
  Plain autograd keeps both the pre-activation (for the activation's backward) and the activation
  (for the down projection's weight gradient), and for SwiGLU the gate/up halves and their
  product besides: this halves the MLP's activation memory.
- Deferred weight gradients (the continuous-thought steps): a thought step runs every linear
  layer on one token per sequence, so its weight gradient dY^T X is a product of depth B (the
  sequences still thinking) that writes a whole weight-sized tensor, which autograd then adds into
  the weight's running gradient: per step, per weight. With `DeferredWeightGrads` the steps use
  each weight through an alias node; their backwards store (X, dY) and return no weight gradient,
  and the alias's backward, which autograd runs after the last step that used it, returns the
  gradient of all the steps as one product of depth steps x B. It reaches the parameter through
  autograd like any other gradient (hooks, `torch.autograd.grad` and DDP see it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "gelu", "gelu_tanh", "swiglu")


def _activate(h: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "identity":
        return h
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _activation_backward(grad: torch.Tensor, h: torch.Tensor, kind: str) -> torch.Tensor:
    """d(activation)/dh applied to `grad` (the gradient w.r.t. the activation's output)."""
    if kind == "identity":
        return grad
    if kind == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return torch.cat((torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)), dim=-1)
    return torch.ops.aten.gelu_backward(grad, h, approximate="tanh" if kind == "gelu_tanh" else "none")


def _weight_gradient(grads_y: list[torch.Tensor], activations: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """sum_i dY_i^T A_i as one product, in dY's dtype (the autocast one), returned in `dtype` (the weight's)."""
    def rows(parts):  # one matrix of all the rows (no copy for a single part)
        return parts[0].flatten(0, -2) if len(parts) == 1 else torch.cat([p.flatten(0, -2) for p in parts])

    grad_y = rows(grads_y)
    return (grad_y.t() @ rows(activations).to(grad_y.dtype)).to(dtype)


class _ActivationLinear(torch.autograd.Function):
    """y = linear(activation(h), weight, bias), saving h (and the weights) only. With `records`, the
    weight gradient is not returned but (activation, dY) appended there (see DeferredWeightGrads)."""

    @staticmethod
    def forward(ctx, h, weight, bias, kind: str, records):
        ctx.save_for_backward(h, weight, bias)
        ctx.kind, ctx.records = kind, records
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
            a = _activate(h, ctx.kind)
            if ctx.records is not None:
                ctx.records.append((a, grad_y))
            else:
                grad_w = _weight_gradient([grad_y], [a], weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_y.flatten(0, -2).sum(0).to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


class _WeightAlias(torch.autograd.Function):
    """The weight, as seen by the deferred steps; its backward turns their records into the gradient."""

    @staticmethod
    def forward(ctx, weight, records: list):
        ctx.records, ctx.dtype = records, weight.dtype
        ctx.set_materialize_grads(False)  # the steps return no gradient to it: no zeros to add
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        records, ctx.records = ctx.records, None
        if records:
            deferred = _weight_gradient([g for _, g in records], [a for a, _ in records], ctx.dtype)
            grad = deferred if grad is None else grad + deferred
        return grad, None


class DeferredWeightGrads:
    """One forward's deferral of the weight gradients of the calls given it (the thought steps).

    `alias(weight)` is the same tensor for every call of one forward, so that autograd runs the
    alias's backward once, after all of them. Create one per forward; it holds only the aliases
    and, during the backward, the small (activation, dY) records of the deferred steps.
    """

    def __init__(self):
        self._aliases: dict[int, tuple[torch.Tensor, list]] = {}

    def alias(self, weight: torch.Tensor) -> tuple[torch.Tensor, list]:
        entry = self._aliases.get(id(weight))
        if entry is None:
            records: list = []
            entry = self._aliases[id(weight)] = (_WeightAlias.apply(weight, records), records)
        return entry


def activation_linear(h: torch.Tensor, kind: str, weight: torch.Tensor, bias: torch.Tensor | None,
                      deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
    """`F.linear(activation(h), weight, bias)` for `kind` in ACTIVATIONS ("swiglu": h is [gate | up]).

    Under autograd the activation is recomputed in the backward instead of being saved, and with
    `deferred` the weight gradient is left to the alias's backward; the result and the gradients
    are those of the plain composition.
    """
    if kind not in ACTIVATIONS:
        raise ValueError(f"activation {kind!r} is not one of {ACTIVATIONS}")
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return F.linear(_activate(h, kind), weight, bias)
    records = None
    if deferred is not None and weight.requires_grad:
        weight, records = deferred.alias(weight)
    elif kind == "identity":
        return F.linear(h, weight, bias)  # nothing to recompute or defer: autograd's own linear
    return _ActivationLinear.apply(h, weight, bias, kind, records)


def linear(x: torch.Tensor, module: torch.nn.Linear, deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
    """`module(x)`, its weight gradient deferred where `deferred` is given."""
    return activation_linear(x, "identity", module.weight, module.bias, deferred)
