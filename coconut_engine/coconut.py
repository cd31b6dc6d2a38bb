"""CoconutModel: continuous-thought training forward over a Decoder, in four equivalent modes.

A sample is `prompt (question + <bot>) | n thoughts | suffix (<eot> + steps + answer + eos)`. A thought's
input embedding is the final-norm hidden state of the position before it. The loss is the mean
next-token cross-entropy over the suffix tokens after its first one (question, markers and
thoughts carry no labels, as in the official code); logits are computed only there.

Modes (all the same function; `paged` is the engine's, the others are references):

- `paged`: prefill every prompt once (packed; a sample without thoughts brings its suffix along, so
  stage 0 is a single step); for t = 1..max n, one step appending a thought to every sequence that
  still has one (`append_thought`), a sequence whose last thought this is bringing its suffix along
  (the suffix's inputs are token embeddings, which do not wait for the thought's output): as many
  decoder calls as the multipass mode's passes. KV lives in a paged cache that trains through one
  store + attention autograd Function per layer and step.
- `two_pass`: thoughts step by step on the paged cache, then one no-cache forward over the whole
  sequences with the thought embeddings spliced in.
- `multipass`: the official algorithm: prompts left-padded so first thoughts align, n+1 passes over a
  contiguous cache grown by concatenation and sliced to each pass start.
- `recompute`: no cache; each thought is a full forward over everything before it.

Attention dropout (training, the model config's `attn_pdrop`) draws one seed per forward and gives
every sample its index in the caller's batch as its mask row (`DropoutMasks`): the mask of a
probability depends on (seed, sample, head, query position, key position) only, so the modes, which
split the same sequences into different steps, pages and batch orders, drop the same probabilities
and still compute the same loss and gradients.

`thought_steps` (paged and two_pass) runs more thought steps than the batch needs: a step past every
sample's chain has no rows but calls each decoder block like any other, and the last step's output,
which nothing reads, joins the backward with a zero gradient. Each block then runs its forward and
its backward 1 + thought_steps times (two_pass: + 1) whatever the samples: what FSDP2's per-block
units need on every rank (`distributed.py`). Same loss, same gradients.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .cache import AttentionBatch, ContiguousKVCache, PagedKVCache
from .linear import DeferredWeightGrads
from .model import Decoder
from .thoughts import ThoughtTransform

MODES = ("paged", "two_pass", "multipass", "recompute")
SPECIAL_TOKEN_TEXTS = ("<|start-latent|>", "<|latent|>", "<|end-latent|>")  # official names: bot, thought, eot


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the Coconut markers: `<bot>` opens the thoughts, `<thought>` is a thought's
    placeholder (and its embedding in the pause-as-thought ablation), `<eot>` closes them."""

    bot: int
    thought: int
    eot: int


@dataclass(frozen=True)
class DropoutMasks:
    """The attention dropout of one training forward: its seed (None: no attention dropout), and for each
    sample in the order the mode runs them, its mask row (its index in the caller's batch)."""

    seed: int | None
    rows: tuple[int, ...]

    def seed_for(self, batch: AttentionBatch, samples: Sequence[int]) -> int | None:
        """The decoder's `dropout_seed` for a step whose sequences are `samples` (indices in the run
        order); gives the batch those samples' mask rows."""
        if self.seed is not None:
            batch.dropout_rows = torch.tensor([self.rows[i] for i in samples], dtype=torch.int32,
                                              device=batch.cu_seqlens_q.device)
        return self.seed


NO_DROPOUT_MASKS = DropoutMasks(None, ())


@dataclass
class CoconutSample:
    """One training sample; the loss covers `suffix[1:]`, each token predicted from the one before."""

    prompt: list[int]
    num_thoughts: int
    suffix: list[int]

    def __post_init__(self):
        if not self.prompt:
            raise ValueError("CoconutSample: the prompt is empty")
        if self.num_thoughts < 0:
            raise ValueError(f"CoconutSample: num_thoughts must be >= 0, got {self.num_thoughts}")
        if len(self.suffix) < 2:
            raise ValueError("CoconutSample: the suffix needs at least 2 tokens (the loss covers suffix[1:])")

    @property
    def length(self) -> int:
        return len(self.prompt) + self.num_thoughts + len(self.suffix)


