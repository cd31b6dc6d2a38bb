"""Batched generation with continuous thoughts on the paged KV cache.

Every step is one Decoder call over a packed batch in which each running sequence contributes what
it needs next: its prompt (admission), one continuous thought (its last hidden state fed back;
the last one followed by `<eot>` in the same step), `<eot>` (adaptive thinking that stops early),
or its last sampled token. So prefill, thought steps and decoding share one code path and
a batch may mix them (continuous batching). Requests that do not fit in the page pool wait in a
queue and are admitted as finished sequences free their pages; results come back in request order.

Sampling is seeded per request (from `seed` and the sample index, not the batch position), so a
result does not depend on what else is in the batch. `n > 1` forks a request after its prompt and
thoughts (which are deterministic), so the copies share those pages.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .cache import AttentionBatch, PagedKVCache
from .coconut import SPECIAL_TOKEN_TEXTS, CoconutModel, SpecialTokens
from .errors import InvalidArgumentError
from .model import Decoder
from .thoughts import ThoughtTransform
from .validation import check_float, check_sampling, is_integer, unicode_problem


@dataclass
class GenerationResult:
    """One generated sample."""

    text: str | None  # decoded new tokens (None without a tokenizer), cut before a stop string
    token_ids: list[int]  # new tokens (after <eot> when there were thoughts)
    finish_reason: str  # "eos" | "stop" | "length" | "error"
    prompt_tokens: int
    num_thoughts: int
    error: str | None = None
    thoughts: list["ThoughtTrace"] | None = None  # with generate(..., return_thoughts=True)

    @property
    def generated_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class ThoughtTrace:
    """What one continuous thought holds (`generate(..., return_thoughts=True)`).

    `norm`: the L2 norm of the thought's input vector (after the thought transform). `top_tokens`:
    its nearest tokens through the LM head, `(token id, text or None, probability)` of the softmax of
    the LM head applied to that vector, most probable first. `p_eot`: the model's probability of
    `<eot>` at the position the thought fills (from the hidden state before it), the quantity
    adaptive thinking (`num_thoughts="auto"`) compares with its threshold.
    """

    norm: float
    top_tokens: list[tuple[int, str | None, float]]
    p_eot: float


@dataclass
class _Seq:
    """A running sample: what it feeds next, and what it has produced."""

    key: tuple[int, int]  # (request index, sample index)
    prompt_tokens: int
    max_thoughts: int  # the thought count (fixed), or its upper bound (adaptive)
    adaptive: bool  # leaves the thought phase when p(<eot>) exceeds the threshold
    thinking: bool  # the next step's input is a thought or <eot>, decided from this step's output
    generator: torch.Generator
    pending: list[int] = field(default_factory=list)  # token inputs of the next step (after its thought, if any)
    thought: torch.Tensor | None = None  # thought input embedding of the next step (its first row)
    thoughts_done: int = 0
    markers: bool = True  # <eot> follows the last thought (thought_markers)
    out: list[int] = field(default_factory=list)
    forks: int = 0  # copies to fork off once the shared part (prompt + thoughts) is computed
    trace: list[ThoughtTrace] | None = None


@dataclass
class _Request:
    index: int
    prompt: list[int]
    max_thoughts: int
    adaptive: bool
    thinking: bool  # thoughts follow the prompt (which ends with <bot> where there are markers)
    markers: bool  # <bot> ends the prompt and <eot> follows the last thought
    pages: int  # pages reserved for the request's whole life, all samples included
    tokens: int  # the most tokens one sample can hold: its pages are reserved as one run at admission


@dataclass(frozen=True)
class _Params:
    """The sampling and stopping settings of one `generate` call."""

    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_ids: frozenset
    stop_texts: tuple
    seed: int
    n: int
    max_thoughts: int = 8
    eot_threshold: float = 0.5
    return_thoughts: bool = False
    thought_top_k: int = 5


class Generator:
    """Serve many prompts at once on a paged KV cache (see the module docstring)."""

    def __init__(self, model: Decoder | CoconutModel, tokenizer=None, max_pages: int = 1024, page_size: int = 16,
                 special_tokens: SpecialTokens | None = None, allow_long_context: bool = False,
                 thought_transform: ThoughtTransform | None = None):
        """`allow_long_context`: let a RoPE model run past `max_position_embeddings` (its trained
        length); without it such a request is an error. Learned positions never allow it.
        `thought_transform`: what a thought feeds back (default: a CoconutModel's, else the identity)."""
        base = getattr(model, "_orig_mod", model)  # torch.compile's wrapper passes attributes through: keep it
        if not isinstance(base, (Decoder, CoconutModel)):
            raise InvalidArgumentError(f"model must be a Decoder (coconut_engine.loader.load_model) or a CoconutModel, "
                                       f"got {type(model).__name__}")
        if tokenizer is not None and not all(callable(getattr(tokenizer, m, None)) for m in ("encode", "decode")):
            raise InvalidArgumentError(f"tokenizer must have encode/decode (a transformers tokenizer), got "
                                       f"{type(tokenizer).__name__}")
        if isinstance(base, CoconutModel):
            special_tokens = special_tokens or model.tokens
            thought_transform = model.thought_transform if thought_transform is None else thought_transform
            model = model.decoder
        self.thought_transform = thought_transform if thought_transform is not None else ThoughtTransform()
        self.decoder = model
        self.tokenizer = tokenizer
        self.special_tokens = special_tokens or _special_tokens_from(tokenizer)
        weight = model.embed_tokens.weight
        self.device = weight.device
        self.cache = PagedKVCache(model.config, num_pages=max_pages, page_size=page_size, dtype=weight.dtype,
                                  device=self.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.allow_long_context = allow_long_context
        self.peak_pages_in_use = 0  # high-water mark of the last generate call (shows page sharing)

    @property
    def page_size(self) -> int:
        return self.cache.page_size

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str | Sequence[int]], num_thoughts: int | str | Sequence[int | str] = 0,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                 stop: Sequence[int | str] | None = None, n: int = 1, seed: int = 0,
                 thought_markers: bool | None = None, progress: bool = False,
                 on_result: Callable[[int, int, GenerationResult], None] | None = None, max_thoughts: int = 8,
                 eot_threshold: float = 0.5, return_thoughts: bool = False,
                 thought_top_k: int = 5) -> list[GenerationResult]:
        """Generate for every prompt; returns `len(prompts) * n` results, request-major.

        `num_thoughts`: one count for all prompts or one per prompt; with thoughts (or
        `thought_markers=True`, as in Coconut stage 0) the prompt is followed by `<bot>`, the thoughts
        and `<eot>` (`thought_markers=False`: the thoughts follow the prompt with neither, and the first
        token is sampled from the last thought's output). `"auto"` thinks adaptively: before each
        thought the sequence leaves the thought phase (feeds `<eot>`) when p(`<eot>`) exceeds
        `eot_threshold` or it has `max_thoughts` thoughts; the rest of the batch keeps thinking in the
        same steps. `return_thoughts`: each result carries a `ThoughtTrace` per thought (its
        `thought_top_k` nearest tokens).
        `stop`: token ids and/or strings. A bad request gets an "error" result that names it; the
        other requests still complete. `on_result(request, sample, result)` is called as each
        result is ready (finishing order), e.g. to write it out before the rest are done.
        """
        check_sampling(temperature, top_k, top_p, max_new_tokens, n, seed)
        if isinstance(prompts, (str, bytes)):  # would be one request per character
            raise InvalidArgumentError(f"prompts must be a list of prompts, got one {type(prompts).__name__} "
                                       f"{prompts!r:.40}: pass [prompt]")
        if not hasattr(prompts, "__len__") or not hasattr(prompts, "__iter__"):
            raise InvalidArgumentError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        if not is_integer(max_thoughts) or max_thoughts < 0:
            raise InvalidArgumentError(f"max_thoughts must be an integer >= 0, got {max_thoughts!r}")
        if isinstance(eot_threshold, torch.Tensor) and eot_threshold.numel() == 1:
            eot_threshold = eot_threshold.item()
        eot_threshold = check_float(eot_threshold, "eot_threshold", 0.0, 1.0)
        if thought_markers is not None:
            if isinstance(thought_markers, str) or thought_markers not in (True, False):  # numpy bools pass
                raise InvalidArgumentError(f"thought_markers must be True, False or None, got {thought_markers!r}")
            thought_markers = bool(thought_markers)
        if not is_integer(thought_top_k) or thought_top_k < 1:
            raise InvalidArgumentError(f"thought_top_k must be an integer >= 1, got {thought_top_k!r}")
        counts = _per_request(num_thoughts, len(prompts))
        if len(counts) != len(prompts):
            raise InvalidArgumentError(f"num_thoughts: {len(counts)} thought counts for {len(prompts)} prompts")
        stop_ids, stop_texts, stop_error = _split_stop(stop)
        params = _Params(max_new_tokens, temperature, top_k, top_p, frozenset(stop_ids), tuple(stop_texts), seed, n,
                         max_thoughts, eot_threshold, return_thoughts, thought_top_k)
        results: dict[tuple[int, int], GenerationResult] = {}
        queue: deque[_Request] = deque()
        for i, (prompt, k) in enumerate(zip(prompts, counts)):
            request, error = self._request(i, prompt, k, thought_markers, stop_error, params)
            if error is not None:
                for j in range(n):
                    results[(i, j)] = GenerationResult(None, [], "error", 0, k if is_integer(k) else 0, error)
                    if on_result is not None:
                        on_result(i, j, results[(i, j)])
            else:
                queue.append(request)

        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts) * n, desc="generate", unit="sample", initial=len(results), disable=None)
        running: list[_Seq] = []
        reserved: dict[int, int] = {}  # request index -> pages held back for it
        self.peak_pages_in_use = 0
        try:
            while queue or running:
                while queue and sum(reserved.values()) + queue[0].pages <= self.cache.num_pages:
                    request = queue.popleft()
                    reserved[request.index] = request.pages
                    running.append(self._admit(request, params))
                finished = self._step(running, params)
                self.peak_pages_in_use = max(self.peak_pages_in_use, self.cache.num_pages - self.cache.num_free_pages)
                for seq, reason in finished:
                    running.remove(seq)
                    self.cache.free(seq.key)
                    results[seq.key] = self._result(seq, reason, params)
                    if on_result is not None:
                        on_result(*seq.key, results[seq.key])
                    if all((seq.key[0], j) in results for j in range(n)):
                        del reserved[seq.key[0]]
                    if bar is not None:
                        bar.update(1)
        finally:  # an exception (or Ctrl-C) mid-step: give every page back so the Generator stays usable
            for seq in running:
                if seq.key in self.cache.allocator:
                    self.cache.free(seq.key)
            if bar is not None:
                bar.close()
        return [results[(i, j)] for i in range(len(prompts)) for j in range(n)]

    # -- requests -----------------------------------------------------------------------------------

    def _request(self, index: int, prompt, k, thought_markers, stop_error, params: _Params):
        """Validate and tokenize one request; returns (request, None) or (None, error message)."""
        if stop_error:
            return None, f"request {index}: {stop_error}"
        adaptive = isinstance(k, str) and k == "auto"
        if not adaptive and (not is_integer(k) or k < 0):
            return None, f"request {index}: num_thoughts must be an integer >= 0, got {k!r} (or 'auto': adaptive thinking)"
        if adaptive and thought_markers is False:
            return None, f"request {index}: num_thoughts='auto' needs the thought markers (thought_markers=False)"
        k = params.max_thoughts if adaptive else int(k)
        markers = (adaptive or k > 0) if thought_markers is None else thought_markers
        thinking = adaptive or k > 0
        if (markers or thinking) and self.special_tokens is None:
            return None, (f"request {index}: thoughts need the special tokens {SPECIAL_TOKEN_TEXTS}: pass a "
                          "CoconutModel, special_tokens=, or a tokenizer that has them")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                return None, f"request {index}: a text prompt needs a tokenizer"
            problem = unicode_problem(prompt)
            if problem:
                return None, f"request {index}: the prompt is not valid Unicode text ({problem})"
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=False)) if prompt else []
        elif isinstance(prompt, (list, tuple)) and all(is_integer(t) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            return None, f"request {index}: a prompt must be a string or a list of token ids, got {prompt!r:.80}"
        if not ids:
            return None, f"request {index}: the prompt is empty"
        vocab = self.decoder.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            return None, f"request {index}: token ids {bad[:5]} are outside the vocabulary of {vocab}"
        if markers:  # <bot>; <eot> follows at once without thoughts, else after the last thought
            ids = ids + [self.special_tokens.bot] + ([] if thinking else [self.special_tokens.eot])
        # what a sample's cache holds at most: its inputs (<eot> after the thoughts only with markers) and
        # its new tokens but the last, which is sampled and never fed back
        stored = len(ids) + k + (1 if thinking and markers else 0) + params.max_new_tokens - 1
        error = self._position_error(stored)
        if error:
            return None, (f"request {index}: {len(ids)} prompt tokens + {k} thoughts + {params.max_new_tokens} new "
                          f"tokens {error}")
        pages = -(-stored // self.page_size) * params.n  # conservative: every copy owns all its pages
        if pages > self.cache.num_pages:
            return None, (f"request {index}: needs up to {pages} pages ({len(ids)} prompt tokens + {k} thoughts + "
                          f"{params.max_new_tokens} new tokens, n={params.n}) but the pool has {self.cache.num_pages}")
        return _Request(index, ids, k, adaptive, thinking, markers, pages, stored), None

    def _position_error(self, positions: int) -> str | None:
        """Why a sequence may not use `positions` positions on this model, or None."""
        config = self.decoder.config
        limit = config.max_position_embeddings
        if positions <= limit:
            return None
        if config.positions == "learned":
            return f"need {positions} positions but the model's learned positions stop at {limit}"
        if self.allow_long_context:
            return None
        return (f"need {positions} positions, past the model's max_position_embeddings={limit} "
                "(Generator(allow_long_context=True) runs RoPE past its trained length)")

    def _admit(self, request: _Request, params: _Params) -> _Seq:
        seq = _Seq(key=(request.index, 0), prompt_tokens=len(request.prompt), max_thoughts=request.max_thoughts,
                   adaptive=request.adaptive, thinking=request.thinking, generator=_sample_generator(params.seed, 0),
                   pending=list(request.prompt), forks=params.n - 1, trace=[] if params.return_thoughts else None,
                   markers=request.markers)
        self.cache.add_sequence(seq.key)
        try:
            # the pages `generate` holds back for it anyway, taken now as one run where the pool has one:
            # its decode steps then read its K/V in place (AttentionBatch.kv_runs)
            self.cache.reserve(seq.key, request.tokens)
        except BaseException:  # not yet in `running`: give its pages back here
            self.cache.free(seq.key)
            raise
        return seq

    # -- one step ----------------------------------------------------------------------------------

    def _step(self, running: list[_Seq], params: _Params) -> list[tuple[_Seq, str]]:
        """One Decoder call for every running sequence; returns the sequences that finished."""
        counts = [(s.thought is not None) + len(s.pending) for s in running]
        batch = self.cache.prepare([s.key for s in running], counts)
        last = self.decoder(batch, inputs_embeds=self._step_inputs(running, counts, batch),
                            cache=self.cache)[batch.last_token_indices()]
        to_sample: list[tuple[_Seq, int]] = []
        thinking: list[tuple[_Seq, int]] = []
        for row, s in enumerate(running):
            s.pending, s.thought = [], None
            (thinking if s.thinking else to_sample).append((s, row))
        if thinking:
            self._think(thinking, last, params)
        for s, row in list(to_sample):  # fork n-1 copies once the shared prompt + thoughts are cached
            for j in range(1, s.forks + 1):
                child = _Seq(key=(s.key[0], j), prompt_tokens=s.prompt_tokens, max_thoughts=s.max_thoughts,
                             adaptive=s.adaptive, thinking=False, generator=_sample_generator(params.seed, j),
                             thoughts_done=s.thoughts_done, trace=None if s.trace is None else list(s.trace))
                self.cache.fork(s.key, child.key)
                running.append(child)
                to_sample.append((child, row))
            s.forks = 0
        if not to_sample:
            return []
        rows = sorted({row for _, row in to_sample})
        logits = self.decoder.logits(last[torch.tensor(rows, device=self.device)]).float()
        greedy = logits.argmax(dim=-1).tolist() if params.temperature <= 0 else None
        index_of = {row: i for i, row in enumerate(rows)}
        finished = []
        for s, row in to_sample:
            index = index_of[row]
            token = greedy[index] if greedy is not None else _sample(logits[index], params, s.generator)
            s.out.append(token)
            reason = self._finish_reason(s, token, params)
            if reason:
                finished.append((s, reason))
            else:
                s.pending = [token]
        return finished

    def _think(self, thinking: list[tuple[_Seq, int]], last: torch.Tensor, params: _Params) -> None:
        """Each sequence in its thought phase gets its next input: a thought (its last hidden state
        through the thought transform) or, when it has its thoughts (or, adaptive, p(<eot>) exceeds
        the threshold), `<eot>`. A sequence's last thought (the count, or the adaptive bound) and its
        `<eot>` go in the same step: nothing reads the hidden state after the last thought, and the
        `<eot>` row attends to the thought's K/V stored in that step, so the thought phase costs one
        decoder call per thought, not one more."""
        hidden = last[torch.tensor([row for _, row in thinking], device=self.device)]
        p_eot = None
        if params.return_thoughts or any(s.adaptive for s, _ in thinking):
            p_eot = torch.softmax(self.decoder.logits(hidden).float(), dim=-1)[:, self.special_tokens.eot].tolist()
        go = []
        for j, (s, _) in enumerate(thinking):
            if s.thoughts_done < s.max_thoughts and not (s.adaptive and p_eot[j] > params.eot_threshold):
                go.append(j)
            else:
                s.thinking = False
                s.pending = [self.special_tokens.eot]
        if not go:
            return
        inputs = self.thought_inputs(hidden[torch.tensor(go, device=self.device)],
                                     [thinking[j][0].thoughts_done for j in go])
        traces = self._traces(inputs, [p_eot[j] for j in go], params) if params.return_thoughts else None
        for n, j in enumerate(go):
            s = thinking[j][0]
            s.thought = inputs[n]
            s.thoughts_done += 1
            if s.thoughts_done == s.max_thoughts:  # without markers, the last thought's output is sampled
                s.thinking = False
                s.pending = [self.special_tokens.eot] if s.markers else []
            if traces is not None:
                s.trace.append(traces[n])

    def thought_inputs(self, hidden: torch.Tensor, index: int | Sequence[int] = 0) -> torch.Tensor:
        """The thoughts' input embeddings after the positions whose last hidden states are `hidden`
        (`index`: each one's thought index, 0 = the first): the thought transform, as in training
        (CoconutModel.thought_inputs)."""
        return self.thought_transform.next_inputs(hidden, self.decoder.embed_tokens.weight,
                                                  self.special_tokens.thought, index)

    def _traces(self, inputs: torch.Tensor, p_eot: list[float], params: _Params) -> list[ThoughtTrace]:
        """Inspection of thought input vectors: norm, nearest tokens through the LM head, p(<eot>)."""
        probs = torch.softmax(self.decoder.logits(inputs).float(), dim=-1)
        top = torch.topk(probs, min(params.thought_top_k, probs.shape[-1]), dim=-1)
        norms = inputs.float().norm(dim=-1).tolist()
        traces = []
        for n, (ids, values) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            texts = ([self.tokenizer.decode([t]) for t in ids] if self.tokenizer is not None else [None] * len(ids))
            traces.append(ThoughtTrace(norms[n], list(zip(ids, texts, values)), p_eot[n]))
        return traces

    def _step_inputs(self, running: list[_Seq], counts: list[int], batch: AttentionBatch) -> torch.Tensor:
        """Packed input embeddings: token embeddings, with each thought's hidden state in its row (a
        sequence's first row of the step; a token, `<eot>` after the last thought, may follow it)."""
        token_rows, token_ids, thought_rows, thoughts = [], [], [], []
        start = 0
        for s, count in zip(running, counts):
            first_token = start
            if s.thought is not None:
                thought_rows.append(start)
                thoughts.append(s.thought)
                first_token += 1
            token_rows.extend(range(first_token, start + count))
            token_ids.extend(s.pending)
            start += count
        weight = self.decoder.embed_tokens.weight
        if not thoughts:
            return self.decoder.embed_tokens(torch.tensor(token_ids, device=self.device))
        embeds = torch.empty(batch.num_tokens, weight.shape[1], dtype=weight.dtype, device=self.device)
        if token_rows:
            embeds[torch.tensor(token_rows, device=self.device)] = self.decoder.embed_tokens(
                torch.tensor(token_ids, device=self.device))
        embeds[torch.tensor(thought_rows, device=self.device)] = torch.stack(thoughts)
        return embeds

    def _finish_reason(self, s: _Seq, token: int, params: _Params) -> str | None:
        if token in self.eos_ids:
            return "eos"
        if token in params.stop_ids:
            return "stop"
        if params.stop_texts and self.tokenizer is not None:
            text = self.tokenizer.decode(s.out)
            if any(t in text for t in params.stop_texts):
                return "stop"
        if len(s.out) >= params.max_new_tokens:
            return "length"
        return None

    def _result(self, seq: _Seq, reason: str, params: _Params) -> GenerationResult:
        text = None
        if self.tokenizer is not None:
            text = self.tokenizer.decode([t for t in seq.out if t not in self.eos_ids])
            for stop_text in params.stop_texts:
                cut = text.find(stop_text)
                text = text[:cut] if cut >= 0 else text
        return GenerationResult(text, list(seq.out), reason, seq.prompt_tokens, seq.thoughts_done,
                                thoughts=seq.trace)


def _sample_generator(seed: int, sample_index: int) -> torch.Generator:
    """The random stream of sample `sample_index` of a request: independent of the batch around it."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed((seed * 1_000_003 + sample_index * 7919) % (2**63))
    return gen


def _sample(logits: torch.Tensor, params: _Params, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise temperature, top-k and nucleus filtering, then a seeded draw."""
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    top_k, top_p = params.top_k, params.top_p
    logits = logits.cpu()
    scaled = logits / params.temperature
    if not torch.isfinite(scaled).all():
        # a tiny temperature overflows: shift first (softmax is shift-invariant), in float64, where one
        # below float32's smallest (which would become 0, and 0 / 0 NaN) is still a number
        scaled = (logits.double() - logits.max()) / params.temperature
    logits = scaled
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep[0] = True  # the most likely token always (a top_p below the dtype's smallest number keeps nothing)
        filtered = torch.zeros_like(probs)
        filtered[order[keep]] = sorted_probs[keep]
        probs = filtered / filtered.sum()
    return int(torch.multinomial(probs, 1, generator=generator))


def _per_request(num_thoughts, count: int) -> list:
    """One thought count per prompt: a sequence of counts (list, tuple, range, array) as is, anything
    else (one count, or a bad value that each request then reports) repeated for every prompt."""
    if is_integer(num_thoughts) or isinstance(num_thoughts, (str, bytes, dict)):
        return [num_thoughts] * count
    try:
        return list(num_thoughts)
    except TypeError:  # not iterable: a float, None, ...
        return [num_thoughts] * count


def _split_stop(stop) -> tuple[set[int], list[str], str | None]:
    ids, texts = set(), []
    if isinstance(stop, (str, int)):  # one stop string or id, not its characters
        stop = [stop]
    for item in stop or ():
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            return set(), [], f"stop entries must be token ids (int) or strings, got {type(item).__name__} {item!r}"
        if item == "":  # "" is in every text: every request would stop after one token
            return set(), [], "stop strings must not be empty"
        (ids.add(item) if isinstance(item, int) else texts.append(item))
    return ids, texts, None


def _eos_ids(decoder: Decoder, tokenizer) -> set[int]:
    eos = decoder.config.eos_token_id
    ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _special_tokens_from(tokenizer) -> SpecialTokens | None:
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab()
    if all(t in vocab for t in SPECIAL_TOKEN_TEXTS):
        return SpecialTokens(*(vocab[t] for t in SPECIAL_TOKEN_TEXTS))
    return None


@torch.no_grad()
def generate_no_cache(decoder: Decoder, prompt: Sequence[int], num_thoughts: int, max_new_tokens: int,
                      tokens: SpecialTokens | None = None, eos_ids: Sequence[int] = (),
                      thought_markers: bool | None = None,
                      thought_transform: ThoughtTransform | None = None) -> list[int]:
    """The official style, one question at a time and no KV cache: every thought and every new token
    re-runs the whole sequence. Greedy. The slow reference for tests and benchmarks."""
    transform = thought_transform if thought_transform is not None else ThoughtTransform()
    embed = decoder.embed_tokens
    device = embed.weight.device
    markers = (num_thoughts > 0) if thought_markers is None else thought_markers
    inputs = list(embed(torch.tensor(list(prompt) + ([tokens.bot] if markers else []), device=device)))

    def last_hidden():
        return decoder(AttentionBatch.packed([len(inputs)], device=device), inputs_embeds=torch.stack(inputs))[-1]

    for t in range(num_thoughts):
        inputs.append(transform.next_inputs(last_hidden()[None], embed.weight, tokens.thought, t)[0])
    if markers:
        inputs.append(embed(torch.tensor(tokens.eot, device=device)))
    out: list[int] = []
    for _ in range(max_new_tokens):
        token = int(torch.argmax(decoder.logits(last_hidden())))
        out.append(token)
        if token in eos_ids:
            break
        inputs.append(embed(torch.tensor(token, device=device)))
    return out
