"""Thoughts in generation: every thought transform equals the no-cache reference, inspection returns
the known nearest tokens, and adaptive thinking stops sequences at different steps in one batch
exactly as one-at-a-time runs do."""
import pytest
import torch

from coconut_engine.cache import AttentionBatch
from coconut_engine.coconut import CoconutModel
from coconut_engine.generate import Generator, generate_no_cache
from coconut_engine.loader import load_model
from coconut_engine.thoughts import THOUGHT_TRANSFORMS, build_thought_transform
from test_generate import TOKENS, make_prompts
from test_thought_transform import perturbed
from tiny_models import build_hf_model

THOUGHTS = [1, 2, 3, 4, 5, 6, 0, 2]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_model("llama", path)
    return load_model(path, attention_backend="torch")


@pytest.mark.parametrize("kind", sorted(THOUGHT_TRANSFORMS))
def test_generation_equals_the_no_cache_reference_for_every_variant(decoder, kind):
    transform = perturbed(kind, decoder)
    gen = Generator(CoconutModel(decoder, TOKENS, thought_transform=transform), max_pages=64, page_size=4)
    prompts = make_prompts()
    results = gen.generate(prompts, num_thoughts=THOUGHTS, max_new_tokens=6)
    differs = False
    for prompt, k, result in zip(prompts, THOUGHTS, results):
        want = generate_no_cache(decoder, prompt, k, 6, TOKENS, eos_ids=gen.eos_ids, thought_transform=transform)
        assert result.token_ids == want and result.num_thoughts == k
        differs |= want != generate_no_cache(decoder, prompt, k, 6, TOKENS, eos_ids=gen.eos_ids)
    assert differs or kind == "identity"  # the transform matters, so the comparison has teeth


def no_cache_hidden(decoder, inputs: torch.Tensor) -> torch.Tensor:
    """The last hidden state of one sequence of input embeddings, without a cache."""
    return decoder(AttentionBatch.packed([len(inputs)]), inputs_embeds=inputs)[-1]


def test_inspection_returns_known_nearest_tokens(decoder):
    """A linear transform that maps every hidden state to one fixed vector: 40 x the LM-head row of
    token 42 plus 25 x that of token 7. Through the LM head the thought's nearest tokens are then 42,
    then 7, with the softmax probabilities of that vector's logits; p(<eot>) is that of the hidden
    state before each thought (checked against a no-cache forward)."""
    transform = build_thought_transform("linear", decoder.embed_tokens.weight)
    head = decoder.lm_head_weight.detach()
    target = 40 * head[42] + 25 * head[7]
    with torch.no_grad():
        transform.proj.weight.zero_()
        transform.proj.bias.copy_(target)
    coconut = CoconutModel(decoder, TOKENS, thought_transform=transform)
    prompts = make_prompts()[:3]
    results = Generator(coconut, max_pages=64, page_size=4).generate(
        prompts, num_thoughts=[2, 3, 1], max_new_tokens=2, return_thoughts=True, thought_top_k=3)
    probs = torch.softmax(target @ head.t(), dim=-1)
    top = torch.topk(probs, 3)
    assert top.indices.tolist()[:2] == [42, 7]
    for prompt, k, result in zip(prompts, [2, 3, 1], results):
        assert len(result.thoughts) == k
        inputs = decoder.embed_tokens.weight[prompt + [TOKENS.bot]].detach()
        for trace in result.thoughts:
            assert [t for t, _, _ in trace.top_tokens] == top.indices.tolist()
            assert [p for _, _, p in trace.top_tokens] == pytest.approx(top.values.tolist(), rel=1e-5)
            assert trace.norm == pytest.approx(float(target.norm()), rel=1e-6)
            with torch.no_grad():
                p_eot = torch.softmax(decoder.logits(no_cache_hidden(decoder, inputs)[None]), dim=-1)[0, TOKENS.eot]
            assert trace.p_eot == pytest.approx(float(p_eot), rel=1e-4)
            inputs = torch.cat([inputs, target[None]])
    assert Generator(coconut, max_pages=64, page_size=4).generate(prompts, num_thoughts=2)[0].thoughts is None


