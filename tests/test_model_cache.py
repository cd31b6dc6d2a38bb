"""Decoder on the paged cache: prefill + continuous thoughts + decode equals one no-cache forward."""
import pytest
import torch

from coconut_engine import AttentionBatch, PagedKVCache
from coconut_engine.loader import load_model
from tiny_models import build_hf_model

PROMPTS = [[5, 9, 2, 33, 14, 8, 71], [3, 4], list(range(40, 61)), [90, 91, 92, 93, 94]]
THOUGHTS = [2, 0, 4, 1]
DECODE = [[11, 12], [13, 14], [15, 16], [17, 18]]


def run_on_cache(model, page_size, pool_dtype=torch.float32):
    """Prefill, thought steps (hidden state fed back), decode steps; returns per-sequence hidden rows.

    The cache (pools of `pool_dtype`) and the token ids live on the model's device.
    """
    device = model.embed_tokens.weight.device
    cache = PagedKVCache(model.config, num_pages=64, page_size=page_size, dtype=pool_dtype, device=device)
    seqs = list(range(len(PROMPTS)))
    for s in seqs:
        cache.add_sequence(s)
    rows = {s: [] for s in seqs}
    inputs = {s: [] for s in seqs}  # what each position was fed, for the reference
    batch = cache.prepare(seqs, [len(p) for p in PROMPTS])
    hidden = model(batch, input_ids=torch.tensor(sum(PROMPTS, []), device=device), cache=cache)
    start = 0
    for s, p in zip(seqs, PROMPTS):
        rows[s] += list(hidden[start : start + len(p)])
        inputs[s] += [model.embed_tokens.weight[t] for t in p]
        start += len(p)
    for t in range(1, max(THOUGHTS) + 1):
        active = [s for s in seqs if THOUGHTS[s] >= t]
        batch = cache.prepare(seqs, [1 if s in active else 0 for s in seqs])  # inactive: in batch, no tokens
        thought = torch.stack([rows[s][-1] for s in active])
        hidden = model(batch, inputs_embeds=thought, cache=cache)
        for i, s in enumerate(active):
            inputs[s].append(thought[i])
            rows[s].append(hidden[i])
    for step in range(len(DECODE[0])):
        ids = [DECODE[s][step] for s in seqs]
        hidden = model(cache.prepare(seqs, [1] * len(seqs)), input_ids=torch.tensor(ids, device=device), cache=cache)
        for i, s in enumerate(seqs):
            inputs[s].append(model.embed_tokens.weight[ids[i]])
            rows[s].append(hidden[i])
    return rows, inputs


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cached_steps_equal_one_full_forward(family, backend, tmp_path):
    build_hf_model(family, tmp_path)
    model = load_model(tmp_path, attention_backend=backend)
    with torch.no_grad():
        rows, inputs = run_on_cache(model, page_size=4)
        seqs = sorted(rows)
        full = model(AttentionBatch.packed([len(inputs[s]) for s in seqs]),
                     inputs_embeds=torch.cat([torch.stack(inputs[s]) for s in seqs]))
        cached = torch.cat([torch.stack(rows[s]) for s in seqs])
        torch.testing.assert_close(cached, full, atol=1e-4, rtol=0)
        torch.testing.assert_close(model.logits(cached), model.logits(full), atol=1e-4, rtol=0)
