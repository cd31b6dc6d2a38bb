"""Paged KV cache: a page pool per layer, a host-side page allocator, and the per-step AttentionBatch.

The allocator is plain Python over ints (free list, reference counts, copy-on-write of a shared
partial last page); the only things that reach the device are the pools, which are allocated once,
and the small metadata tensors of each step. `PagedKVCache.prepare` is the one place where a step
reserves room for its new tokens: prefill, "append one continuous thought" and "decode one token"
differ only in how many new tokens each sequence gets.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import InvalidArgumentError, OutOfPagesError
from .kernels.dropout import dropout_attention
from .validation import check_int, is_integer


@dataclass
class AttentionBatch:
    """Per-step metadata of a packed batch, built once per step and shared by every layer.

    Tokens of all sequences are packed along one axis. New token i of sequence b sits at absolute
    position `seq_lens_k[b] - q_len[b] + i` and attends to keys at positions <= its own.
    """

    cu_seqlens_q: torch.Tensor  # int32 [B+1]
    seq_lens_k: torch.Tensor  # int32 [B]
    block_table: torch.Tensor  # int32 [B, max_pages]
    slot_mapping: torch.Tensor  # int64 [T]; -1 = do not store
    positions: torch.Tensor  # int64 [T]
    max_seqlen_q: int
    max_seqlen_k: int
    q_lens: tuple[int, ...] = field(default=())  # host copies: no device sync to read them
    k_lens: tuple[int, ...] = field(default=())
    # (first page, pages per row) when row b's pages are the run `first + b * pages_per_row + [0, 1, ..]`
    # (a training cache reserves its sequences so): every row's K/V is then a slice of one strided
    # view of the pool, with nothing to gather. None otherwise.
    strided_pages: tuple[int, int] | None = None
    # Per sequence, its keys as runs of consecutive pool slots, `(first slot, keys)` in key order
    # (one run where its pages are consecutive, as the Generator reserves them): a one-token step
    # then reads each run as a view of the pool instead of gathering pages. None: not known (a batch
    # not built by `PagedKVCache.prepare`, or one whose pages are strided runs).
    kv_runs: tuple[tuple[tuple[int, int], ...], ...] | None = None
    # Known on the host: no slot of slot_mapping is -1 (every new token is stored), so a store need
    # not look (a host-device sync). False: not known.
    every_slot_valid: bool = False
    # int32 [B]: each sequence's identity for attention dropout (its sample's index in the training
    # forward, whatever its place in this step), so that every mode draws the same masks. None: b.
    dropout_rows: torch.Tensor | None = None
    _memo: dict = field(default_factory=dict, repr=False, compare=False)

    def memo(self, key: str, build):
        """A per-step value derived from this batch (masks, index tensors), built by the first layer
        that asks and reused by the others."""
        if key not in self._memo:
            self._memo[key] = build()
        return self._memo[key]

    def mask_rows(self) -> torch.Tensor:
        """`dropout_rows`, or (where not set) each sequence's index in the step: int32 `[B]` on the batch's device."""
        if self.dropout_rows is not None:
            return self.dropout_rows
        return self.memo("mask_rows", lambda: torch.arange(len(self.q_lens), dtype=torch.int32,
                                                           device=self.cu_seqlens_q.device))

    @property
    def num_seqs(self) -> int:
        return len(self.q_lens)

    @property
    def num_tokens(self) -> int:
        return sum(self.q_lens)

    @classmethod
    def packed(
        cls, seq_lens: Sequence[int], device: torch.device | str = "cpu", start_positions: Sequence[int] | None = None
    ) -> "AttentionBatch":
        """Metadata for a forward without a cache: each sequence attends only to its own packed tokens."""
        seq_lens = [int(n) for n in seq_lens]
        starts = [0] * len(seq_lens) if start_positions is None else [int(s) for s in start_positions]
        if any(n < 0 for n in seq_lens):
            raise ValueError(f"sequence lengths must be >= 0, got {seq_lens}")
        cu = [0]
        positions: list[int] = []
        for n, s in zip(seq_lens, starts):
            cu.append(cu[-1] + n)
            positions.extend(range(s, s + n))
        total = cu[-1]
        return cls(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=device),
            seq_lens_k=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_table=torch.zeros((len(seq_lens), 0), dtype=torch.int32, device=device),
            slot_mapping=torch.full((total,), -1, dtype=torch.int64, device=device),
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            max_seqlen_q=max(seq_lens, default=0),
            max_seqlen_k=max(seq_lens, default=0),
            q_lens=tuple(seq_lens),
            k_lens=tuple(seq_lens),
        )

    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For each packed token: its sequence index and its row among that sequence's new tokens.

        Computed once per step and memoised (every layer uses the same batch).
        """
        def build():
            counts = torch.tensor(self.q_lens, dtype=torch.int64)
            seq = torch.repeat_interleave(torch.arange(len(self.q_lens)), counts)
            row = torch.arange(int(counts.sum())) - (torch.cumsum(counts, 0) - counts)[seq]
            dev = self.positions.device
            return seq.to(dev), row.to(dev)

        return self.memo("token_rows", build)

    def last_token_indices(self) -> torch.Tensor:
        """Packed index of each sequence's last new token (sequences with no new token excluded)."""
        idx = [end - 1 for end, n in zip(_cumsum(self.q_lens)[1:], self.q_lens) if n > 0]
        return torch.tensor(idx, dtype=torch.int64, device=self.positions.device)