def test_adaptive_thinking_stops_sequences_at_different_steps(decoder):
    """With `num_thoughts="auto"` each sequence leaves the thought phase before the first thought whose
    p(<eot>) exceeds the threshold. A threshold between the observed values makes the batch's
    sequences stop at different steps; the batch equals one-at-a-time runs and the no-cache reference
    with each sequence's own count."""
    with torch.no_grad():
        decoder.lm_head.weight[TOKENS.eot] *= 8  # p(<eot>) far from uniform, so it varies across steps
    try:
        gen = Generator(CoconutModel(decoder, TOKENS, thought_transform=perturbed("gated", decoder)),
                        max_pages=128, page_size=4)
        prompts = make_prompts()
        traced = gen.generate(prompts, num_thoughts=6, max_new_tokens=1, return_thoughts=True)
        values = sorted(t.p_eot for r in traced for t in r.thoughts)
        threshold = (values[len(values) // 2 - 1] + values[len(values) // 2]) / 2
        expected = [next((t for t, tr in enumerate(r.thoughts) if tr.p_eot > threshold), 6) for r in traced]
        assert len(set(expected)) >= 3

        batch = gen.generate(prompts, num_thoughts="auto", max_thoughts=6, eot_threshold=threshold, max_new_tokens=6)
        assert [r.num_thoughts for r in batch] == expected
        for prompt, want, result in zip(prompts, expected, batch):
            alone = gen.generate([prompt], num_thoughts="auto", max_thoughts=6, eot_threshold=threshold,
                                 max_new_tokens=6)[0]
            assert (alone.token_ids, alone.num_thoughts) == (result.token_ids, result.num_thoughts)
            assert result.token_ids == generate_no_cache(decoder, prompt, want, 6, TOKENS, eos_ids=gen.eos_ids,
                                                         thought_markers=True, thought_transform=gen.thought_transform)
        capped = gen.generate(prompts, num_thoughts="auto", max_thoughts=2, eot_threshold=threshold, max_new_tokens=1)
        assert [r.num_thoughts for r in capped] == [min(k, 2) for k in expected]
        assert gen.cache.num_free_pages == 128
    finally:
        with torch.no_grad():
            decoder.lm_head.weight[TOKENS.eot] /= 8


def test_bad_thought_arguments(decoder):
    gen = Generator(decoder, max_pages=16, page_size=4, special_tokens=TOKENS)
    result = gen.generate([[5, 6]], num_thoughts="sometimes")[0]
    assert result.finish_reason == "error" and "'auto'" in result.error
    with pytest.raises(ValueError, match="eot_threshold"):
        gen.generate([[5, 6]], num_thoughts="auto", eot_threshold=1.5)
    with pytest.raises(ValueError, match="max_thoughts"):
        gen.generate([[5, 6]], num_thoughts="auto", max_thoughts=-1)


def test_nearest_tokens_of_thoughts_use_the_thought_transform(decoder):
    """`thought_tokens.nearest_tokens_of_thoughts` (the notebook's view of the thoughts) feeds back what
    the model's transform makes, as generation does: its nearest tokens and probabilities are those
    of `generate(..., return_thoughts=True)`. (It used to feed the raw hidden state back and decode
    that: another model's thoughts for any transform but the identity.)"""
    from coconut_engine.thought_tokens import nearest_tokens_of_thoughts

    class Ids:  # a stand-in tokenizer: the prompt's ids, a token's text is its id
        def __init__(self, ids):
            self.ids = ids

        def encode(self, text, add_special_tokens=False):
            return list(self.ids)

        def decode(self, ids):
            return str(ids[0])

    transform = perturbed("linear", decoder, seed=3)
    prompt = make_prompts()[1]
    trace = Generator(CoconutModel(decoder, TOKENS, thought_transform=transform), max_pages=64, page_size=4).generate(
        [prompt], num_thoughts=3, max_new_tokens=1, return_thoughts=True, thought_top_k=3)[0].thoughts
    found = nearest_tokens_of_thoughts(decoder, Ids(prompt), TOKENS, "q", 3, top=3, page_size=4,
                                       thought_transform=transform)
    assert [n.tokens for n in found] == [tuple(str(t) for t, _, _ in tr.top_tokens) for tr in trace]
    for n, tr in zip(found, trace):
        assert list(n.probs) == pytest.approx([p for _, _, p in tr.top_tokens], rel=1e-4, abs=1e-6)
    identity = nearest_tokens_of_thoughts(decoder, Ids(prompt), TOKENS, "q", 3, top=3, page_size=4)
    assert [n.tokens for n in identity] != [n.tokens for n in found]  # the transform matters here


def test_generation_passes_each_sequence_its_own_thought_index(decoder):
    """A variant reading the thought index (`uses_index`): in one generation step the sequences are at
    different thoughts, each gets its own index, and the batch equals the no-cache reference."""
    from test_thought_transform import IndexedThought

    transform = IndexedThought(64, seed=1)
    # a small pool: requests join as others finish, so one step holds sequences at different thoughts
    gen = Generator(CoconutModel(decoder, TOKENS, thought_transform=transform), max_pages=24, page_size=4)
    prompts = make_prompts()
    results = gen.generate(prompts, num_thoughts=THOUGHTS, max_new_tokens=5)
    assert all(r.error is None for r in results)
    assert any(len(set(call)) > 1 for call in transform.seen)  # mixed indices within a step
    assert sorted(i for call in transform.seen for i in call) == sorted(i for k in THOUGHTS for i in range(k))
    differs = False
    for prompt, k, result in zip(prompts, THOUGHTS, results):
        want = generate_no_cache(decoder, prompt, k, 5, TOKENS, eos_ids=gen.eos_ids, thought_transform=transform)
        assert result.token_ids == want
        differs |= want != generate_no_cache(decoder, prompt, k, 5, TOKENS, eos_ids=gen.eos_ids)
    assert differs
