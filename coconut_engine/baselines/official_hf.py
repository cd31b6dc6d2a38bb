"""The official Coconut multi-pass forward (facebookresearch/coconut, `coconut.py`) on the current
transformers API.

Samples are left-padded so that every first thought sits in the same column; the forward then runs
n+1 passes: the prefix up to the first thought, one pass per thought (whose input embedding is the
last hidden state of the previous position), and the rest. The KV cache is a transformers
`DynamicCache`, cropped to the pass start before each pass (the official code slices the legacy tuple
cache, which transformers 5 no longer accepts). Logits are computed over every position of every pass
and the loss is the mean cross-entropy over the label tokens, as the official code does.
It is the baseline of `coconut-engine bench`, and a parity check: same loss and gradients as the
engine's modes on the same weights.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..coconut import CoconutSample, SpecialTokens
from ..loader import TensorSlot, checkpoint_layout


class OfficialCoconutHF:
    """The official algorithm around a transformers causal LM."""

    def __init__(self, hf_model, tokens: SpecialTokens, pad_token_id: int = 0):
        self.model = hf_model
        self.tokens = tokens
        self.pad_token_id = pad_token_id

    def _padded_batch(self, samples: Sequence[CoconutSample]):
        """input ids, attention mask, position ids and labels, left-padded to align the first thoughts."""
        align = max((len(s.prompt) for s in samples if s.num_thoughts), default=0)
        pads = [align - len(s.prompt) if s.num_thoughts else 0 for s in samples]
        width = max(p + s.length for p, s in zip(pads, samples))
        ids = torch.full((len(samples), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        positions = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for b, (pad, s) in enumerate(zip(pads, samples)):
            seq = s.prompt + [self.tokens.thought] * s.num_thoughts + s.suffix
            ids[b, pad : pad + len(seq)] = torch.tensor(seq)
            mask[b, pad : pad + len(seq)] = 1
            positions[b, pad : pad + len(seq)] = torch.arange(len(seq))
            suffix_start = pad + len(s.prompt) + s.num_thoughts
            labels[b, suffix_start + 1 : suffix_start + len(s.suffix)] = torch.tensor(s.suffix[1:])
        return ids, mask, positions, labels, align

    def forward(self, samples: Sequence[CoconutSample]) -> torch.Tensor:
        """Mean token cross-entropy over the label tokens (the official multi-pass forward)."""
        from transformers import DynamicCache

        device = next(self.model.parameters()).device
        ids, mask, positions, labels, align = (t.to(device) if torch.is_tensor(t) else t
                                               for t in self._padded_batch(samples))
        embeds = self.model.get_input_embeddings()(ids)
        max_n = max(s.num_thoughts for s in samples)
        width = ids.shape[1]
        ranges = [(0, width)] if max_n == 0 else (
            [(0, align)] + [(align + k - 1, align + k) for k in range(1, max_n)] + [(align + max_n - 1, width)])
        cache = DynamicCache()
        logits = []
        for k, (start, end) in enumerate(ranges):
            excess = cache.get_seq_length() - start
            if start > 0 and excess > 0:  # slice the cache back to the pass start
                cache.crop(-excess)
            out = self.model(inputs_embeds=embeds[:, start:end], attention_mask=mask[:, :end],
                             position_ids=positions[:, start:end], past_key_values=cache if start > 0 else None,
                             use_cache=True, output_hidden_states=True)
            cache = out.past_key_values
            logits.append(out.logits)
            if k < len(ranges) - 1:  # thought k's input: the hidden state of the position before it
                rows = torch.tensor([b for b, s in enumerate(samples) if s.num_thoughts > k], device=device)
                col = align + k
                hidden = out.hidden_states[-1][rows, col - 1 - start]
                embeds = embeds.index_put((rows, torch.full_like(rows, col)), hidden)
        logits = torch.cat(logits, dim=1)
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)

    __call__ = forward


def hf_gradients_by_engine_name(hf_model, engine_config) -> dict[str, torch.Tensor]:
    """The transformers model's parameter gradients, laid out as the engine's parameters (fused q/k/v and
    gate/up, GPT-2 Conv1D transposed), for comparing gradients across the two implementations."""
    hf_params = dict(hf_model.named_parameters())
    layout: dict[str, TensorSlot] = checkpoint_layout(engine_config)
    pieces: dict[str, list[tuple[TensorSlot, torch.Tensor]]] = {}
    for name, slot in layout.items():
        param = hf_params.get(name, hf_params.get(name.removeprefix("transformer.")))
        if param is None:
            raise KeyError(f"transformers model has no parameter {name}")
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        pieces.setdefault(slot.param, []).append((slot, grad.t() if slot.transposed else grad))
    out = {}
    for param, parts in pieces.items():
        parts.sort(key=lambda p: p[0].start or 0)
        out[param] = torch.cat([g for _, g in parts]) if len(parts) > 1 else parts[0][1]
    return out  # tied LM heads share the embedding Parameter: its gradient already holds both uses
