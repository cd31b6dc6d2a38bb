"""Batched generation on the paged cache: parity with transformers and with the no-cache thought
reference, independence from batch composition / pool / page size, seeded sampling, n > 1, errors."""
import pytest
import torch

from coconut_engine.coconut import SpecialTokens
from coconut_engine.generate import Generator, generate_no_cache
from coconut_engine.loader import load_model
from tiny_models import CORE_FAMILIES, build_hf_model

TOKENS = SpecialTokens(bot=150, thought=151, eot=152)
LENGTHS = [3, 17, 5, 40, 1, 9, 23, 12]
THOUGHTS = [1, 2, 3, 4, 5, 6, 0, 2]


def make_prompts(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 140, (n,), generator=gen).tolist() for n in LENGTHS]


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def models(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    hf = build_hf_model(request.param, path)
    return hf, load_model(path, attention_backend="torch")


def test_greedy_equals_transformers_generate(models):
    hf, decoder = models
    gen = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
    prompts = make_prompts()
    results = gen.generate(prompts, max_new_tokens=12)
    for prompt, result in zip(prompts, results):
        ids = torch.tensor([prompt])
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                           pad_token_id=159)[0, len(prompt):].tolist()
        if result.finish_reason == "eos":
            want = want[: len(result.token_ids)]
        assert result.token_ids == want
        assert result.finish_reason in ("eos", "length") and result.prompt_tokens == len(prompt)
    assert gen.cache.num_free_pages == 64


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_thoughts_equal_the_no_cache_reference(models, backend):
    _, decoder = models
    decoder.attention_backend = backend
    try:
        gen = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
        prompts = make_prompts()
        results = gen.generate(prompts, num_thoughts=THOUGHTS, max_new_tokens=8)
    finally:
        decoder.attention_backend = "torch"
    for prompt, k, result in zip(prompts, THOUGHTS, results):
        assert result.token_ids == generate_no_cache(decoder, prompt, k, 8, TOKENS, eos_ids=gen.eos_ids)
        assert result.num_thoughts == k
    assert gen.cache.num_free_pages == 64


def test_the_last_thought_and_eot_share_a_decoder_call(models, monkeypatch):
    """k thoughts cost k decoder calls, not k + 1: a sequence's last thought and its <eot> are one
    step (fixed counts and adaptive thinking at its bound), with the same tokens as the no-cache
    reference; a batch whose sequences end their thoughts at different steps mixes such steps with
    one-row ones."""
    _, decoder = models
    steps = []
    forward = decoder.forward

    def counting_forward(batch, *args, **kwargs):
        steps.append(list(batch.q_lens))
        return forward(batch, *args, **kwargs)

    monkeypatch.setattr(decoder, "forward", counting_forward)
    gen = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
    prompt = make_prompts()[1]
    for k in (1, 3):
        steps.clear()
        result = gen.generate([prompt], num_thoughts=k, max_new_tokens=5)[0]
        # prefill (prompt + <bot>), k - 1 one-row thought steps, [last thought, <eot>], a step per token after the first
        assert steps == [[len(prompt) + 1]] + [[1]] * (k - 1) + [[2]] + [[1]] * (len(result.token_ids) - 1)
        assert result.token_ids == generate_no_cache(decoder, prompt, k, 5, TOKENS, eos_ids=gen.eos_ids)
    steps.clear()
    adaptive = gen.generate([prompt], num_thoughts="auto", max_thoughts=2, eot_threshold=1.0, max_new_tokens=5)[0]
    assert adaptive.num_thoughts == 2 and len(steps) == 2 + len(adaptive.token_ids)
    assert adaptive.token_ids == generate_no_cache(decoder, prompt, 2, 5, TOKENS, eos_ids=gen.eos_ids)
    steps.clear()
    prompts = make_prompts()[:3]
    results = gen.generate(prompts, num_thoughts=[1, 3, 0], max_new_tokens=5)
    assert [2, 1, 1] in steps and [1, 2, 1] in steps  # the 1- and 3-thought sequences' last-thought steps
    assert len(steps) == max(k + len(r.token_ids) for k, r in zip([1, 3, 0], results))
    for prompt, k, result in zip(prompts, [1, 3, 0], results):
        assert result.token_ids == generate_no_cache(decoder, prompt, k, 5, TOKENS, eos_ids=gen.eos_ids)


