"""What a continuous thought is close to: the nearest vocabulary tokens of each thought's input vector
through the LM head (the paper's analysis of ProsQA thoughts as a superposition of frontier nodes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .cache import PagedKVCache
from .coconut import CoconutModel, SpecialTokens
from .model import Decoder
from .thoughts import ThoughtTransform


@dataclass(frozen=True)
class NearestTokens:
    """The `top` tokens nearest to one thought, with their probabilities under the LM head."""

    thought: int  # 1 = the first thought
    tokens: tuple[str, ...]
    probs: tuple[float, ...]

    def __str__(self) -> str:
        return f"thought {self.thought}: " + ", ".join(f"{t!r} {p:.2f}" for t, p in zip(self.tokens, self.probs))


@torch.no_grad()
def nearest_tokens_of_thoughts(decoder: Decoder, tokenizer, tokens: SpecialTokens, question: str, num_thoughts: int,
                               top: int = 3, page_size: int = 16,
                               thought_transform: ThoughtTransform | None = None) -> list[NearestTokens]:
    """Run `question + "\\n" <bot>` and `num_thoughts` thoughts on a paged cache (the training thought
    step, `CoconutModel.append_thought`), and decode each thought's input vector through the LM head.

    `thought_transform`: what the model feeds back (a checkpoint's: `ScoringSetup.thought_transform`,
    `checkpoint.checkpoint_thought_transform`); default the identity. Each thought's input is the
    transform of the hidden state before it, as in training and generation (the same vectors as
    `Generator.generate(..., return_thoughts=True)`'s `top_tokens`)."""
    prompt = tokenizer.encode(question + "\n", add_special_tokens=False) + [tokens.bot]
    device = decoder.embed_tokens.weight.device
    pages = -(-(len(prompt) + num_thoughts) // page_size)
    cache = PagedKVCache(decoder.config, num_pages=pages, page_size=page_size, dtype=decoder.embed_tokens.weight.dtype,
                         device=device)
    cache.add_sequence(0)
    was_training = decoder.training
    decoder.eval()
    try:
        hidden = decoder(cache.prepare([0], [len(prompt)]), input_ids=torch.tensor(prompt, device=device), cache=cache)
        last = hidden[-1:]
        coconut = CoconutModel(decoder, tokens, page_size=page_size, thought_transform=thought_transform)
        found = []
        for t in range(1, num_thoughts + 1):
            inputs = coconut.thought_inputs(last, t - 1)
            probs = torch.softmax(decoder.logits(inputs).float(), dim=-1)[0]
            values, ids = probs.topk(top)
            found.append(NearestTokens(t, tuple(tokenizer.decode([i]) for i in ids.tolist()),
                                       tuple(values.tolist())))
            last = coconut.append_thought(cache, [0], inputs)
    finally:
        decoder.train(was_training)
    return found
