"""Issue 18, generation: positions checked per request, pages released on every exit path, sampling
arguments validated up front, malformed prompts and counts as per-request errors."""
import pytest
import torch

from coconut_engine.coconut import SpecialTokens
from coconut_engine.errors import InvalidArgumentError
from coconut_engine.generate import Generator
from coconut_engine.loader import load_model
from tiny_models import build_hf_model

TOKENS = SpecialTokens(bot=150, thought=151, eot=152)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    build_hf_model("gpt2", path, n_positions=64)
    return load_model(path, attention_backend="torch")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_model("llama", path, max_position_embeddings=64)
    return load_model(path, attention_backend="torch")


def test_learned_positions_are_a_per_request_error(gpt2):
    gen = Generator(gpt2, max_pages=64, page_size=8, special_tokens=TOKENS)
    results = gen.generate([list(range(3, 70)), [5, 6, 7], [8, 9], [10, 11]], num_thoughts=[0, 0, 2000, 1],
                           max_new_tokens=4)
    assert results[0].finish_reason == "error"
    assert "request 0: 67 prompt tokens + 0 thoughts + 4 new tokens need 70 positions but the model's learned " \
           "positions stop at 64" in results[0].error
    assert "request 2: " in results[2].error and "learned positions stop at 64" in results[2].error
    assert [r.finish_reason for r in (results[1], results[3])] == ["length", "length"]
    assert gen.cache.num_free_pages == 64
    # exactly at the limit is allowed: 60 prompt tokens + 5 new use positions 0..63
    assert gen.generate([list(range(3, 63))], max_new_tokens=5)[0].finish_reason == "length"


def test_rope_past_its_trained_length_needs_permission(llama):
    prompt = list(range(3, 63))
    refused = Generator(llama, max_pages=64, page_size=8).generate([prompt], max_new_tokens=8)[0]
    assert refused.finish_reason == "error" and "past the model's max_position_embeddings=64" in refused.error
    allowed = Generator(llama, max_pages=64, page_size=8, allow_long_context=True).generate([prompt], max_new_tokens=8)
    assert allowed[0].finish_reason == "length" and len(allowed[0].token_ids) == 8


def test_an_exception_inside_generate_releases_every_page(gpt2, monkeypatch):
    gen = Generator(gpt2, max_pages=32, page_size=4, special_tokens=TOKENS)
    expected = gen.generate([[5, 6, 7], [8, 9]], num_thoughts=[1, 0], max_new_tokens=5, n=2)
    step, calls = Generator._step, {"n": 0}

    def fail_on_third_step(self, running, params):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("device lost")
        return step(self, running, params)

    monkeypatch.setattr(Generator, "_step", fail_on_third_step)
    with pytest.raises(RuntimeError, match="device lost"):
        gen.generate([[5, 6, 7], [8, 9]], num_thoughts=[1, 0], max_new_tokens=5, n=2)
    assert gen.cache.num_free_pages == 32 and gen.cache.allocator.sequence_ids() == []
    monkeypatch.undo()
    again = gen.generate([[5, 6, 7], [8, 9]], num_thoughts=[1, 0], max_new_tokens=5, n=2)
    assert [r.token_ids for r in again] == [r.token_ids for r in expected]


@pytest.mark.parametrize("kwargs,message", [
    ({"top_p": 0.0}, r"top_p must be > 0.0, got 0.0"),
    ({"top_p": 1.5}, r"top_p must be <= 1.0"),
    ({"top_k": -1}, r"top_k must be >= 0, got -1"),
    ({"temperature": -0.5}, r"temperature must be >= 0.0, got -0.5"),
    ({"temperature": float("nan")}, r"temperature must be finite"),
    ({"max_new_tokens": 2.5}, r"max_new_tokens must be an integer, got float 2.5"),
    ({"n": 0}, r"n must be >= 1, got 0"),
    ({"seed": "one"}, r"seed must be an integer"),
    ({"num_thoughts": [1, 2, 3]}, r"num_thoughts: 3 thought counts for 2 prompts"),
])
def test_sampling_arguments_are_checked_up_front(gpt2, kwargs, message):
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    with pytest.raises(InvalidArgumentError, match=message):
        gen.generate([[5, 6], [7, 8]], **{"temperature": 1.0, **kwargs})
    assert gen.cache.num_free_pages == 16


def test_malformed_prompts_and_counts_are_per_request_errors(gpt2):
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    results = gen.generate([[5, 6], [1.5, 2], None, [7, 8]], num_thoughts=[2.7, 0, 0, True], max_new_tokens=3)
    assert "request 0: num_thoughts must be an integer >= 0, got 2.7" in results[0].error
    assert "request 1: a prompt must be a string or a list of token ids" in results[1].error
    assert "request 2: a prompt must be a string or a list of token ids, got None" in results[2].error
    assert "request 3: num_thoughts must be an integer >= 0, got True" in results[3].error
    one = gen.generate([[5, 6]], num_thoughts=2.7, max_new_tokens=3)  # one count for all, not a list
    assert one[0].finish_reason == "error" and "got 2.7" in one[0].error
    # a single stop id is one stop, not an iterable to unpack
    greedy = gen.generate([[5, 6]], max_new_tokens=4)[0].token_ids
    assert gen.generate([[5, 6]], max_new_tokens=4, stop=greedy[1])[0].token_ids == greedy[: greedy.index(greedy[1]) + 1]