def test_one_token_steps_read_the_pages_in_place(models, monkeypatch):
    """Ragged prompts: every thought and decode step (and a last thought with its <eot>, two tokens)
    reads each sequence's K/V as views of the pool (its pages reserved as one run at admission; a
    forked copy's as several), never through a gather of pages padded to the longest sequence; only
    the prefill gathers. Greedy results still equal the no-cache reference."""
    from coconut_engine.kernels import torch_backend

    _, decoder = models
    original = torch_backend._token_major_kv

    def token_major_kv(pool, batch, *args):
        assert batch.max_seqlen_q > torch_backend.RUNS_MAX_Q, f"a step of {batch.q_lens} new tokens gathered the pages"
        return original(pool, batch, *args)

    monkeypatch.setattr(torch_backend, "_token_major_kv", token_major_kv)
    gen = Generator(decoder, max_pages=160, page_size=4, special_tokens=TOKENS)
    prompts = make_prompts()
    results = gen.generate(prompts, num_thoughts=THOUGHTS, max_new_tokens=8, n=2)
    for i, (prompt, k) in enumerate(zip(prompts, THOUGHTS)):
        want = generate_no_cache(decoder, prompt, k, 8, TOKENS, eos_ids=gen.eos_ids)
        assert results[2 * i].token_ids == want and results[2 * i + 1].token_ids == want
    assert gen.cache.num_free_pages == 160


def test_results_do_not_depend_on_batch_pool_or_page_size(models):
    _, decoder = models
    prompts = make_prompts()
    runs = []
    for max_pages, page_size in [(64, 4), (16, 4), (40, 8), (24, 16)]:  # 16 x 4 forces queueing
        gen = Generator(decoder, max_pages=max_pages, page_size=page_size, special_tokens=TOKENS)
        runs.append([r.token_ids for r in gen.generate(prompts, num_thoughts=THOUGHTS, max_new_tokens=8)])
        assert all(r for r in runs[-1])
        assert gen.cache.num_free_pages == max_pages
    alone = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
    runs.append([alone.generate([p], num_thoughts=k, max_new_tokens=8)[0].token_ids for p, k in zip(prompts, THOUGHTS)])
    runs.append(list(reversed([r.token_ids for r in alone.generate(prompts[::-1], num_thoughts=THOUGHTS[::-1],
                                                                     max_new_tokens=8)])))
    assert all(run == runs[0] for run in runs)