def _cumsum(values: Sequence[int]) -> list[int]:
    out = [0]
    for v in values:
        out.append(out[-1] + v)
    return out


def _strided_pages(page_lists: Sequence[Sequence[int]]) -> tuple[int, int] | None:
    """(first page, pages per row) if row b's pages are `first + b * pages_per_row + [0, 1, ..]`, else None."""
    if not page_lists or not page_lists[0]:
        return None
    first = page_lists[0][0]
    stride = page_lists[1][0] - first if len(page_lists) > 1 and page_lists[1] else len(page_lists[0])
    if stride <= 0:
        return None
    for b, pages in enumerate(page_lists):
        start = first + b * stride
        if not pages:
            continue
        if len(pages) > stride or pages[0] != start or pages[-1] != start + len(pages) - 1:
            return None  # cheap rejection first: decode batches are rarely runs
        if list(pages) != list(range(start, start + len(pages))):
            return None
    return first, stride


def kv_runs(page_lists: Sequence[Sequence[int]], k_lens: Sequence[int], page_size: int
            ) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Each sequence's first `k_lens[b]` keys as runs of consecutive pool slots, `(first slot, keys)`."""
    out = []
    for pages, k_len in zip(page_lists, k_lens):
        used = -(-k_len // page_size)
        runs, start = [], 0
        while start < used:
            end = start + 1
            while end < used and pages[end] == pages[end - 1] + 1:
                end += 1
            runs.append((pages[start] * page_size, min(end * page_size, k_len) - start * page_size))
            start = end
        out.append(tuple(runs))
    return tuple(out)


@dataclass
class _Sequence:
    pages: list[int]
    length: int


class PageAllocator:
    """Host-side page bookkeeping: free list, reference counts, sequences as page lists.

    Pages are shared only through `fork`; a sequence about to write into a shared partial last page
    first gets a private copy (copy-on-write). Every method either succeeds or leaves the state as
    it was.
    """

    def __init__(self, num_pages: int, page_size: int):
        check_int(num_pages, "num_pages", minimum=1)
        check_int(page_size, "page_size", minimum=1)
        self.num_pages = num_pages
        self.page_size = page_size
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refs: list[int] = [0] * num_pages
        self._seqs: dict[Hashable, _Sequence] = {}

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._seqs

    def sequence_ids(self) -> list[Hashable]:
        return list(self._seqs)

    def length(self, seq_id: Hashable) -> int:
        return self._get(seq_id).length

    def pages(self, seq_id: Hashable) -> list[int]:
        return list(self._get(seq_id).pages)

    def ref_count(self, page: int) -> int:
        return self._refs[page]

    def pages_needed(self, seq_id: Hashable, num_new_tokens: int) -> int:
        """Free pages that appending `num_new_tokens` to `seq_id` would take (copy-on-write included)."""
        return self._pages_needed_together([seq_id], [num_new_tokens])

    def _pages_needed_together(self, seq_ids: Sequence[Hashable], counts: Sequence[int]) -> int:
        """Free pages that `append(seq_ids, counts)` takes: new pages past each sequence's own, and a
        copy of a shared partly filled page for each writer but the last one left holding it (the
        others have copied it away, in order; forks of one request all writing their first token)."""
        needed, copied = 0, {}
        for seq_id, count in zip(seq_ids, counts):
            if count <= 0:
                continue
            seq = self._get(seq_id)
            needed += max(0, -(-(seq.length + count) // self.page_size) - len(seq.pages))
            if seq.length % self.page_size:
                page = seq.pages[seq.length // self.page_size]
                if self._refs[page] - copied.get(page, 0) > 1:
                    copied[page] = copied.get(page, 0) + 1
                    needed += 1
        return needed

    def _shared_partial_page(self, seq: _Sequence) -> int | None:
        """Index in `seq.pages` of its partly filled last page when another sequence shares it (the
        next write must copy it first), else None."""
        index = seq.length // self.page_size
        if seq.length % self.page_size and self._refs[seq.pages[index]] > 1:
            return index
        return None

    def add(self, seq_id: Hashable) -> None:
        """Register an empty sequence."""
        if seq_id in self._seqs:
            raise KeyError(f"sequence {seq_id!r} already exists in the cache")
        self._seqs[seq_id] = _Sequence(pages=[], length=0)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        """Make `child_id` share every page of `parent_id` (no copy until one of them writes)."""
        parent = self._get(parent_id)
        if child_id in self._seqs:
            raise KeyError(f"sequence {child_id!r} already exists in the cache")
        used = parent.pages[: -(-parent.length // self.page_size)]  # not the parent's reserved pages
        for page in used:
            self._refs[page] += 1
        self._seqs[child_id] = _Sequence(pages=list(used), length=parent.length)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Give `seq_id` pages for `num_tokens` tokens in all (its length does not change; later
        appends fill them). All or nothing: raises OutOfPagesError, changing nothing."""
        seq = self._get(seq_id)
        needed = max(0, -(-num_tokens // self.page_size) - len(seq.pages))
        if needed > len(self._free):
            raise OutOfPagesError(
                f"paged KV cache out of pages: reserving {num_tokens} tokens for sequence {seq_id!r} needs "
                f"{needed} free pages, {len(self._free)} of {self.num_pages} are free (page_size={self.page_size})"
            )
        seq.pages.extend(self._take_run(needed))

    def _take_run(self, count: int) -> list[int]:
        """`count` free pages: the lowest run of consecutive ones where the free list has one (a sequence
        whose pages are one run is read in place by a one-token step), else the next ones it hands out."""
        if count > 1:
            upcoming = self._free[: -count - 1 : -1]  # the pages `_take` hands out next, in order
            if upcoming != list(range(upcoming[0], upcoming[0] + count)):
                free = sorted(self._free)
                for i in range(len(free) - count + 1):
                    if free[i + count - 1] - free[i] == count - 1:
                        run = list(range(free[i], free[i] + count))
                        taken = set(run)
                        self._free = [p for p in self._free if p not in taken]
                        for page in run:
                            self._refs[page] = 1
                        return run
        return [self._take() for _ in range(count)]

    def reset(self) -> None:
        """Drop every sequence; the free list goes back to ascending page order, so that sequences
        reserved one after another get consecutive runs of pages."""
        self._free = list(range(self.num_pages - 1, -1, -1))
        self._refs = [0] * self.num_pages
        self._seqs = {}

    def free(self, seq_id: Hashable) -> None:
        """Drop a sequence; pages nobody else references go back to the free list."""
        seq = self._seqs.pop(self._check(seq_id))
        for page in reversed(seq.pages):
            self._refs[page] -= 1
            if self._refs[page] == 0:
                self._free.append(page)

    def append(self, seq_ids: Sequence[Hashable], counts: Sequence[int]) -> list[tuple[int, int]]:
        """Reserve room for `counts[i]` more tokens of `seq_ids[i]`, all or nothing.

        Returns the (source, destination) page copies that copy-on-write requires; the caller copies
        the page contents before writing. Raises OutOfPagesError, changing nothing, when the free
        list is too short.
        """
        if len(seq_ids) != len(counts):
            raise ValueError(f"{len(seq_ids)} sequence ids but {len(counts)} token counts")
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError(f"duplicate sequence ids in one step: {list(seq_ids)}")
        if not all(is_integer(c) and c >= 0 for c in counts):
            raise InvalidArgumentError(f"new-token counts must be integers >= 0, got {list(counts)}")
        needed = self._pages_needed_together(seq_ids, counts)
        if needed > len(self._free):
            raise OutOfPagesError(
                f"paged KV cache out of pages: this step needs {needed} free pages, "
                f"{len(self._free)} of {self.num_pages} are free (page_size={self.page_size})"
            )
        copies: list[tuple[int, int]] = []
        for seq_id, count in zip(seq_ids, counts):
            if count == 0:
                continue
            seq = self._seqs[seq_id]
            index = self._shared_partial_page(seq)
            if index is not None:
                shared = seq.pages[index]
                private = self._take()
                self._refs[shared] -= 1
                seq.pages[index] = private
                copies.append((shared, private))
            seq.length += count
            while len(seq.pages) * self.page_size < seq.length:
                seq.pages.append(self._take())
        return copies

    def _take(self) -> int:
        page = self._free.pop()
        self._refs[page] = 1
        return page

    def _check(self, seq_id: Hashable) -> Hashable:
        if seq_id not in self._seqs:
            raise KeyError(f"sequence {seq_id!r} is not in the cache")
        return seq_id

    def _get(self, seq_id: Hashable) -> _Sequence:
        return self._seqs[self._check(seq_id)]


def _cache_bytes(shape: tuple, dtype: torch.dtype, requires_grad: bool) -> int:
    """Bytes of a paged cache's pools (and of its fp32 gradient pages when it trains)."""
    elements = math.prod(shape)
    return elements * (dtype.itemsize + (4 if requires_grad else 0))


def _check_fits(shape: tuple, dtype: torch.dtype, requires_grad: bool, device: torch.device) -> None:
    """Refuse, before anything is built, a cache larger than the device's whole memory (the page
    list alone of an absurd page count would exhaust the host first)."""
    need = _cache_bytes(shape, dtype, requires_grad)
    if device.type == "cuda" and torch.cuda.is_available():
        try:
            total = torch.cuda.get_device_properties(device).total_memory
        except (AssertionError, RuntimeError, ValueError):  # a device index that does not exist: torch says so next
            return
    elif device.type == "cpu" and hasattr(os, "sysconf"):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    else:
        return
    if need > total:
        raise InvalidArgumentError(f"a paged KV cache of {shape[2]} pages x {shape[3]} tokens needs "
                                   f"{need / 2**30:.1f} GiB, more than the {total / 2**30:.1f} GiB of {device}: use "
                                   "fewer or smaller pages")


class PagedKVCache:
    """K/V page pools for every layer (one tensor `[2, layers, pages, page_size, kv_heads, head_dim]`)
    plus the allocator that maps sequences onto pages."""

    def __init__(
        self,
        config: ModelConfig,
        num_pages: int,
        page_size: int = 16,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        requires_grad: bool = False,
    ):
        self.config = config
        self.page_size = page_size
        self.dtype = dtype
        self.device = torch.device(device)
        check_int(num_pages, "num_pages", minimum=1)
        check_int(page_size, "page_size", minimum=1)
        shape = (2, config.num_layers, num_pages, page_size, config.num_kv_heads, config.head_dim)
        _check_fits(shape, dtype, requires_grad, self.device)
        self.allocator = PageAllocator(num_pages, page_size)
        try:
            self.kv = torch.zeros(shape, dtype=dtype, device=self.device)
            # Training: fp32 gradient pages mirroring the pools, and the 0-d token that orders the
            # backward of every store after the backward of every attention that read its slots.
            self.grad_kv = torch.zeros(shape, dtype=torch.float32, device=self.device) if requires_grad else None
        except (RuntimeError, MemoryError) as exc:  # CPU: "can't allocate memory"; CUDA: OutOfMemoryError
            # the type stays (an out-of-memory handler must still see one); the note says what was allocated
            exc.add_note(f"while allocating a paged KV cache of {num_pages} pages x {page_size} tokens "
                         f"({_cache_bytes(shape, dtype, requires_grad) / 2**30:.2f} GiB on {self.device})")
            raise
        self.dependency: torch.Tensor | None = None
        self.generation = 0

    @property
    def tracks_gradients(self) -> bool:
        return self.grad_kv is not None

    def reset(self) -> None:
        """Drop every sequence: the pool's pages are free for the next forward (no gradient bookkeeping)."""
        self.allocator.reset()

    def begin_training_step(self) -> None:
        """Start a differentiable forward: drop every sequence, new dependency token.

        (Gradient rows are zeroed slot by slot as the step's stores write them.)

        The previous step's graph must have been backpropagated (or dropped) by now: its backward
        reads these pages, and raises if it runs after this call.
        """
        if not self.tracks_gradients:
            raise RuntimeError("this PagedKVCache was created without requires_grad=True")
        self.reset()
        self.generation += 1
        self.dependency = torch.zeros((), device=self.device, requires_grad=True)

    def grad_k_pool(self, layer: int) -> torch.Tensor:
        return self.grad_kv[0, layer]

    def grad_v_pool(self, layer: int) -> torch.Tensor:
        return self.grad_kv[1, layer]

    def grad_kv_slots(self, layer: int) -> torch.Tensor:
        """One layer's K and V gradient pages by slot, `[2, pages * page_size, kv_heads, head_dim]` (a view)."""
        return self.grad_kv[:, layer].flatten(1, 2)

    @property
    def num_pages(self) -> int:
        return self.allocator.num_pages

    @property
    def num_free_pages(self) -> int:
        return self.allocator.num_free_pages

    def k_pool(self, layer: int) -> torch.Tensor:
        """K pages of one layer, `[num_pages, page_size, num_kv_heads, head_dim]`."""
        return self.kv[0, layer]

    def v_pool(self, layer: int) -> torch.Tensor:
        """V pages of one layer, `[num_pages, page_size, num_kv_heads, head_dim]`."""
        return self.kv[1, layer]

    def add_sequence(self, seq_id: Hashable) -> None:
        self.allocator.add(seq_id)

    def reserve(self, seq_id: Hashable, num_tokens: int) -> None:
        """Give `seq_id` pages for `num_tokens` tokens in all, before its steps write them."""
        self.allocator.reserve(seq_id, num_tokens)

    def fork(self, parent_id: Hashable, child_id: Hashable) -> None:
        self.allocator.fork(parent_id, child_id)

    def free(self, seq_id: Hashable) -> None:
        self.allocator.free(seq_id)

    def seq_len(self, seq_id: Hashable) -> int:
        return self.allocator.length(seq_id)

    def prepare(self, seq_ids: Sequence[Hashable], num_new_tokens: Sequence[int]) -> AttentionBatch:
        """Reserve room for one step's new tokens and build its AttentionBatch.

        `seq_ids[b]` gets `num_new_tokens[b]` new tokens (0 allowed: that sequence is part of the
        batch but nothing of it is computed or written). Raises OutOfPagesError before anything changes.
        """
        alloc = self.allocator
        old_lens = [alloc.length(s) for s in seq_ids]
        copies = alloc.append(seq_ids, num_new_tokens)
        if copies:
            src = torch.tensor([c[0] for c in copies], device=self.device)
            dst = torch.tensor([c[1] for c in copies], device=self.device)
            self.kv[:, :, dst] = self.kv[:, :, src]
        page_lists = [alloc._seqs[s].pages for s in seq_ids]
        q_lens = tuple(int(c) for c in num_new_tokens)
        k_lens = tuple(start + count for start, count in zip(old_lens, q_lens))
        cu = _cumsum(q_lens)  # on the host: nothing of the step's shape is read back from a tensor
        width = max((len(p) for p in page_lists), default=0)
        table = torch.tensor([p + [0] * (width - len(p)) for p in page_lists], dtype=torch.int32).reshape(len(seq_ids), width)
        # every new token: its sequence, its row among the sequence's new tokens, its absolute
        # position, and the slot its K/V goes to
        page_size = self.page_size
        if max(q_lens, default=0) <= 1:  # a thought or decode step: a few ints, cheaper on the host than ~15 ops
            steps = [(b, n) for b, (n, q) in enumerate(zip(old_lens, q_lens)) if q]
            seq_of_token = torch.tensor([b for b, _ in steps], dtype=torch.int64)
            row_of_token = torch.zeros(len(steps), dtype=torch.int64)
            positions = torch.tensor([n for _, n in steps], dtype=torch.int64)
            slots = torch.tensor([page_lists[b][n // page_size] * page_size + n % page_size for b, n in steps],
                                 dtype=torch.int64)
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(len(seq_ids)), torch.tensor(q_lens, dtype=torch.int64),
                                                   output_size=cu[-1])
            row_of_token = torch.arange(cu[-1]) - torch.tensor(cu[:-1], dtype=torch.int64)[seq_of_token]
            positions = torch.tensor(old_lens, dtype=torch.int64)[seq_of_token] + row_of_token
            slots = table[seq_of_token, positions // page_size].long() * page_size + positions % page_size
        dev = self.device
        strided = _strided_pages(page_lists)
        batch = AttentionBatch(
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            seq_lens_k=torch.tensor(k_lens, dtype=torch.int32, device=dev),
            block_table=table.to(dev),
            slot_mapping=slots.to(dev),
            positions=positions.to(dev),
            max_seqlen_q=max(q_lens, default=0),
            max_seqlen_k=max(k_lens, default=0),
            q_lens=q_lens,
            k_lens=k_lens,
            strided_pages=strided,
            kv_runs=kv_runs(page_lists, k_lens, self.page_size) if strided is None else None,
            every_slot_valid=True,
        )
        batch.memo("token_rows", lambda: (seq_of_token.to(dev), row_of_token.to(dev)))
        return batch


class ContiguousKVCache:
    """Per-layer K/V as contiguous `[B, kv_heads, length, D]` tensors grown by concatenation.

    This is how the official Coconut code caches (a Hugging Face cache sliced to the pass start and
    extended by each pass), kept only for the `multipass` reference mode: autograd keeps every
    concatenated copy alive, so its memory grows with each thought. `key_padding` `[B, length]`
    marks which key positions are real tokens, and `key_positions` `[B, length]` (where set) their
    positions in their sequences (what an attention-dropout mask is drawn for; default: the column).
    """

    def __init__(self, num_layers: int):
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.key_padding: torch.Tensor | None = None
        self.key_positions: torch.Tensor | None = None

    def crop(self, length: int) -> None:
        """Keep the first `length` positions of every layer (the official code slices the cache per pass)."""
        for layer, (k, v) in enumerate(zip(self.keys, self.values)):
            if k is not None:
                self.keys[layer], self.values[layer] = k[:, :, :length], v[:, :, :length]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: AttentionBatch, layer: int,
               scale: float, dropout=None) -> torch.Tensor:
        """Append this pass's K/V (every sequence has the same q_len) and attend, masking padding;
        `dropout` (an `AttentionDropout`) drops probabilities by the mask of the tokens' positions."""
        num_seqs, q_len = batch.num_seqs, batch.max_seqlen_q
        q = q.view(num_seqs, q_len, *q.shape[1:]).transpose(1, 2)
        k = k.view(num_seqs, q_len, *k.shape[1:]).transpose(1, 2)
        v = v.view(num_seqs, q_len, *v.shape[1:]).transpose(1, 2)
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        k_len = k.shape[2]
        causal = torch.arange(k_len, device=q.device)[None, :] <= torch.arange(k_len - q_len, k_len, device=q.device)[:, None]
        visible = causal[None, None] & self.key_padding[:, None, None, :k_len]
        if dropout is not None:
            k_pos = (self.key_positions[:, :k_len] if self.key_positions is not None
                     else torch.arange(k_len, device=q.device).expand(num_seqs, k_len))
            out = dropout_attention(q, k, v, visible, scale, dropout, dropout.rows,
                                    batch.positions.view(num_seqs, q_len), k_pos)
            return out.transpose(1, 2).reshape(num_seqs * q_len, *out.shape[1:2], out.shape[-1])
        # additive mask with a finite minimum: rows of left padding see no real key and stay finite
        mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~visible, torch.finfo(q.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
        return out.transpose(1, 2).reshape(num_seqs * q_len, *out.shape[1:2], out.shape[-1])
