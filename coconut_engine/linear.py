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
- Where a weight's gradient is made (`DeferredWeightGrads.direct()`): a call through the alias that
  computes its own gradient (the prefill of a paged forward, the token embedding) hands it to the
  alias, which adds the recorded product into it in place. Autograd keeps each weight's incoming
  gradient until every use of the weight has been backpropagated, so a weight-sized gradient is
  best made at the backward of the weight's first use: plain autograd makes the tied LM head's at
  the start of the backward and holds it to the end (the embedding's backward comes last), and
  the last step's for every layer before the prefill's activations are freed. With the logits and
  the later steps recorded, each gradient is made when its first use is backpropagated.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("identity", "gelu", "gelu_tanh", "swiglu")
LSE_CHUNK_ELEMENTS = 1 << 22  # rows of logits per logsumexp call: its temporaries stay at 16 MB (fp32)


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
        return ctx.records.weight_gradient(ctx.dtype, into=grad), None


class _Records:
    """The (activation, dY) rows of one weight's deferred calls, copied into two buffers allocated
    once at the first backward (the forward counted the rows): no small tensor of every step stays
    alive across the backward, where they would scatter through the C allocator's heap. A single
    call's rows (the logits of a tied LM head) are kept as they are, not copied."""

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
            self.filled, self.grads_y, self.activations = 0, None, None
        if self.filled == 0 and len(grad_y) == self.rows:  # the only call (the logits): keep, don't copy
            self.grads_y, self.activations = grad_y, a.to(grad_y.dtype)
            self.filled = self.rows
            return
        if self.grads_y is None:
            self.grads_y = grad_y.new_empty(self.rows, grad_y.shape[1])
            self.activations = grad_y.new_empty(self.rows, a.shape[1])  # in dY's (the compute) dtype
        end = self.rows - self.filled  # backwards arrive last call first: fill from the end
        self.grads_y[end - len(grad_y) : end] = grad_y
        self.activations[end - len(a) : end] = a
        self.filled += len(grad_y)

    def weight_gradient(self, dtype: torch.dtype, into: torch.Tensor | None = None) -> torch.Tensor | None:
        """`into` (the gradient the direct calls made, or None) plus the sum over the recorded calls of
        dY^T A, as one product added in place where `into` allows; None if neither exists."""
        if not self.filled:
            return into
        rows = slice(self.rows - self.filled, self.rows)
        grads_y, activations = self.grads_y[rows], self.activations[rows]
        self.activations = self.grads_y = None
        self.filled = 0  # a second backward through a retained graph records again
        if into is None:
            return (grads_y.t() @ activations).to(dtype)
        if into.requires_grad or not into.is_contiguous():
            return into + (grads_y.t() @ activations).to(into.dtype)
        # the incoming gradient is this node's alone: add into it instead of allocating a third tensor
        if into.dtype == grads_y.dtype:
            return into.addmm_(grads_y.t(), activations)
        return into.add_(grads_y.t() @ activations)


class DeferredWeightGrads:
    """One forward's deferral of the weight gradients of the calls given it (the thought steps).

    `alias(weight)` is the same tensor for every call of one forward, so that autograd runs the
    alias's backward once, after all of them. Calls given `direct()` (same aliases) compute their
    weight gradient in their own backward, and the recorded product is added into it. Create one
    per forward; it holds only the aliases and, during the backward, the (activation, dY) rows of
    the deferred calls.
    """

    def __init__(self, *, records: bool = True, aliases: dict | None = None):
        self.records = records
        self._aliases: dict[int, tuple[torch.Tensor, _Records]] = {} if aliases is None else aliases

    def direct(self) -> "DeferredWeightGrads":
        """The same aliases, for calls that make their weight gradient themselves: give it to the
        weight's first use in the forward, whose backward comes last."""
        return DeferredWeightGrads(records=False, aliases=self._aliases)

    def alias(self, weight: torch.Tensor) -> tuple[torch.Tensor, "_Records | None"]:
        """The forward's alias of `weight`, and the records of this object's calls (None: direct)."""
        entry = self._aliases.get(id(weight))
        if entry is None:
            records = _Records()
            entry = self._aliases[id(weight)] = (_WeightAlias.apply(weight, records), records)
        return entry[0], entry[1] if self.records else None


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
    if kind == "identity" and records is None:
        return F.linear(h, weight, bias)  # nothing to recompute or defer: autograd's own linear
    return _ActivationLinear.apply(h, weight, bias, kind, records)


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = cross_entropy(linear(h, weight), targets): keeps the fp32 logits (not the log-probabilities,
    their gradient and the logits' gradient besides, as autograd through F.cross_entropy does) and
    turns them into the logits' gradient in place in the backward."""

    @staticmethod
    def forward(ctx, h, weight, targets, reduction: str, records):
        logits = F.linear(h, weight)  # under autocast: in the autocast dtype
        ctx.compute = logits.dtype
        logits = logits.float()
        lse = torch.empty(len(logits), dtype=torch.float32, device=logits.device)
        chunk = max(1, LSE_CHUNK_ELEMENTS // max(1, logits.shape[1]))
        for start in range(0, len(logits), chunk):  # logsumexp's temporaries for a chunk of rows only
            torch.logsumexp(logits[start : start + chunk], dim=-1, out=lse[start : start + chunk])
        losses = lse - logits.gather(1, targets[:, None]).squeeze(1)
        ctx.save_for_backward(h, weight, targets)
        ctx.logits, ctx.lse, ctx.reduction, ctx.records = logits, lse, reduction, records
        if records is not None:
            records.reserve(len(h))
        return losses.sum() if reduction == "sum" else losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        h, weight, targets = ctx.saved_tensors
        compute = ctx.compute
        probs = ctx.logits
        if probs is None:  # a second backward through a retained graph: the first one used the logits up
            probs = F.linear(h.to(compute), weight.to(compute)).float()
        ctx.logits = None
        probs = probs.sub_(ctx.lse[:, None]).exp_()  # softmax, in the logits' own memory
        probs[torch.arange(len(targets), device=probs.device), targets] -= 1
        probs.mul_(grad_loss if ctx.reduction == "sum" else grad_loss / len(targets))
        grad_logits = probs.to(compute)
        grad_h = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_h = (grad_logits @ weight.to(compute)).to(h.dtype)
        if ctx.needs_input_grad[1]:
            if ctx.records is not None:
                ctx.records.add(h, grad_logits)
            else:
                grad_w = (grad_logits.t() @ h.to(compute)).to(weight.dtype)
        return grad_h, grad_w, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                         deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
    """`F.cross_entropy(F.linear(h, weight).float(), targets, reduction=...)` (`h` `[N, in]`, `targets`
    `[N]`) as one node that keeps a third of the memory for the logits; with `deferred` the weight
    gradient is recorded (see DeferredWeightGrads). Same results and gradients."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if h.dim() != 2 or targets.shape != h.shape[:1]:
        raise ValueError(f"linear_cross_entropy: hidden states {tuple(h.shape)} and targets {tuple(targets.shape)} "
                         "must be [N, in] and [N]")
    if not torch.is_grad_enabled() or not (h.requires_grad or weight.requires_grad):
        return F.cross_entropy(F.linear(h, weight).float(), targets, reduction=reduction)
    records = None
    if deferred is not None and weight.requires_grad:
        weight, records = deferred.alias(weight)
    return _LinearCrossEntropy.apply(h, weight, targets, reduction, records)


def embedding(ids: torch.Tensor, weight: torch.Tensor, deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
    """`F.embedding(ids, weight)`, through the forward's alias of `weight` where `deferred` is given
    (a tied LM head records its gradient there; the embedding's backward, the last, makes it)."""
    if deferred is not None and weight.requires_grad and torch.is_grad_enabled():
        weight, _ = deferred.direct().alias(weight)
    return F.embedding(ids, weight)


def linear(x: torch.Tensor, module: torch.nn.Linear, deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
    """`module(x)`, its weight gradient deferred where `deferred` is given."""
    return activation_linear(x, "identity", module.weight, module.bias, deferred)