def test_sampling_is_seeded_per_request(models):
    _, decoder = models
    gen = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
    prompts = make_prompts()
    alone = gen.generate([prompts[1]], num_thoughts=2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    batched = gen.generate(prompts, num_thoughts=2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    assert alone[0].token_ids == batched[1].token_ids
    other = gen.generate([prompts[1]], num_thoughts=2, max_new_tokens=10, temperature=1.0, top_p=0.9, seed=8)
    assert other[0].token_ids != alone[0].token_ids


def test_n_samples_share_the_prompt_pages(models):
    _, decoder = models
    gen = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
    prompt = make_prompts()[3]  # 40 tokens
    results = gen.generate([prompt], num_thoughts=2, max_new_tokens=6, temperature=1.0, top_k=20, n=4, seed=1)
    assert len(results) == 4 and len({tuple(r.token_ids) for r in results}) > 1
    # prompt + <bot> + 2 thoughts + <eot> = 44 tokens = 11 full pages, shared; each copy then writes
    # its first 5 sampled tokens (the 6th is never fed back): 49 tokens, 2 pages of its own.
    assert gen.peak_pages_in_use == 11 + 4 * 2
    assert gen.cache.num_free_pages == 64
    greedy = gen.generate([prompt], num_thoughts=2, max_new_tokens=6, n=3)
    assert greedy[0].token_ids == greedy[1].token_ids == greedy[2].token_ids


def test_n_samples_run_in_a_pool_of_exactly_their_reservation(models):
    """A request's n copies share a partly filled last page and all write their first sampled token in
    one step: the last copy left holding the page writes in place, so a pool of exactly the pages the
    request reserves (one per copy here) is enough (it raised OutOfPagesError mid-generate)."""
    _, decoder = models
    prompt = make_prompts()[0][:3]
    gen = Generator(decoder, max_pages=3, page_size=16, special_tokens=TOKENS)
    results = gen.generate([prompt], num_thoughts=1, max_new_tokens=4, n=3)
    alone = Generator(decoder, max_pages=64, page_size=16, special_tokens=TOKENS).generate([prompt], num_thoughts=1,
                                                                                           max_new_tokens=4)[0]
    assert [r.token_ids for r in results] == [alone.token_ids] * 3 and gen.cache.num_free_pages == 3


def test_bad_requests_get_errors_and_the_rest_completes(models):
    _, decoder = models
    gen = Generator(decoder, max_pages=8, page_size=4, special_tokens=TOKENS)
    prompts = [[], [5, 6, 7], list(range(3, 60)), [8, 9], [10, 11]]
    results = gen.generate(prompts, num_thoughts=[0, -1, 0, 1, 2], max_new_tokens=4)
    assert results[0].finish_reason == "error" and "request 0: the prompt is empty" in results[0].error
    assert "request 1: num_thoughts must be an integer >= 0" in results[1].error
    assert "request 2: needs up to 15 pages" in results[2].error  # 57 + 3 fed new tokens = 60 tokens
    assert [r.finish_reason for r in results[3:]] == ["length", "length"]
    bad_stop = gen.generate([[5, 6]], max_new_tokens=4, stop=[3.5])
    assert bad_stop[0].finish_reason == "error" and "stop entries must be" in bad_stop[0].error
    plain = Generator(decoder, max_pages=8, page_size=4)
    assert "thoughts need the special tokens" in plain.generate([[5, 6]], num_thoughts=1, max_new_tokens=2)[0].error
    unmarked = plain.generate([[5, 6]], num_thoughts=1, thought_markers=False, max_new_tokens=2)[0]
    assert "thoughts need the special tokens" in unmarked.error  # it raised AttributeError
    assert gen.cache.num_free_pages == 8


def test_thoughts_without_markers_fit_the_positions_and_pages_exactly(tmp_path):
    """Without markers no <eot> is fed, so none is counted: 10 prompt tokens + 2 thoughts + 5 new tokens
    (the last never fed back) take exactly a 16-position model's positions and 4 pages of 4 (the request
    was refused, sized for an <eot>); with markers the same request needs 18 and is refused by name."""
    build_hf_model("gpt2", tmp_path, n_positions=16)
    decoder = load_model(tmp_path, attention_backend="torch")
    gen = Generator(decoder, max_pages=4, page_size=4, special_tokens=TOKENS)
    prompt = list(range(3, 13))
    result = gen.generate([prompt], num_thoughts=2, thought_markers=False, max_new_tokens=5)[0]
    assert result.error is None and len(result.token_ids) >= 1
    assert result.token_ids == generate_no_cache(decoder, prompt, 2, 5, TOKENS, eos_ids=gen.eos_ids,
                                                 thought_markers=False)
    marked = gen.generate([prompt], num_thoughts=2, max_new_tokens=5)[0]
    assert "need 18 positions but the model's learned positions stop at 16" in marked.error


def test_thoughts_without_markers_equal_the_no_cache_reference(models):
    """thought_markers=False: the thoughts follow the prompt with no <bot> before them and no <eot>
    after them (the first token is sampled from the last thought's output), as the reference does."""
    _, decoder = models
    gen = Generator(decoder, max_pages=64, page_size=4, special_tokens=TOKENS)
    prompts = make_prompts()[:4]
    results = gen.generate(prompts, num_thoughts=[1, 2, 0, 3], thought_markers=False, max_new_tokens=5)
    for prompt, k, result in zip(prompts, [1, 2, 0, 3], results):
        assert result.token_ids == generate_no_cache(decoder, prompt, k, 5, TOKENS, eos_ids=gen.eos_ids,
                                                     thought_markers=False)
        assert result.num_thoughts == k


def test_stop_tokens_and_strings(tmp_path):
    import transformers

    from coconut_engine.loader import load_tokenizer
    from test_tokenizer import build_gpt2_tokenizer_dir

    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50257, n_positions=128)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path)
    tokenizer = load_tokenizer(build_gpt2_tokenizer_dir(tmp_path))
    gen = Generator(load_model(tmp_path), tokenizer, max_pages=32, page_size=8)
    free = gen.generate(["Every wumpus is a"], max_new_tokens=8, temperature=1.0, seed=3)[0]
    assert free.finish_reason == "length" and free.text == tokenizer.decode(free.token_ids)
    stop_id = free.token_ids[3]
    by_id = gen.generate(["Every wumpus is a"], max_new_tokens=8, temperature=1.0, seed=3, stop=[stop_id])[0]
    assert by_id.finish_reason == "stop" and by_id.token_ids == free.token_ids[: free.token_ids.index(stop_id) + 1]
    stop_text = tokenizer.decode(free.token_ids[2:4])
    by_text = gen.generate(["Every wumpus is a"], max_new_tokens=8, temperature=1.0, seed=3, stop=[stop_text])[0]
    assert by_text.finish_reason == "stop" and stop_text not in by_text.text
    assert free.text.startswith(by_text.text)
