"""Page allocator and PagedKVCache: property tests against a dict-of-lists model, and unit cases."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coconut_engine import ModelConfig, OutOfPagesError, PagedKVCache
from coconut_engine.kernels import reference

CONFIG = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 4, "intermediate_size": 8,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
                                "vocab_size": 8})

ops = st.lists(
    st.tuples(st.sampled_from(["add", "extend", "fork", "free", "reserve"]), st.integers(0, 7), st.integers(0, 7),
              st.integers(1, 9)),
    min_size=1, max_size=40,
)


def snapshot(alloc):
    return (list(alloc._free), list(alloc._refs), {k: (list(s.pages), s.length) for k, s in alloc._seqs.items()})


def check_invariants(cache, model):
    alloc = cache.allocator
    holders = [0] * alloc.num_pages
    for seq_id in alloc.sequence_ids():
        for page in alloc.pages(seq_id):
            holders[page] += 1
    assert holders == alloc._refs  # every reference is a live sequence's page, and vice versa
    free = set(alloc._free)
    assert len(free) == len(alloc._free)
    assert all(holders[p] == 0 for p in free)  # a free page is referenced by nobody
    assert len(free) + sum(1 for h in holders if h) == alloc.num_pages  # no page is lost
    for seq_id, values in model.items():
        assert cache.seq_len(seq_id) == len(values)
        for layer in range(CONFIG.num_layers):
            table = torch.tensor(alloc.pages(seq_id) or [0], dtype=torch.int32)
            got = reference.gather_pages(cache.k_pool(layer), table, len(values))[:, 0, 0]
            assert got.tolist() == [float(v + layer) for v in values]


@settings(max_examples=60, deadline=None)
@given(ops=ops, page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(3, 12))
def test_random_operations_keep_contents_and_pages(ops, page_size, num_pages):
    cache = PagedKVCache(CONFIG, num_pages=num_pages, page_size=page_size)
    model: dict[int, list[int]] = {}
    next_value = 0
    for op, a, b, n in ops:
        before = snapshot(cache.allocator)
        if op == "add" and a not in model:
            cache.add_sequence(a)
            model[a] = []
        elif op == "fork" and a in model and b not in model:
            cache.fork(a, b)
            model[b] = list(model[a])
        elif op == "free" and a in model:
            cache.free(a)
            del model[a]
        elif op == "reserve" and a in model:
            try:
                cache.reserve(a, len(model[a]) + n)
            except OutOfPagesError:
                assert snapshot(cache.allocator) == before  # all or nothing
                continue
            assert len(cache.allocator.pages(a)) * page_size >= len(model[a]) + n
        elif op == "extend" and a in model:
            ids = [a] + ([b] if b in model and b != a else [])
            counts = [n, 1][: len(ids)]
            try:
                batch = cache.prepare(ids, counts)
            except OutOfPagesError:
                assert snapshot(cache.allocator) == before  # all or nothing
                continue
            values = list(range(next_value, next_value + sum(counts)))
            next_value += sum(counts)
            for layer in range(CONFIG.num_layers):
                kv = torch.tensor(values, dtype=torch.float32)[:, None, None].expand(-1, 1, 2) + layer
                reference.store_kv(kv, kv, cache.k_pool(layer), cache.v_pool(layer), batch.slot_mapping)
            model[a] += values[:n]
            if len(ids) == 2:
                model[b] += values[n:]
        check_invariants(cache, model)
    for seq_id in list(model):
        cache.free(seq_id)
    assert cache.num_free_pages == num_pages


def test_prepare_builds_step_metadata():
    cache = PagedKVCache(CONFIG, num_pages=8, page_size=4)
    for s in "abc":
        cache.add_sequence(s)
    cache.prepare(["a", "b", "c"], [5, 3, 0])
    batch = cache.prepare(["a", "b", "c"], [1, 2, 0])
    pages_a, pages_b = cache.allocator.pages("a"), cache.allocator.pages("b")
    assert batch.cu_seqlens_q.tolist() == [0, 1, 3, 3]
    assert batch.seq_lens_k.tolist() == [6, 5, 0]
    assert batch.positions.tolist() == [5, 3, 4]
    assert batch.slot_mapping.tolist() == [pages_a[1] * 4 + 1, pages_b[0] * 4 + 3, pages_b[1] * 4 + 0]
    assert batch.block_table.shape == (3, 2)
    assert (batch.max_seqlen_q, batch.max_seqlen_k) == (2, 6)
    assert batch.last_token_indices().tolist() == [0, 2]


def test_fork_shares_pages_and_copies_partial_page_on_write():
    cache = PagedKVCache(CONFIG, num_pages=8, page_size=4)
    cache.add_sequence(0)
    cache.prepare([0], [6])
    free_before = cache.num_free_pages
    for child in (1, 2, 3):
        cache.fork(0, child)
    assert cache.num_free_pages == free_before  # forks share every page
    shared_last = cache.allocator.pages(0)[-1]
    assert cache.allocator.ref_count(shared_last) == 4
    cache.kv[:, :, shared_last] = 7.0
    cache.prepare([1], [1])  # copy-on-write of the shared partial page
    own_last = cache.allocator.pages(1)[-1]
    assert own_last != shared_last and cache.allocator.pages(1)[0] == cache.allocator.pages(0)[0]
    assert torch.equal(cache.kv[:, :, own_last], cache.kv[:, :, shared_last])
    assert cache.allocator.ref_count(shared_last) == 3


def test_writers_of_a_shared_partial_page_need_one_copy_fewer_than_writers():
    """All forks of a sequence write their next token in one step: each copies the shared partly
    filled page except the last one left holding it, which writes in place, so the step fits a
    pool with one free page per copy (it was refused: n > 1 generation with a tight pool)."""
    cache = PagedKVCache(CONFIG, num_pages=4, page_size=4)
    cache.add_sequence(0)
    cache.prepare([0], [6])
    for child in (1, 2):
        cache.fork(0, child)
    first, shared_last = cache.allocator.pages(0)
    cache.kv[:, :, shared_last] = 7.0
    assert cache.num_free_pages == 2 and cache.allocator.pages_needed(2, 1) == 1
    batch = cache.prepare([0, 1, 2], [1, 1, 1])
    lasts = [cache.allocator.pages(s)[-1] for s in (0, 1, 2)]
    assert cache.num_free_pages == 0 and len(set(lasts)) == 3 and lasts[2] == shared_last
    assert all(cache.allocator.ref_count(page) == 1 for page in lasts) and cache.allocator.ref_count(first) == 3
    assert all(torch.equal(cache.kv[:, :, page], cache.kv[:, :, shared_last]) for page in lasts)
    assert sorted(batch.slot_mapping.tolist()) == sorted(page * 4 + 2 for page in lasts)
    cache.fork(0, 3)  # a fourth holder: now every writer copies, and the pool has no page left for it
    with pytest.raises(OutOfPagesError, match="needs 1 free pages, 0 of 4 are free"):
        cache.prepare([3], [1])


def test_out_of_pages_is_a_clear_error_and_changes_nothing():
    cache = PagedKVCache(CONFIG, num_pages=3, page_size=4)
    cache.add_sequence("x")
    cache.add_sequence("y")
    cache.prepare(["x"], [5])
    before = snapshot(cache.allocator)
    with pytest.raises(OutOfPagesError, match="needs 2 free pages, 1 of 3 are free"):
        cache.prepare(["x", "y"], [1, 5])
    assert snapshot(cache.allocator) == before


def test_bad_requests():
    cache = PagedKVCache(CONFIG, num_pages=3, page_size=4)
    cache.add_sequence(1)
    with pytest.raises(KeyError, match="already exists"):
        cache.add_sequence(1)
    with pytest.raises(KeyError, match="not in the cache"):
        cache.prepare([2], [1])
    with pytest.raises(ValueError, match="duplicate"):
        cache.prepare([1, 1], [1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        cache.prepare([1], [-1])


def test_reserved_sequences_are_strided_page_runs():
    """A training cache: every sequence reserves the same number of pages in order, so any prefix of
    the sequences (or any evenly spaced subset) forms strided runs, read as a view by the torch
    backend; other subsets do not."""
    cache = PagedKVCache(CONFIG, num_pages=20, page_size=4, requires_grad=True)
    cache.begin_training_step()
    for i in range(3):
        cache.add_sequence(i)
        cache.reserve(i, 4 * 4)
    assert [cache.allocator.pages(i) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert cache.prepare([0, 1, 2], [5, 9, 2]).strided_pages == (0, 4)
    assert cache.num_free_pages == 8  # the appends used the reserved pages
    assert cache.prepare([0, 1], [1, 1]).strided_pages == (0, 4)
    assert cache.prepare([0, 2], [1, 1]).strided_pages == (0, 8)
    assert cache.prepare([0, 2, 1], [1, 1, 1]).strided_pages is None
    assert cache.prepare([1, 0], [1, 1]).strided_pages is None
    cache.begin_training_step()  # a new step starts from page 0 again
    cache.add_sequence(0)
    cache.reserve(0, 3)
    assert cache.allocator.pages(0) == [0]


def test_fork_of_a_reserved_sequence_shares_only_written_pages():
    cache = PagedKVCache(CONFIG, num_pages=10, page_size=4)
    cache.add_sequence("a")
    cache.reserve("a", 12)
    cache.prepare(["a"], [6])  # pages 0 (full) and 1 (half) hold tokens, page 2 is reserved
    cache.fork("a", "b")
    assert cache.allocator.pages("b") == cache.allocator.pages("a")[:2]
    assert cache.allocator.ref_count(cache.allocator.pages("a")[2]) == 1
    cache.prepare(["a"], [1])  # the shared half page is copied before "a" writes into it
    pages_a, pages_b = cache.allocator.pages("a"), cache.allocator.pages("b")
    assert pages_a[0] == pages_b[0] and pages_a[1] != pages_b[1] and len(pages_a) == 3


def test_reserve_takes_a_run_of_pages_and_prepare_reports_key_runs():
    """`reserve` takes consecutive pages where the free list has a run of them (the Generator reserves
    each request's pages at admission, so its decode steps read the keys in place), even when the
    pages it would hand out next are not one; `prepare` reports each sequence's keys as runs of slots."""
    cache = PagedKVCache(CONFIG, num_pages=12, page_size=4)
    for name, tokens in (("a", 8), ("b", 4), ("c", 12), ("d", 4)):
        cache.add_sequence(name)
        cache.reserve(name, tokens)
    assert [cache.allocator.pages(s) for s in "abcd"] == [[0, 1], [2], [3, 4, 5], [6]]
    cache.free("b")
    cache.free("d")  # free list, next out first: 6, 2, then 7..11
    cache.add_sequence("e")
    cache.reserve("e", 12)
    assert cache.allocator.pages("e") == [6, 7, 8]  # not [6, 2, 7]: the lowest run of three
    cache.add_sequence("f")
    cache.reserve("f", 16)  # no run of four left: the pages in the order the free list hands them out
    assert cache.allocator.pages("f") == [2, 9, 10, 11]
    batch = cache.prepare(["a", "c", "e", "f"], [5, 9, 12, 14])
    assert batch.strided_pages is None
    assert batch.kv_runs == (((0, 5),), ((12, 9),), ((24, 12),), ((8, 4), (36, 10)))
    assert cache.prepare(["f"], [1]).kv_runs == (((8, 4), (36, 11)),)


def test_prepare_hands_the_layers_its_token_rows_and_valid_slots():
    """`prepare` already knows each new token's sequence and row: the batch carries them (memoised
    for every layer, equal to what `token_rows` derives from the lengths), and it marks every slot
    valid (a store need not check for -1 on the device); a batch without a cache promises nothing."""
    from coconut_engine.cache import AttentionBatch

    cache = PagedKVCache(CONFIG, num_pages=16, page_size=4)
    for seq in range(3):
        cache.add_sequence(seq)
    cache.prepare([0, 1, 2], [5, 2, 7])
    batch = cache.prepare([0, 1, 2], [3, 0, 1])
    assert batch.every_slot_valid
    seq, row = batch.token_rows()
    derived = AttentionBatch.packed(batch.q_lens).token_rows()
    assert seq.tolist() == derived[0].tolist() == [0, 0, 0, 2]
    assert row.tolist() == derived[1].tolist() == [0, 1, 2, 0]
    assert batch.positions.tolist() == [5, 6, 7, 7]
    assert not AttentionBatch.packed([2, 3]).every_slot_valid


def test_one_token_step_metadata_equals_the_general_steps():
    """A step of at most one new token per sequence (a thought, a decode step) builds its positions,
    slots and token rows on the host: they equal the general path's (the same sequences given one
    token each in a step that also gives one of them two, whose other rows are then the same) and
    the block table's, across page boundaries and with a sequence that gets no token."""
    from coconut_engine.cache import AttentionBatch

    page = 4
    lens = [page - 1, page, page + 1, 2, 7]
    one, general = (PagedKVCache(CONFIG, num_pages=32, page_size=page) for _ in range(2))
    for cache in (one, general):
        for seq, n in enumerate(lens):
            cache.add_sequence(seq)
            cache.prepare([seq], [n])
    counts = [1, 1, 0, 1, 1]
    batch = one.prepare(list(range(5)), counts)
    wide = general.prepare(list(range(5)), counts[:-1] + [2])  # two tokens: the vectorised path
    assert batch.max_seqlen_q == 1 and wide.max_seqlen_q == 2
    assert batch.positions.tolist() == wide.positions.tolist()[:-1] == [3, 4, 2, 7]
    assert batch.slot_mapping.tolist() == wide.slot_mapping.tolist()[:-1]
    table = batch.block_table.tolist()
    assert batch.slot_mapping.tolist() == [table[b][p // page] * page + p % page
                                           for b, p in zip([0, 1, 3, 4], [3, 4, 2, 7])]
    seq, row = batch.token_rows()
    derived = AttentionBatch.packed(batch.q_lens).token_rows()
    assert seq.tolist() == derived[0].tolist() == [0, 1, 3, 4]
    assert row.tolist() == derived[1].tolist() == [0, 0, 0, 0]
    assert batch.seq_lens_k.tolist() == [4, 5, 5, 3, 8] and batch.every_slot_valid


def test_a_cache_too_large_to_allocate_is_a_clear_error(monkeypatch):
    from coconut_engine.errors import InvalidArgumentError

    # more than the machine's whole memory: refused before the page list (one entry per page) is built
    with pytest.raises(InvalidArgumentError, match=r"a paged KV cache of 1000000000000 pages x 16 tokens needs "
                                                   r"[0-9.]+ GiB, more than the [0-9.]+ GiB of cpu"):
        PagedKVCache(CONFIG, num_pages=10**12, page_size=16)
    with pytest.raises(InvalidArgumentError, match="num_pages must be an integer"):
        PagedKVCache(CONFIG, num_pages=2.5, page_size=16)

    def refuse(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes")

    monkeypatch.setattr(torch, "zeros", refuse)  # what an allocation that does not fit raises
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator") as failed:  # the type stays: OOM handlers see it
        PagedKVCache(CONFIG, num_pages=4, page_size=16)
    assert failed.value.__notes__ == ["while allocating a paged KV cache of 4 pages x 16 tokens (0.00 GiB on cpu)"]
