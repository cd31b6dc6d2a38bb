"""Deferred weight gradients for the continuous-thought steps of a training forward.

Each thought step runs every linear layer on a handful of tokens (one per sequence). Its backward
would then compute, per layer and per step, a full-size weight gradient from a few rows (a
memory-bound outer product) and add it to the others. `WeightGradBatcher` instead collects the
(input, output-gradient) rows of all the thought steps that use a weight and computes that weight's
gradient once, as one matrix product over all of them, when autograd is done with those steps.
The input and bias gradients are computed as usual, step by step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _CollectedWeightGrad(torch.autograd.Function):
    """Identity on a weight; its backward turns the rows collected by the linears that used it into
    the weight's gradient. Autograd runs it after every one of those linears' backward."""

    @staticmethod
    def forward(ctx, weight, rows: list):
        ctx.rows = rows
        ctx.set_materialize_grads(False)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, _):
        rows, ctx.rows = ctx.rows, None
        if not rows:
            return None, None
        inputs = torch.cat([x for x, _ in rows])
        grad_outputs = torch.cat([g for _, g in rows])
        return grad_outputs.t() @ inputs, None  # [out, in], contiguous


class _RowCollectingLinear(torch.autograd.Function):
    """`F.linear` whose backward returns the input and bias gradients and leaves the weight's to
    `_CollectedWeightGrad` (it records its input and output-gradient rows instead)."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows: list):
        ctx.save_for_backward(x, weight)
        ctx.rows, ctx.has_bias = rows, bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        ctx.rows.append((x, grad_out))
        grad_bias = grad_out.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_out @ weight, None, grad_bias, None


class WeightGradBatcher:
    """Hands the linears of several decoder calls (the thought steps of one training forward) proxies
    of their weights whose gradient is computed once for all of the calls.

    Pass it to `Decoder.forward(..., weight_grads=batcher)` for each such call. Inputs must be 2-D
    (`[tokens, features]`, as in the Decoder). Not for autocast: the products run in the inputs' dtype.
    """

    def __init__(self):
        self._proxies: dict[int, tuple[torch.Tensor, list]] = {}

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`F.linear(x, weight, bias)` with the weight gradient deferred (plain `F.linear` where the
        weight needs no gradient or autograd is off)."""
        if not (torch.is_grad_enabled() and weight.requires_grad):
            return F.linear(x, weight, bias)
        key = id(weight)
        if key not in self._proxies:
            rows: list = []
            self._proxies[key] = (_CollectedWeightGrad.apply(weight, rows), rows)
        proxy, rows = self._proxies[key]
        return _RowCollectingLinear.apply(x, proxy, bias, rows)
