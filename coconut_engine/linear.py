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


class _ActivationLinear(torch.autograd.Function):
    """y = linear(activation(h), weight, bias), saving h (and the weights) only. With `records`, the
    weight gradient is not returned but (activation, dY) recorded there (see DeferredWeightGrads)."""

    @staticmethod
    def forward(ctx, h, weight, bias, kind: str, records):
        ctx.save_for_backward(h, weight, bias)
        ctx.kind, ctx.records = kind, records
        if records is not None:
            records.reserve(h.numel() // h.shape[-1])
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
                ctx.records.add(a, grad_y)
            else:
                grad_w = (grad_y.flatten(0, -2).t() @ a.flatten(0, -2).to(compute)).to(weight.dtype)
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = grad_y.flatten(0, -2).sum(0).to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None


class _WeightAlias(torch.autograd.Function):
    """The weight, as seen by the deferred steps; its backward turns their records into the gradient."""

    @staticmethod
    def forward(ctx, weight, records: "_Records"):
        ctx.records, ctx.dtype = records, weight.dtype
        ctx.set_materialize_grads(False)  # the steps return no gradient to it: no zeros to add
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        deferred = ctx.records.weight_gradient(ctx.dtype)
        if deferred is not None:
            grad = deferred if grad is None else grad + deferred
        return grad, None


class _Records:
    """The (activation, dY) rows of one weight's deferred calls, copied into two buffers allocated
    once at the first backward (the forward counted the rows): no small tensor of every step stays
    alive across the backward, where they would scatter through the C allocator's heap."""

    def __init__(self):
        self.rows = 0
        self.filled = 0
        self.activations: torch.Tensor | None = None
        self.grads_y: torch.Tensor | None = None

    def reserve(self, rows: int) -> None:
        self.rows += rows

    def add(self, a: torch.Tensor, grad_y: torch.Tensor) -> None:
        a, grad_y = a.flatten(0, -2), grad_y.flatten(0, -2)
        if self.filled + len(grad_y) > self.rows:
            # more rows than the forward made: a new backward through a retained graph, after one
            # that did not need this weight's gradient (its alias never ran): start over
            self.filled = 0
        if self.grads_y is None:
            self.grads_y = grad_y.new_empty(self.rows, grad_y.shape[1])
            self.activations = grad_y.new_empty(self.rows, a.shape[1])  # in dY's (the compute) dtype
        end = self.rows - self.filled  # backwards arrive last call first: fill from the end
        self.grads_y[end - len(grad_y) : end] = grad_y
        self.activations[end - len(a) : end] = a
        self.filled += len(grad_y)

    def weight_gradient(self, dtype: torch.dtype) -> torch.Tensor | None:
        """sum over the recorded calls of dY^T A, as one product; None if no call's backward ran."""
        if not self.filled:
            return None
        rows = slice(self.rows - self.filled, self.rows)
        grad = (self.grads_y[rows].t() @ self.activations[rows]).to(dtype)
        self.activations = self.grads_y = None
        self.filled = 0  # a second backward through a retained graph records again
        return grad


class DeferredWeightGrads:
    """One forward's deferral of the weight gradients of the calls given it (the thought steps).

    `alias(weight)` is the same tensor for every call of one forward, so that autograd runs the
    alias's backward once, after all of them. Create one per forward; it holds only the aliases
    and, during the backward, the (activation, dY) rows of the deferred steps.
    """

    def __init__(self):
        self._aliases: dict[int, tuple[torch.Tensor, _Records]] = {}

    def alias(self, weight: torch.Tensor) -> tuple[torch.Tensor, "_Records"]:
        entry = self._aliases.get(id(weight))
        if entry is None:
            records = _Records()
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