def test_any_sequence_of_thought_counts_is_one_count_per_prompt(gpt2):
    # a range or a numpy array is one count per prompt (as before the type checks), numpy ints are integers
    import numpy as np

    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    expected = [r.token_ids for r in gen.generate([[5, 6], [7, 8]], num_thoughts=[0, 1], max_new_tokens=3)]
    for counts in (range(2), np.array([0, 1]), (np.int64(0), np.int32(1))):
        results = gen.generate([[5, 6], [7, 8]], num_thoughts=counts, max_new_tokens=3)
        assert [r.error for r in results] == [None, None] and [r.token_ids for r in results] == expected
        assert [r.num_thoughts for r in results] == [0, 1]
    assert gen.generate([[7, 8]], num_thoughts=np.int64(1), max_new_tokens=3)[0].token_ids == expected[1]


def test_an_empty_stop_string_is_a_request_error(gpt2):
    # "" is in every text: before, every request silently stopped after its first token
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    result = gen.generate([[5, 6]], max_new_tokens=4, stop=["", 7])[0]
    assert result.finish_reason == "error" and "stop strings must not be empty" in result.error


def test_a_tiny_temperature_samples_the_argmax_instead_of_crashing(gpt2):
    # logits / 1e-39 overflowed to inf in float32 and torch.multinomial killed the whole batch
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    greedy = gen.generate([[5, 6], [7, 8]], max_new_tokens=3)
    for temperature in (1e-39, 1e-45, 1e-300, 5e-324):  # the last two are 0 in float32: 0 / 0 was NaN
        sampled = gen.generate([[5, 6], [7, 8]], max_new_tokens=3, temperature=temperature)
        assert [r.token_ids for r in sampled] == [r.token_ids for r in greedy]
    nucleus = gen.generate([[5, 6], [7, 8]], max_new_tokens=3, temperature=1.0, top_p=1e-300)  # keeps the top token
    assert [r.token_ids for r in nucleus] == [r.token_ids for r in greedy]


def test_a_prompt_that_is_not_valid_unicode_is_a_request_error(gpt2, tmp_path):
    # a lone surrogate (what undecodable command-line bytes become) made the tokenizer raise for the whole batch
    from coconut_engine.loader import load_tokenizer
    from test_tokenizer import build_gpt2_tokenizer_dir

    build_gpt2_tokenizer_dir(tmp_path)
    gen = Generator(gpt2, load_tokenizer(tmp_path), max_pages=16, page_size=4, special_tokens=TOKENS)
    bad, good = gen.generate(["! \ud800", "!"], max_new_tokens=2)  # "!" is token 0, inside the tiny vocabulary
    assert bad.finish_reason == "error" and "request 0: the prompt is not valid Unicode text" in bad.error
    assert good.error is None and len(good.token_ids) == 2


def test_one_string_as_prompts_is_refused_not_split_into_characters(gpt2):
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    with pytest.raises(InvalidArgumentError, match=r"prompts must be a list of prompts, got one str 'hello'"):
        gen.generate("hello", max_new_tokens=2)
    assert gen.cache.num_free_pages == 16


def test_api_arguments_of_the_wrong_kind_are_clear_errors(gpt2, tmp_path):
    with pytest.raises(InvalidArgumentError, match="model must be a Decoder .* or a CoconutModel, got NoneType"):
        Generator(None)
    with pytest.raises(InvalidArgumentError, match="model must be a Decoder .* got str"):
        Generator("some/folder")
    with pytest.raises(InvalidArgumentError, match="tokenizer must have encode/decode .* got str"):
        Generator(gpt2, "some/folder")
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    with pytest.raises(InvalidArgumentError, match="prompts must be a list of prompts, got NoneType"):
        gen.generate(None)
    with pytest.raises(InvalidArgumentError, match="eot_threshold must be a number, got str '0.5'"):
        gen.generate([[5, 6]], eot_threshold="0.5")
    with pytest.raises(InvalidArgumentError, match="thought_markers must be True, False or None, got 'no'"):
        gen.generate([[5, 6]], thought_markers="no")
    with pytest.raises(InvalidArgumentError, match="load_model: path must be a folder path, got NoneType"):
        load_model(None)
    with pytest.raises(InvalidArgumentError, match="load_model: attention_backend 'nope' is not one of"):
        load_model(tmp_path, attention_backend="nope")
    with pytest.raises(InvalidArgumentError, match="load_model: device 'foo' is not a torch device"):
        load_model(tmp_path, device="foo")


def test_api_values_that_worked_before_the_type_checks_still_do(gpt2, tmp_path):
    """A torch.compile'd model (its wrapper passes attributes through), numpy bools, 0-d tensors and
    attention_backend=None were accepted before the argument checks; they still are."""
    import numpy as np

    class Compiled:  # what torch.compile returns, without the compile time: the module under `_orig_mod`
        def __init__(self, module):
            self._orig_mod = module

        def __getattr__(self, name):
            return getattr(self._orig_mod, name)

        def __call__(self, *args, **kwargs):
            return self._orig_mod(*args, **kwargs)

    expected = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS).generate([[5, 6]], max_new_tokens=3)
    wrapped = Generator(Compiled(gpt2), max_pages=16, page_size=4, special_tokens=TOKENS)
    assert wrapped.generate([[5, 6]], max_new_tokens=3)[0].token_ids == expected[0].token_ids
    gen = Generator(gpt2, max_pages=16, page_size=4, special_tokens=TOKENS)
    odd = gen.generate([[5, 6]], max_new_tokens=3, thought_markers=np.bool_(False), eot_threshold=torch.tensor(0.5))
    assert odd[0].token_ids == expected[0].token_ids
    build_hf_model("gpt2", tmp_path, n_positions=64)
    auto = load_model(tmp_path, attention_backend=None)  # None is "auto", as Decoder takes it
    assert Generator(auto, max_pages=16, page_size=4, special_tokens=TOKENS).generate([[5, 6]], max_new_tokens=3)[0].error is None