def add_special_tokens(decoder: Decoder, tokenizer, init_token: str = "<<") -> SpecialTokens:
    """Add the three Coconut tokens to `tokenizer` (if missing) and grow `decoder`'s vocabulary.

    Every marker newly added to the tokenizer gets its embedding row (and untied LM-head row) set to
    `init_token`'s, as the official code does with "<<" (the first token of its encoding, or eos if
    it has none): also when the row already existed as padding (Qwen2.5 has 151936 rows for 151665
    tokens), whose untrained values would otherwise be the markers' embeddings.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKEN_TEXTS if t not in vocab]
    tokenizer.add_tokens(missing, special_tokens=True)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKEN_TEXTS]
    if missing:
        init = (tokenizer.encode(init_token, add_special_tokens=False) or [tokenizer.eos_token_id])[0]
        if max(ids) >= decoder.config.vocab_size:
            decoder.resize_vocab(max(len(tokenizer), max(ids) + 1), init_from=init)
        decoder.copy_token_rows([tokenizer.convert_tokens_to_ids(t) for t in missing], init_from=init)
    return SpecialTokens(*ids)


# Deferred weight gradients (one product per weight for all thought steps, each gradient made at the
# backward of the weight's first use) pay where the weights are large: gpt2-6l (hidden 512) stage 6
# paged is 2-3 % faster with them and its step peak 30 % lower; on the tiny shape (hidden 64) the alias
# and record nodes cost more than the products they merge (paged 1.5-3 % slower with them, measured
# in-process, interleaved). Hidden sizes between were not measured; the threshold sits between.
DEFER_WEIGHT_GRADS_MIN_HIDDEN = 256


class CoconutModel(nn.Module):
    """A Decoder plus the continuous-thought training forward (see the module docstring for modes)."""

    def __init__(self, decoder: Decoder, tokens: SpecialTokens, page_size: int = 16,
                 defer_weight_grads: bool | None = None, thought_transform: ThoughtTransform | None = None):
        super().__init__()
        vocab = decoder.config.vocab_size
        if any(not 0 <= t < vocab for t in (tokens.bot, tokens.thought, tokens.eot)):
            raise ValueError(f"special token ids {tokens} are outside the model's vocabulary of {vocab}")
        self.decoder = decoder
        self.tokens = tokens
        self.page_size = page_size
        # None: defer where it pays, from DEFER_WEIGHT_GRADS_MIN_HIDDEN (see there)
        self.defer_weight_grads = defer_weight_grads
        self.thought_transform = thought_transform if thought_transform is not None else ThoughtTransform()
        self._cache: PagedKVCache | None = None

    @property
    def defers_weight_grads(self) -> bool:
        """Whether a training forward defers weight gradients (`linear.DeferredWeightGrads`)."""
        if self.defer_weight_grads is not None:
            return self.defer_weight_grads
        return self.decoder.config.hidden_size >= DEFER_WEIGHT_GRADS_MIN_HIDDEN

    def thought_inputs(self, hidden: torch.Tensor, index: int | Sequence[int] = 0) -> torch.Tensor:
        """The input embeddings of the thoughts that follow the positions whose last hidden states are
        `hidden` `[N, hidden]` (thought `index`, 0 = the first; one for all rows or one per row): the one
        call every mode (and generation) makes to form a thought."""
        return self.thought_transform.next_inputs(hidden, self.decoder.embed_tokens.weight, self.tokens.thought,
                                                  index)

    def forward(self, samples: Sequence[CoconutSample], mode: str = "paged", reduction: str = "mean",
                eot_loss_weight: float = 0.0, thought_steps: int | None = None) -> torch.Tensor:
        """Token cross-entropy of the batch's suffix labels: their mean, or their sum (`reduction="sum"`,
        for a trainer that divides by the label count of a larger batch).

        `eot_loss_weight > 0` adds the halting loss: in every sample with markers (prompt ending in
        `<bot>`, suffix starting with `<eot>`), at each position after which a thought or `<eot>`
        comes, the binary cross-entropy of p(`<eot>`): 1 where `<eot>` follows (after the last
        thought), 0 where another thought follows. Weighted, summed, and (for the mean) divided by the
        same label count as the token loss.

        `thought_steps` (paged and two_pass; at least the batch's longest thought chain): run that many
        thought steps, each calling every decoder block (see the module docstring; FSDP2 passes the
        count agreed by the ranks).
        """
        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        if not samples:
            raise ValueError("CoconutModel.forward: empty batch")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        if eot_loss_weight < 0:
            raise ValueError(f"eot_loss_weight must be >= 0, got {eot_loss_weight}")
        if thought_steps is not None:
            _check_thought_steps(thought_steps, mode, max(s.num_thoughts for s in samples))
        # where each weight's gradient is made (linear.DeferredWeightGrads): the tied LM head's by the
        # embedding's backward, every layer's (paged) by the prefill's
        deferred = DeferredWeightGrads() if torch.is_grad_enabled() and self.defers_weight_grads else None
        order = list(range(len(samples)))
        if mode in ("paged", "two_pass"):
            # most thoughts first: each thought step's sequences are then a prefix of the batch, whose
            # pages are consecutive equal runs (see _training_cache); the loss does not depend on order
            order.sort(key=lambda i: -samples[i].num_thoughts)
            samples = [samples[i] for i in order]
        masks = DropoutMasks(self.decoder.attention_dropout_seed(), tuple(order))
        if mode == "multipass":
            label_hidden, targets, boundary = self._multipass(samples, deferred, masks)
        else:
            prompts, suffixes = self._token_embeddings(samples, deferred)
            if mode == "paged":
                label_hidden, targets, boundary = self._paged(samples, prompts, suffixes, deferred, masks,
                                                              thought_steps)
            else:
                unread = None
                if mode == "recompute":
                    thoughts = self._thoughts_recompute(samples, prompts, masks)
                else:  # two_pass
                    cache = self._training_cache(samples)
                    _, last_hidden = self._prefill(samples, cache, prompts, masks=masks)
                    thoughts, outputs, _ = self._thoughts_paged(samples, cache, last_hidden, deferred, masks,
                                                                thought_steps)
                    unread = outputs[-1] if thought_steps else None
                label_hidden, targets, boundary = self._full_forward(samples, prompts, thoughts, suffixes, masks)
                if unread is not None:
                    label_hidden = _ZeroGradientTo.apply(label_hidden, unread)
        targets = torch.tensor(targets, device=label_hidden.device)
        if eot_loss_weight == 0:
            return self.decoder.cross_entropy(label_hidden, targets, reduction, deferred)
        loss = self.decoder.cross_entropy(label_hidden, targets, "sum", deferred)
        hidden, follows_eot = boundary(self._marked(samples))
        if hidden is not None:
            loss = loss + eot_loss_weight * self.eot_bce(hidden, follows_eot).sum()
        return loss / len(targets) if reduction == "mean" else loss

    def _marked(self, samples) -> list[bool]:
        """Which samples have the thought markers (prompt ends in `<bot>`, suffix starts with `<eot>`)."""
        return [s.prompt[-1] == self.tokens.bot and s.suffix[0] == self.tokens.eot for s in samples]

    def eot_bce(self, hidden: torch.Tensor, follows_eot: torch.Tensor) -> torch.Tensor:
        """Per row, the binary cross-entropy of p(`<eot>`) from the LM head at `hidden` against
        `follows_eot` (bool): -log p where `<eot>` follows, -log(1 - p) where a thought does."""
        logits = self.decoder.logits(hidden).float()
        total = torch.logsumexp(logits, dim=-1)
        eot = logits[:, self.tokens.eot]
        not_eot = torch.logsumexp(logits.index_fill(1, torch.tensor([self.tokens.eot], device=logits.device),
                                                    float("-inf")), dim=-1)
        return total - torch.where(follows_eot, eot, not_eot)

    def _token_embeddings(self, samples, deferred: DeferredWeightGrads | None = None
                          ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Each sample's prompt and suffix embeddings, from one embedding call (one sparse-to-dense
        embedding backward instead of one per step)."""
        ids = [t for s in samples for t in s.prompt] + [t for s in samples for t in s.suffix]
        embeds = self.decoder.embed(torch.tensor(ids, device=self.decoder.embed_tokens.weight.device), deferred)
        lens = [len(s.prompt) for s in samples] + [len(s.suffix) for s in samples]
        parts = list(embeds.split(lens))
        return parts[: len(samples)], parts[len(samples):]

    # -- the paged path -------------------------------------------------------------------------

    def _training_cache(self, samples: Sequence[CoconutSample]) -> PagedKVCache:
        """The reusable training cache (grown when a batch needs more pages than it has), with sample i
        as sequence i and every sequence given the same number of pages up front, in order: row b's
        pages are then `b * pages_per_row + [0, 1, ..]`, so that the torch backend reads each step's
        K/V as a view of the pool instead of gathering pages."""
        cfg = self.decoder.config
        pages_per_row = max(-(-s.length // self.page_size) for s in samples)
        pages = pages_per_row * len(samples)
        weight = self.decoder.embed_tokens.weight
        dtype = torch.get_autocast_dtype(weight.device.type) if torch.is_autocast_enabled(weight.device.type) else weight.dtype
        needs_gradients = torch.is_grad_enabled()  # a no-grad pass (validation) needs no gradient pages
        cache = self._cache
        if cache is not None and (cache.kv.dtype != dtype or cache.device != weight.device
                                  or (needs_gradients and not cache.tracks_gradients)
                                  # inference tensors can only be written inside inference_mode
                                  or (cache.kv.is_inference() and not torch.is_inference_mode_enabled())):
            # a new dtype or device (a bf16 training step after an fp32 validation pass), a training step
            # after a pool made without gradient pages, or a pool of inference tensors outside
            # inference_mode starts a new pool at this batch's size (growing from the other pool's size
            # compounded 1.25x per dtype switch)
            self._cache = cache = None
        if cache is None or cache.num_pages < pages:
            grown = pages if cache is None else max(pages, int(1.25 * cache.num_pages))  # grow geometrically
            # drop this model's reference before allocating: the old pool is freed here unless a graph
            # still alive (a caller's unreleased loss) holds its views
            self._cache = cache = None
            cache = PagedKVCache(cfg, num_pages=grown, page_size=self.page_size, dtype=dtype, device=weight.device,
                                 requires_grad=needs_gradients)
            self._cache = cache
        if cache.tracks_gradients:
            cache.begin_training_step()
        else:
            cache.reset()
        for i in range(len(samples)):
            cache.add_sequence(i)
            cache.reserve(i, pages_per_row * self.page_size)
        return cache

    def _paged(self, samples, prompts: list[torch.Tensor], suffixes: list[torch.Tensor],
               deferred: DeferredWeightGrads | None = None, masks: DropoutMasks = NO_DROPOUT_MASKS,
               thought_steps: int | None = None):
        """The engine's mode: prefill, one step per thought; hidden states and targets of the labels.

        A sample's suffix rides in its last step: the prefill for a sample without thoughts (at stage
        0 the whole batch is one step), else the step of its last thought (its suffix's inputs are
        token embeddings, known before the thought's output). The later steps record their weight
        gradients into `deferred` and the prefill, whose backward comes last, makes each layer's: one
        weight-sized gradient per layer, made when the prefill's activations of the layers above have
        been freed, instead of all of them made by the last step's backward and held until the prefill's.

        With `thought_steps` the steps past every chain have no rows and the last step's output joins
        the backward.
        """
        cache = self._training_cache(samples)
        with_suffix = [not s.num_thoughts for s in samples]
        hidden, last_hidden = self._prefill(samples, cache, prompts, [suf if w else None for w, suf in
                                                                       zip(with_suffix, suffixes)],
                                            deferred.direct() if deferred is not None else None, masks)
        label_rows, targets, start = [], [], 0
        for s, w in zip(samples, with_suffix):
            if w:
                label_rows.extend(range(start + len(s.prompt), start + len(s.prompt) + len(s.suffix) - 1))
                targets.extend(s.suffix[1:])
            start += len(s.prompt) + (len(s.suffix) if w else 0)
        parts = [hidden[torch.tensor(label_rows, device=hidden.device)]] if label_rows else []
        steps = [last_hidden]
        num_steps = max(s.num_thoughts for s in samples) if thought_steps is None else thought_steps
        if num_steps:
            _, outputs, labels = self._thoughts_paged(samples, cache, last_hidden, deferred, masks, num_steps,
                                                      suffixes)
            steps.extend(outputs)
            for part, part_targets in labels:
                parts.append(part)
                targets.extend(part_targets)
        # step t's outputs are those of the samples with >= t thoughts: a prefix of the (sorted) batch
        offsets = list(itertools.accumulate((len(x) for x in steps[:-1]), initial=0))
        label_hidden = torch.cat(parts)
        if thought_steps:
            label_hidden = _ZeroGradientTo.apply(label_hidden, steps[-1])
        return label_hidden, targets, _boundary(samples, lambda i, t: offsets[t] + i, lambda: torch.cat(steps))

    def _prefill(self, samples, cache: PagedKVCache, prompts: list[torch.Tensor],
                 suffixes: Sequence[torch.Tensor | None] | None = None,
                 deferred: DeferredWeightGrads | None = None, masks: DropoutMasks = NO_DROPOUT_MASKS
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """All prompts (each followed by `suffixes[i]` where given) in one packed step; returns the
        step's hidden states and each prompt's last hidden state `[B, hidden]`."""
        suffixes = suffixes or [None] * len(samples)
        chunks = [p if suf is None else torch.cat([p, suf]) for p, suf in zip(prompts, suffixes)]
        lens = [len(c) for c in chunks]
        batch = cache.prepare(list(range(len(samples))), lens)
        hidden = self.decoder(batch, inputs_embeds=torch.cat(chunks), cache=cache, deferred_weight_grads=deferred,
                              dropout_seed=masks.seed_for(batch, range(len(samples))))
        starts = itertools.accumulate(lens[:-1], initial=0)
        last_prompt = [start + len(s.prompt) - 1 for start, s in zip(starts, samples)]
        return hidden, hidden[torch.tensor(last_prompt, device=hidden.device)]

    def append_thought(self, cache: PagedKVCache, seq_ids: Sequence[int], last_hidden: torch.Tensor,
                       deferred: DeferredWeightGrads | None = None, masks: DropoutMasks = NO_DROPOUT_MASKS,
                       suffixes: Sequence[torch.Tensor | None] | None = None) -> torch.Tensor:
        """One continuous-thought step: each sequence's last hidden state becomes its next input.

        One decoder call for all of `seq_ids`; returns their new last hidden states. The thought
        steps of one training forward share `deferred`: their weight gradients are then one product
        per weight instead of one per step, and `masks`, their attention dropout (whose mask rows
        the sequence ids index).

        With `suffixes` (per sequence: None, or the input embeddings `[n, hidden]` of the tokens that
        follow its thought, for a sequence whose last thought this is), those tokens ride in the same
        step, right after the thought; the result is then the hidden states of every new token,
        packed by sequence (the thought's row first).
        """
        if suffixes is None or all(suffix is None for suffix in suffixes):
            batch = cache.prepare(seq_ids, [1] * len(seq_ids))
        else:
            rows = last_hidden.split(1)
            last_hidden = torch.cat([part for row, suffix in zip(rows, suffixes)
                                     for part in ((row,) if suffix is None else (row, suffix))])
            batch = cache.prepare(seq_ids, [1 + (0 if suffix is None else len(suffix)) for suffix in suffixes])
        return self.decoder(batch, inputs_embeds=last_hidden, cache=cache, deferred_weight_grads=deferred,
                            dropout_seed=masks.seed_for(batch, seq_ids))

    def _thoughts_paged(self, samples, cache: PagedKVCache, last: torch.Tensor,
                        deferred: DeferredWeightGrads | None = None, masks: DropoutMasks = NO_DROPOUT_MASKS,
                        steps: int | None = None, suffixes: Sequence[torch.Tensor] | None = None):
        """Run every thought step (`steps` of them where given; those past every chain have no rows);
        returns each sample's thought input embeddings (not detached), each step's new last hidden
        states (of the samples with at least that many thoughts), and, with `suffixes` (each sample's
        suffix embeddings, the paged mode), the (hidden states, targets) of the labels of the suffixes,
        each of which rides in the step of its sample's last thought (`append_thought`)."""
        thoughts: list[list[torch.Tensor]] = [[] for _ in samples]
        outputs, labels = [], []
        for t in range(1, (max(s.num_thoughts for s in samples) if steps is None else steps) + 1):
            active = [i for i, s in enumerate(samples) if s.num_thoughts >= t]
            every = len(active) == len(samples)  # no rows to pick or put back (no index ops, no index nodes)
            index = None if every else torch.tensor(active, dtype=torch.long, device=last.device)
            inputs = self.thought_inputs(last if every else last[index], t - 1)
            for row, i in enumerate(active):
                thoughts[i].append(inputs[row])
            ending = [suffixes is not None and samples[i].num_thoughts == t for i in active]
            if not any(ending):
                outputs.append(self.append_thought(cache, active, inputs, deferred, masks))
            else:
                hidden = self.append_thought(cache, active, inputs, deferred, masks,
                                             [suffixes[i] if end else None for i, end in zip(active, ending)])
                thought_rows, label_rows, step_targets, start = [], [], [], 0
                for i, end in zip(active, ending):
                    thought_rows.append(start)
                    if end:  # its suffix follows the thought: rows start + 1 .. start + len(suffix)
                        label_rows.extend(range(start + 1, start + len(samples[i].suffix)))
                        step_targets.extend(samples[i].suffix[1:])
                    start += 1 + (len(samples[i].suffix) if end else 0)
                outputs.append(hidden[torch.tensor(thought_rows, device=hidden.device)])
                labels.append((hidden[torch.tensor(label_rows, device=hidden.device)], step_targets))
            last = outputs[-1] if every else last.index_copy(0, index, outputs[-1])
        return thoughts, outputs, labels

    # -- the no-cache references ---------------------------------------------------------------

    @staticmethod
    def _splice(prompts, thoughts, suffixes=None) -> torch.Tensor:
        """Packed input embeddings `prompt | thoughts | suffix` with the thought embeddings spliced in."""
        parts = []
        for i, (prompt, th) in enumerate(zip(prompts, thoughts)):
            parts.append(prompt)
            if th:
                parts.append(torch.stack(th))
            if suffixes is not None:
                parts.append(suffixes[i])
        return torch.cat(parts)

    def _thoughts_recompute(self, samples, prompts, masks: DropoutMasks = NO_DROPOUT_MASKS
                            ) -> list[list[torch.Tensor]]:
        thoughts: list[list[torch.Tensor]] = [[] for _ in samples]
        for t in range(1, max(s.num_thoughts for s in samples) + 1):
            active = [i for i, s in enumerate(samples) if s.num_thoughts >= t]
            embeds = self._splice([prompts[i] for i in active], [thoughts[i] for i in active])
            lens = [len(samples[i].prompt) + t - 1 for i in active]
            batch = AttentionBatch.packed(lens, device=embeds.device)
            hidden = self.decoder(batch, inputs_embeds=embeds, dropout_seed=masks.seed_for(batch, active))
            inputs = self.thought_inputs(hidden[batch.last_token_indices()], t - 1)
            for row, i in enumerate(active):
                thoughts[i].append(inputs[row])
        return thoughts

    def _full_forward(self, samples, prompts, thoughts, suffixes, masks: DropoutMasks = NO_DROPOUT_MASKS):
        """One no-cache forward over whole sequences; hidden states and targets of the labels."""
        embeds = self._splice(prompts, thoughts, suffixes)
        batch = AttentionBatch.packed([s.length for s in samples], device=embeds.device)
        hidden = self.decoder(batch, inputs_embeds=embeds, dropout_seed=masks.seed_for(batch, range(len(samples))))
        rows, targets, starts, start = [], [], [], 0
        for s in samples:
            suffix_start = start + len(s.prompt) + s.num_thoughts
            rows.extend(range(suffix_start, suffix_start + len(s.suffix) - 1))
            targets.extend(s.suffix[1:])
            starts.append(start)
            start += s.length
        return (hidden[torch.tensor(rows, device=embeds.device)], targets,
                _boundary(samples, lambda i, t: starts[i] + len(samples[i].prompt) - 1 + t, lambda: hidden))

    # -- the official multi-pass algorithm ----------------------------------------------------

    def _multipass(self, samples, deferred: DeferredWeightGrads | None = None,
                   masks: DropoutMasks = NO_DROPOUT_MASKS):
        """Left-pad so every first thought sits at column `align`; n+1 passes over a contiguous cache."""
        device = self.decoder.embed_tokens.weight.device
        max_n = max(s.num_thoughts for s in samples)
        align = max((len(s.prompt) for s in samples if s.num_thoughts), default=0)
        pads = [align - len(s.prompt) if s.num_thoughts else 0 for s in samples]
        width = max(p + s.length for p, s in zip(pads, samples))
        num = len(samples)
        ids = torch.zeros(num, width, dtype=torch.long)
        real = torch.zeros(num, width, dtype=torch.bool)
        positions = torch.zeros(num, width, dtype=torch.long)
        for b, (pad, s) in enumerate(zip(pads, samples)):
            seq = s.prompt + [self.tokens.thought] * s.num_thoughts + s.suffix
            ids[b, pad : pad + len(seq)] = torch.tensor(seq)
            real[b, pad : pad + len(seq)] = True
            positions[b, pad : pad + len(seq)] = torch.arange(len(seq))
        ids, real, positions = ids.to(device), real.to(device), positions.to(device)
        embeds = self.decoder.embed(ids, deferred)
        ranges = [(0, width)] if max_n == 0 else (
            [(0, align)] + [(align + k - 1, align + k) for k in range(1, max_n)] + [(align + max_n - 1, width)])
        cache = ContiguousKVCache(self.decoder.config.num_layers)
        cache.key_padding = real
        cache.key_positions = positions
        passes = []
        for k, (start, end) in enumerate(ranges):
            cache.crop(start)
            n = end - start
            batch = AttentionBatch(
                cu_seqlens_q=torch.arange(0, num * n + 1, n, dtype=torch.int32, device=device),
                seq_lens_k=torch.full((num,), end, dtype=torch.int32, device=device),
                block_table=torch.zeros((num, 0), dtype=torch.int32, device=device),
                slot_mapping=torch.full((num * n,), -1, dtype=torch.int64, device=device),
                positions=positions[:, start:end].reshape(-1), max_seqlen_q=n, max_seqlen_k=end,
                q_lens=(n,) * num, k_lens=(end,) * num)
            hidden = self.decoder(batch, inputs_embeds=embeds[:, start:end].reshape(num * n, -1), cache=cache,
                                  dropout_seed=masks.seed_for(batch, range(num)))
            passes.append(hidden.view(num, n, -1))
            if k < len(ranges) - 1:  # fill thought k: the hidden state of the position before it
                fill = [b for b, s in enumerate(samples) if s.num_thoughts > k]
                b_idx = torch.tensor(fill, device=device)
                col = align + k
                # in the embeddings' dtype: under autocast a learned transform returns bf16/fp16 (the
                # other modes take it as it is: the decoder and torch.cat accept mixed dtypes)
                embeds = embeds.index_put((b_idx, torch.full_like(b_idx, col)),
                                          self.thought_inputs(passes[-1][b_idx, col - 1 - start], k).to(embeds.dtype))
        hidden = torch.cat(passes, dim=1)
        rows, targets = [], []
        for b, (pad, s) in enumerate(zip(pads, samples)):
            suffix_start = pad + len(s.prompt) + s.num_thoughts
            rows.extend(b * width + c for c in range(suffix_start, suffix_start + len(s.suffix) - 1))
            targets.extend(s.suffix[1:])
        hidden = hidden.reshape(num * width, -1)
        return (hidden[torch.tensor(rows, device=device)], targets,
                _boundary(samples, lambda i, t: i * width + pads[i] + len(samples[i].prompt) - 1 + t, lambda: hidden))


def _check_thought_steps(thought_steps, mode: str, longest: int) -> None:
    if mode not in ("paged", "two_pass"):
        raise ValueError(f"thought_steps is for the paged and two_pass modes, not {mode!r}")
    if not isinstance(thought_steps, int) or isinstance(thought_steps, bool) or thought_steps < longest:
        raise ValueError(f"thought_steps={thought_steps!r}: must be an integer >= the batch's longest thought "
                         f"chain ({longest})")


class _ZeroGradientTo(torch.autograd.Function):
    """`x` itself; `unread` gets a zero gradient: a step's output that nothing reads still runs its
    backward (FSDP2 all-gathers a block's parameters for a call's backward when the call's output
    gets a gradient; without one the backward would read freed parameters)."""

    @staticmethod
    def forward(ctx, x, unread):
        ctx.unread = (unread.shape, unread.dtype, unread.device)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        shape, dtype, device = ctx.unread
        return grad, torch.zeros(shape, dtype=dtype, device=device)


def _boundary(samples, row_of, source):
    """The halting loss's positions, computed only when asked: a function of the samples' marker flags
    returning the hidden states after which a thought or `<eot>` comes (row `row_of(i, t)` of `source()`
    for sample i and t = 0..its thoughts) and whether `<eot>` comes (t = its thoughts)."""

    def rows(marked: list[bool]):
        index, follows_eot = [], []
        for i, (s, m) in enumerate(zip(samples, marked)):
            if m:
                index.extend(row_of(i, t) for t in range(s.num_thoughts + 1))
                follows_eot.extend(t == s.num_thoughts for t in range(s.num_thoughts + 1))
        if not index:
            return None, None
        hidden = source()
        return (hidden[torch.tensor(index, device=hidden.device)],
                torch.tensor(follows_eot, device=hidden.device))

    return rows
