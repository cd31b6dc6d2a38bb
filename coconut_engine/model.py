"""Decoder: one decoder-only transformer whose blocks are configured by ModelConfig.

GPT-2 (LayerNorm, learned positions, GELU MLP), Llama / Mistral (RMSNorm, RoPE, SwiGLU, GQA), Qwen2
(+ q/k/v biases) and Qwen3 (+ per-head q/k RMSNorm) are the same module tree with different
settings. The forward takes packed tokens (`[T]` ids or `[T, hidden]` embeddings) and one
AttentionBatch for the step; every layer's attention goes through `attention.attention`, which
writes to and reads from the paged cache when one is given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import attention, resolve_backend
from .cache import AttentionBatch
from .config import ModelConfig
from .kernels.dropout import AttentionDropout, layer_seed
from .linear import DeferredWeightGrads, activation_linear, embedding, linear, linear_cross_entropy


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, as the Llama family does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def make_norm(config: ModelConfig, dim: int) -> nn.Module:
    if config.norm == "layernorm":
        return nn.LayerNorm(dim, eps=config.norm_eps)
    return RMSNorm(dim, config.norm_eps)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE, with linear or llama3 scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind == "llama3":
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class Rotary(nn.Module):
    """cos/sin tables for the step's positions, computed once per forward and shared by all layers."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Fused q/k/v projection, optional q/k norm and RoPE, the attention call, output projection."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.config = config
        self.layer = layer
        self.qkv_proj = nn.Linear(config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias)
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(self, x, batch: AttentionBatch, rope, backend: str, cache,
                deferred: DeferredWeightGrads | None = None, dropout: AttentionDropout | None = None) -> torch.Tensor:
        cfg = self.config
        qkv = linear(x, self.qkv_proj, deferred)
        q, k, v = qkv.split((cfg.q_size, cfg.kv_size, cfg.kv_size), dim=-1)
        q = q.view(-1, cfg.num_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_kv_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = attention(q, k, v, batch, cfg.attention_scale, backend, cache, self.layer, dropout)
        return linear(out.reshape(x.shape[0], cfg.q_size), self.o_proj, deferred)


class MLP(nn.Module):
    """GELU MLP (GPT-2) or SwiGLU (Llama family, gate and up projections fused)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        hidden, inner = config.hidden_size, config.intermediate_size
        if self.kind == "swiglu":
            self.gate_up_proj = nn.Linear(hidden, 2 * inner, bias=config.mlp_bias)
            self.down_proj = nn.Linear(inner, hidden, bias=config.mlp_bias)
        else:
            self.fc_in = nn.Linear(hidden, inner, bias=config.mlp_bias)
            self.fc_out = nn.Linear(inner, hidden, bias=config.mlp_bias)

    def forward(self, x: torch.Tensor, deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
        up, down = (self.gate_up_proj, self.down_proj) if self.kind == "swiglu" else (self.fc_in, self.fc_out)
        # the activation is recomputed in the backward (linear.py): half the MLP's saved memory
        return activation_linear(linear(x, up, deferred), self.kind, down.weight, down.bias, deferred)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = make_norm(config, config.hidden_size)
        self.attn = Attention(config, layer)
        self.mlp_norm = make_norm(config, config.hidden_size)
        self.mlp = MLP(config)

    def forward(self, x, batch, rope, backend, cache, deferred=None, resid_dropout: float = 0.0,
                attn_dropout: AttentionDropout | None = None):
        x = x + _dropout(self.attn(self.attn_norm(x), batch, rope, backend, cache, deferred, attn_dropout),
                         resid_dropout)
        return x + _dropout(self.mlp(self.mlp_norm(x), deferred), resid_dropout)


def _dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    return F.dropout(x, p) if p > 0.0 else x


@dataclass
class DropoutRates:
    """Dropout probabilities applied in training mode (GPT-2's embd_pdrop / resid_pdrop / attn_pdrop).

    `attn` drops attention probabilities in every attention path with a mask that is a function of
    (seed, sequence, head, query position, key position) (`kernels/dropout.py`)."""

    embd: float = 0.0
    resid: float = 0.0
    attn: float = 0.0

    @classmethod
    def of(cls, config: ModelConfig) -> "DropoutRates":
        return cls(config.embd_dropout, config.resid_dropout, config.attn_dropout)


class Decoder(nn.Module):
    """A decoder-only LM over packed tokens; `forward` returns final-norm hidden states, `logits` the LM head."""

    def __init__(self, config: ModelConfig, attention_backend: str = "auto"):
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend
        self.dropout = DropoutRates.of(config)  # used in training mode only (`.train()`)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.positions == "learned":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        else:
            self.rotary = Rotary(config)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_norm = make_norm(config, config.hidden_size)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def reset_buffers(self) -> None:
        """Recompute non-persistent buffers (after `to_empty`)."""
        if self.config.positions == "rope":
            self.rotary.reset_buffers()

    def forward(
        self,
        batch: AttentionBatch,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache=None,
        deferred_weight_grads: DeferredWeightGrads | None = None,
        dropout_seed: int | None = None,
    ) -> torch.Tensor:
        """Final-norm hidden states `[T, hidden]` of the step's packed tokens.

        Exactly one of `input_ids` (`[T]`) and `inputs_embeds` (`[T, hidden]`, e.g. continuous
        thoughts) is given. With `cache`, each layer stores the new K/V at `batch.slot_mapping`
        and attends over the sequence's pages. With `deferred_weight_grads` (the steps of a paged
        training forward share one), the linear layers' weight gradients of this call are recorded
        and computed together with those of the other calls given it, or, given its `direct()`,
        made here and the others added in (`linear.DeferredWeightGrads`).

        In training mode with gradients, dropout applies (`self.dropout`); attention dropout draws its
        masks from `dropout_seed` (the seed of the training forward this call is a step of, see
        `attention_dropout_seed`; None draws one) and the batch's `mask_rows()`.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Decoder.forward takes exactly one of input_ids and inputs_embeds")
        x = self.embed(input_ids, deferred_weight_grads) if inputs_embeds is None else inputs_embeds
        if x.shape[0] != batch.num_tokens:
            raise ValueError(f"Decoder.forward: {x.shape[0]} tokens but the AttentionBatch has {batch.num_tokens}")
        if self.config.positions == "learned":
            x = x + self.embed_positions(batch.positions)
            rope = None
        else:
            rope = self.rotary(batch.positions, x.dtype)
        # dropout regularises training only: eval mode and forwards without gradients (generation) skip it
        dropping = self.training and torch.is_grad_enabled()
        embd_p, resid_p = (self.dropout.embd, self.dropout.resid) if dropping else (0.0, 0.0)
        x = _dropout(x, embd_p)
        attn_seed = None
        if dropping and self.dropout.attn > 0:
            attn_seed = self.attention_dropout_seed() if dropout_seed is None else dropout_seed
        backend = resolve_backend(self.attention_backend, x.device)
        for i, block in enumerate(self.layers):
            attn_dropout = None if attn_seed is None else AttentionDropout(self.dropout.attn, layer_seed(attn_seed, i),
                                                                           batch.mask_rows())
            x = block(x, batch, rope, backend, cache, deferred_weight_grads, resid_p, attn_dropout)
        return self.final_norm(x)

    def attention_dropout_seed(self) -> int | None:
        """A seed for the attention-dropout masks of one training forward, drawn from torch's (CPU)
        generator, as the other dropouts' masks are (so a seeded run repeats, and DDP ranks, seeded
        apart, differ); None where no attention dropout applies (eval mode, no gradients, p = 0)."""
        if not (self.training and torch.is_grad_enabled() and self.dropout.attn > 0):
            return None
        return int(torch.randint(0, 1 << 32, (), dtype=torch.int64))

    def resize_vocab(self, vocab_size: int, init_from: int) -> None:
        """Grow the vocabulary to `vocab_size`; new embedding (and untied LM-head) rows copy row `init_from`."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"resize_vocab: cannot shrink the vocabulary from {old} to {vocab_size}")
        if not 0 <= init_from < old:
            raise ValueError(f"resize_vocab: init_from={init_from} is not a token id of the current vocabulary")
        if vocab_size == old:
            return

        def grown(weight: torch.Tensor) -> nn.Parameter:
            new = weight.detach().new_empty((vocab_size, weight.shape[1]))
            new[:old] = weight.detach()
            new[old:] = weight.detach()[init_from]
            return nn.Parameter(new, requires_grad=weight.requires_grad)

        self.embed_tokens.weight = grown(self.embed_tokens.weight)
        self.embed_tokens.num_embeddings = vocab_size
        if not self.config.tie_word_embeddings:
            self.lm_head.weight = grown(self.lm_head.weight)
            self.lm_head.out_features = vocab_size
        self.config = self.config.with_vocab_size(vocab_size)
        for module in self.modules():
            if hasattr(module, "config") and module is not self:
                module.config = self.config

    def copy_token_rows(self, token_ids: list[int], init_from: int) -> None:
        """Set the embedding rows (and untied LM-head rows) of `token_ids` to row `init_from`'s."""
        vocab = self.config.vocab_size
        bad = [t for t in [*token_ids, init_from] if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"copy_token_rows: token ids {bad} are outside the vocabulary of {vocab}")
        index = torch.tensor(token_ids, device=self.embed_tokens.weight.device)
        with torch.no_grad():
            for weight in {id(w): w for w in (self.embed_tokens.weight, self.lm_head_weight)}.values():
                weight[index] = weight[init_from].clone()

    def embed(self, input_ids: torch.Tensor, deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
        """Token embeddings `[T, hidden]`. A training forward passes the `deferred` its `cross_entropy`
        gets: a tied LM head's gradient is then made once, by the embedding's backward."""
        return embedding(input_ids, self.embed_tokens.weight, deferred)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM-head logits of the given hidden states (only where they are needed)."""
        weight = self.lm_head_weight
        if torch.is_grad_enabled() and weight.requires_grad:
            # (W h^T)^T: the weight's gradient comes out contiguous, so autograd adds the tied
            # embedding's gradient into it in place instead of allocating a third vocab x hidden tensor
            return (weight @ hidden.t()).t()
        return F.linear(hidden, weight)

    def cross_entropy(self, hidden: torch.Tensor, targets: torch.Tensor, reduction: str = "mean",
                      deferred: DeferredWeightGrads | None = None) -> torch.Tensor:
        """Next-token cross-entropy of the LM head at the given hidden states (`[N, hidden]`, targets `[N]`).

        One node for head and loss (`linear.linear_cross_entropy`): it keeps the fp32 logits alone and
        turns them into their gradient in place. With `deferred` (the one `embed` got in the same
        forward) the head's weight gradient is recorded, not made: the loss is the last op, so autograd
        would make that vocab x hidden gradient first and, the head being tied to the embedding whose
        backward comes last, hold it through the whole backward, beside every activation.
        """
        return linear_cross_entropy(hidden, self.lm_head_weight, targets, reduction, deferred)
