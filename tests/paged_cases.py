"""Random paged-attention problems: pools with permuted page ids, ragged prefixes and new tokens."""
from __future__ import annotations

import torch

from coconut_engine.cache import AttentionBatch, kv_runs


def make_case(group: int, head_dim: int, page_size: int, dtype: torch.dtype, prefix_lens, q_lens,
              num_kv_heads: int = 2, spare_pages: int = 3, requires_grad: bool = False, strided: bool = False,
              runs: str | None = None):
    """q `[T, heads, D]`, K/V pools and the AttentionBatch of one step on top of existing prefixes.

    Sequence b already holds `prefix_lens[b]` tokens and gets `q_lens[b]` new ones. Page ids are a
    random permutation of the pool, and the pool has unused pages (filled with junk) as well. With
    `strided`, row b owns instead the page run `1 + b * stride + [0, ..]` (`stride` one more than the
    longest row needs; junk pages around and between the runs), as a training cache lays it out.
    With `runs`, the batch carries each sequence's key runs (`AttentionBatch.kv_runs`, as
    `PagedKVCache.prepare` builds them): "permuted" over the permuted pages (runs of a page or a few),
    "consecutive" with each sequence's pages one run (in shuffled order of sequences, junk between).
    """
    k_lens = [p + q for p, q in zip(prefix_lens, q_lens)]
    pages_per_seq = [-(-k // page_size) for k in k_lens]
    num_pages = sum(pages_per_seq) + spare_pages
    perm = torch.randperm(num_pages).tolist()
    if strided:
        stride = max(pages_per_seq) + 1
        num_pages = 1 + stride * len(k_lens) + spare_pages
        strided_runs = [list(range(1 + b * stride, 1 + (b + 1) * stride)) for b in range(len(k_lens))]
    if runs == "consecutive":
        consecutive, start = {}, 1
        for b in torch.randperm(len(k_lens)).tolist():
            consecutive[b] = list(range(start, start + pages_per_seq[b]))
            start += pages_per_seq[b] + 1
        num_pages = start + spare_pages
    width = max(max(pages_per_seq), 1)
    table = torch.zeros(len(k_lens), width, dtype=torch.int32)
    slots, positions, cu = [], [], [0]
    for b, n in enumerate(pages_per_seq):
        if strided:
            pages = strided_runs[b][:n]
        elif runs == "consecutive":
            pages = consecutive[b]
        else:
            pages, perm = perm[:n], perm[n:]
        table[b, :n] = torch.tensor(pages, dtype=torch.int32)
        for pos in range(prefix_lens[b], k_lens[b]):
            slots.append(pages[pos // page_size] * page_size + pos % page_size)
        positions.extend(range(prefix_lens[b], k_lens[b]))
        cu.append(cu[-1] + q_lens[b])
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    k_pool = torch.randn(shape).to(dtype)
    v_pool = torch.randn(shape).to(dtype)
    q = torch.randn(cu[-1], num_kv_heads * group, head_dim).to(dtype)
    batch = AttentionBatch(
        cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
        seq_lens_k=torch.tensor(k_lens, dtype=torch.int32),
        block_table=table,
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        positions=torch.tensor(positions, dtype=torch.int64),
        max_seqlen_q=max(q_lens),
        max_seqlen_k=max(k_lens),
        q_lens=tuple(q_lens),
        k_lens=tuple(k_lens),
        strided_pages=(1, stride) if strided else None,
        kv_runs=kv_runs(table.tolist(), k_lens, page_size) if runs else None,
    )
    return q, k_pool, v_pool, batch
