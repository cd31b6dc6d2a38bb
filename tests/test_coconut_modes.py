"""The four Coconut forward modes compute the same loss and parameter gradients."""
import pytest
import torch

from coconut_engine.coconut import CoconutModel, CoconutSample, SpecialTokens, add_special_tokens
from coconut_engine.linear import DeferredWeightGrads
from coconut_engine.loader import load_model
from tiny_models import CORE_FAMILIES, build_hf_model

TOKENS = SpecialTokens(bot=150, thought=151, eot=152)


def ragged_samples(seed=1):
    """Prompt lengths differ; thought counts 0..4 differ; one sample has no markers at all (CoT-like)."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(0, 140, (n,), generator=gen).tolist()

    return [
        CoconutSample(ids(7) + [TOKENS.bot], 2, [TOKENS.eot] + ids(5)),
        CoconutSample(ids(3) + [TOKENS.bot], 0, [TOKENS.eot] + ids(8)),
        CoconutSample(ids(12) + [TOKENS.bot], 4, [TOKENS.eot] + ids(3)),
        CoconutSample(ids(5) + [TOKENS.bot], 1, [TOKENS.eot] + ids(6)),
        CoconutSample(ids(9), 0, ids(4)),
    ]


def loss_and_grads(model, samples, mode):
    model.zero_grad()
    loss = model(samples, mode=mode)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module", params=CORE_FAMILIES)
def coconut(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param, path)
    return CoconutModel(load_model(path, attention_backend="torch"), TOKENS, page_size=4)


@pytest.fixture(scope="module")
def reference_result(coconut):
    coconut.decoder.attention_backend = "torch"
    return loss_and_grads(coconut, ragged_samples(), "paged")


@pytest.mark.parametrize("mode,backend", [
    ("paged", "triton"), ("two_pass", "torch"), ("two_pass", "triton"), ("multipass", "torch"), ("recompute", "torch"),
])
def test_modes_agree(coconut, reference_result, mode, backend):
    coconut.decoder.attention_backend = backend
    loss, grads = loss_and_grads(coconut, ragged_samples(), mode)
    ref_loss, ref_grads = reference_result
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, grad in grads.items():
        ref = ref_grads[name]
        assert (grad - ref).norm() <= 1e-4 * ref.norm() + 1e-12, name
    coconut.decoder.attention_backend = "torch"


@pytest.mark.parametrize("mode", ["paged", "multipass"])
def test_deferred_weight_gradients_agree(coconut, reference_result, mode):
    """The tiny test models (hidden 64) train without deferred weight gradients by default; with them
    (as models from hidden DEFER_WEIGHT_GRADS_MIN_HIDDEN on do) loss and gradients are the same."""
    assert not coconut.defers_weight_grads
    coconut.defer_weight_grads = True
    try:
        loss, grads = loss_and_grads(coconut, ragged_samples(), mode)
    finally:
        coconut.defer_weight_grads = None
    ref_loss, ref_grads = reference_result
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for name, grad in grads.items():
        assert (grad - ref_grads[name]).norm() <= 1e-4 * ref_grads[name].norm() + 1e-12, name


def test_weight_gradients_are_deferred_from_a_hidden_size_on(coconut, monkeypatch):
    """By default a training forward defers weight gradients only from DEFER_WEIGHT_GRADS_MIN_HIDDEN on
    (below it the alias and record nodes cost more than the products they merge)."""
    from coconut_engine import coconut as coconut_module

    made = []
    monkeypatch.setattr(coconut_module, "DeferredWeightGrads", lambda: made.append(1) or DeferredWeightGrads())
    hidden = coconut.decoder.config.hidden_size
    for threshold, deferred in ((hidden + 1, False), (hidden, True)):
        monkeypatch.setattr(coconut_module, "DEFER_WEIGHT_GRADS_MIN_HIDDEN", threshold)
        made.clear()
        coconut(ragged_samples(), mode="paged").backward()
        assert made == ([1] if deferred else [])
        with torch.no_grad():
            coconut(ragged_samples(), mode="paged")
        assert made == ([1] if deferred else [])  # never without autograd


def test_batch_without_thoughts_is_one_paged_step(coconut, monkeypatch):
    """Stage 0 (no sample has thoughts): prompts and suffixes run as one packed step, and the loss and
    gradients equal the no-cache forward's."""
    samples = [CoconutSample(s.prompt, 0, s.suffix) for s in ragged_samples(seed=3)]
    recompute = loss_and_grads(coconut, samples, "recompute")
    calls = []
    forward = type(coconut.decoder).forward
    monkeypatch.setattr(type(coconut.decoder), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    loss, grads = loss_and_grads(coconut, samples, "paged")
    assert len(calls) == 1
    assert abs(loss - recompute[0]) <= 1e-5 * abs(recompute[0])
    for name, grad in grads.items():
        assert (grad - recompute[1][name]).norm() <= 1e-4 * recompute[1][name].norm() + 1e-12, name


@pytest.mark.parametrize("thoughts", [[2, 2, 2, 2, 2], [3, 1, 2, 1, 3]], ids=["equal", "ragged"])
def test_every_sample_thinking_is_one_paged_step_per_thought(coconut, monkeypatch, thoughts):
    """Every sample has thoughts (a curriculum stage's batch): the prefill, then one step per thought,
    each sample's suffix riding in the step of its last thought (no suffix step: as many decoder calls
    as multipass's passes); steps in which every sample thinks take their inputs without picking
    rows. Loss and gradients equal the no-cache forward's."""
    samples = [CoconutSample(s.prompt if s.prompt[-1] == TOKENS.bot else s.prompt + [TOKENS.bot], n,
                             s.suffix if s.suffix[0] == TOKENS.eot else [TOKENS.eot] + s.suffix)
               for s, n in zip(ragged_samples(seed=4), thoughts)]
    recompute = loss_and_grads(coconut, samples, "recompute")
    calls = []
    forward = type(coconut.decoder).forward
    monkeypatch.setattr(type(coconut.decoder), "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
    loss, grads = loss_and_grads(coconut, samples, "paged")
    assert len(calls) == 1 + max(thoughts)
    assert abs(loss - recompute[0]) <= 1e-5 * abs(recompute[0])
    for name, grad in grads.items():
        assert (grad - recompute[1][name]).norm() <= 1e-4 * recompute[1][name].norm() + 1e-12, name


def test_paged_forward_saves_no_view_of_a_larger_activation(coconut):
    """What the backward keeps of a paged forward is never a slice of a bigger tensor (as q sliced from
    the fused q/k/v projection would be: that keeps K and V alive a second time beside the pages)."""
    params = {p.untyped_storage().data_ptr() for p in coconut.parameters()}
    views = []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.nbytes() > t.numel() * t.element_size():
            views.append((tuple(t.shape), storage.nbytes() // t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        coconut(ragged_samples(), mode="paged")
    assert views == []


@pytest.mark.parametrize("mode", ["paged", "multipass"])
def test_gradient_flows_through_the_thought_chain(coconut, mode):
    """The loss depends on the prompt only through attention and the thoughts; with thought inputs
    detached, the prompt-embedding gradient changes. Check it is the undetached one."""
    samples = ragged_samples()
    model = coconut.decoder
    emb = model.embed_tokens.weight
    prompt_only = sorted({t for s in samples for t in s.prompt} - {t for s in samples for t in s.suffix})
    model.zero_grad()
    coconut(samples, mode=mode).backward()
    attached = emb.grad[prompt_only].clone()

    original = CoconutModel.append_thought
    try:
        CoconutModel.append_thought = lambda self, cache, ids, last, *rest: original(self, cache, ids, last.detach(), *rest)
        model.zero_grad()
        coconut(samples, mode="paged").backward()
    finally:
        CoconutModel.append_thought = original
    detached = emb.grad[prompt_only]
    assert (attached - detached).norm() > 1e-3 * attached.norm()
    # the undetached gradient is the one all modes agree on
    model.zero_grad()
    coconut(samples, mode="recompute").backward()
    torch.testing.assert_close(attached, emb.grad[prompt_only], atol=1e-6, rtol=1e-4)


def test_add_special_tokens_grows_vocab_from_init_token(tmp_path):
    from test_tokenizer import build_gpt2_tokenizer_dir

    import transformers

    from coconut_engine.loader import load_tokenizer
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50257, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    tokenizer = load_tokenizer(build_gpt2_tokenizer_dir(tmp_path / "m"))
    model = load_model(tmp_path / "m")
    tokens = add_special_tokens(model, tokenizer)
    assert (tokens.bot, tokens.thought, tokens.eot) == (50257, 50258, 50259)
    assert model.config.vocab_size == 50260 and model.embed_tokens.weight.shape[0] == 50260
    init = tokenizer.convert_tokens_to_ids("<<")
    for t in (tokens.bot, tokens.thought, tokens.eot):
        assert torch.equal(model.embed_tokens.weight[t], model.embed_tokens.weight[init])
    assert tokenizer.encode("a<|latent|>b") == [64, tokens.thought, 65]
    assert add_special_tokens(model, tokenizer) == tokens  # idempotent


def test_bad_samples_and_modes(coconut):
    with pytest.raises(ValueError, match="num_thoughts"):
        CoconutSample([1], -1, [2, 3])
    with pytest.raises(ValueError, match="suffix"):
        CoconutSample([1], 0, [2])
    with pytest.raises(ValueError, match="mode 'fast'"):
        coconut(ragged_samples(), mode="fast")
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        CoconutModel(coconut.decoder, SpecialTokens(1, 2, 999))


def test_paged_training_step_makes_no_host_device_sync(coconut):
    """A paged forward + backward (torch backend) reads no tensor value on the host: the step's
    metadata comes from the host-side lengths (`PagedKVCache.prepare`), and a store knows from the
    batch that every slot is valid instead of checking the slots per layer. On a GPU each such read
    would wait for the device (DESIGN: no host-device syncs in the per-step hot path)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountScalarReads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.reads = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.reads += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    coconut.decoder.attention_backend = "torch"
    counter = CountScalarReads()
    with counter:
        coconut(ragged_samples(), mode="paged").backward()
    assert counter.reads == 0


def test_the_training_pool_keeps_its_size_when_steps_alternate_dtypes(coconut):
    """The trainer's epochs alternate bf16-autocast steps and fp32 validation passes: each dtype switch
    makes a new pool, sized for the batch (it used to grow 1.25x from the other dtype's pool, so host
    memory compounded epoch after epoch until a SmolLM2 run was killed)."""
    samples = ragged_samples()
    sizes = []
    with torch.no_grad():
        for _ in range(4):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                coconut(samples, mode="paged")
            assert coconut._cache.kv.dtype == torch.bfloat16
            sizes.append(coconut._cache.num_pages)
            coconut(samples, mode="paged")
            assert coconut._cache.kv.dtype == torch.float32
            sizes.append(coconut._cache.num_pages)
    assert len(set(sizes)) == 1, sizes


def test_a_no_grad_pass_allocates_no_gradient_pages_and_a_training_step_after_it_gets_them(coconut):
    """Validation runs under no_grad: its pool (a new one when its dtype differs from training's) needs
    no fp32 gradient mirror; the next differentiable step must get a pool that has one, with the same
    loss and gradients as a model that never ran the no-grad pass."""
    samples = ragged_samples()
    coconut._cache = None
    coconut.zero_grad(set_to_none=True)  # the module's model: an earlier test may have left gradients
    with torch.no_grad():
        loss_no_grad = coconut(samples, mode="paged")
    assert not coconut._cache.tracks_gradients and coconut._cache.grad_kv is None
    loss = coconut(samples, mode="paged")
    assert coconut._cache.tracks_gradients
    loss.backward()
    grads = [p.grad.clone() for p in coconut.parameters() if p.grad is not None]
    coconut.zero_grad(set_to_none=True)
    coconut._cache = None
    fresh = coconut(samples, mode="paged")
    fresh.backward()
    torch.testing.assert_close(loss_no_grad, loss.detach())  # no-grad and autograd attention: fp32 rounding apart
    torch.testing.assert_close(fresh.detach(), loss.detach(), rtol=0, atol=0)
    for got, want in zip(grads, [p.grad for p in coconut.parameters() if p.grad is not None]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with torch.no_grad():  # a pool that has gradient pages serves a no-grad pass as it is
        pool = coconut._cache
        torch.testing.assert_close(coconut(samples, mode="paged"), loss_no_grad, rtol=0, atol=0)
    assert coconut._cache is pool
    coconut.zero_grad(set_to_none=True)


def test_a_pool_made_under_inference_mode_is_replaced_for_a_no_grad_pass(coconut):
    """inference_mode makes the pool of inference tensors, which a later no_grad pass cannot write."""
    samples = ragged_samples()
    coconut._cache = None
    with torch.inference_mode():
        loss_inference = coconut(samples, mode="paged")
    with torch.no_grad():
        loss_no_grad = coconut(samples, mode="paged")
    assert not coconut._cache.kv.is_inference()
    torch.testing.assert_close(loss_no_grad, loss_inference.clone(), rtol=0, atol=0)


def test_a_backward_through_a_pool_without_gradient_pages_is_refused_by_name(coconut, monkeypatch):
    """Attention over a pool without gradient pages, run with gradients enabled, computes the right
    forward; its backward would have no K/V gradients to return (partial gradients, silently), so it
    raises instead."""
    import coconut_engine.coconut as coconut_module

    samples = ragged_samples()
    coconut._cache = None
    want = coconut(samples, mode="paged").detach()

    class WithoutGradientPages(coconut_module.PagedKVCache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "requires_grad": False})

    monkeypatch.setattr(coconut_module, "PagedKVCache", WithoutGradientPages)
    coconut._cache = None
    loss = coconut(samples, mode="paged")
    assert not coconut._cache.tracks_gradients
    torch.testing.assert_close(loss.detach(), want)
    with pytest.raises(RuntimeError, match="without requires_grad=True"):
        loss.backward()
    coconut.zero_grad(set_to_none=True)
    coconut._cache = None


@pytest.mark.parametrize("replaced_by", ["another dtype", "a longer batch"])
def test_a_replaced_training_pool_is_freed_before_its_successor_is_allocated(coconut, monkeypatch, replaced_by):
    """The pool holds the last training node through its dependency token; the node must not hold the
    pool back (a cycle through autograd that Python's collector cannot see), or every pool replaced by a
    larger batch or another dtype stays in memory with its gradient pages; and a backpropagated graph
    that a caller keeps (the last loss) must not either, or two pools are alive at the allocation.
    Reference counting alone must free it: the collector is off, so a cycle it could see fails too."""
    import gc
    import weakref

    import coconut_engine.coconut as coconut_module

    pools, alive_at_allocation = [], []

    class RecordingCache(coconut_module.PagedKVCache):
        def __init__(self, *args, **kwargs):
            alive_at_allocation.append([ref() is not None for ref in pools])
            super().__init__(*args, **kwargs)
            pools.extend([weakref.ref(self), weakref.ref(self.kv), weakref.ref(self.grad_kv)])

    monkeypatch.setattr(coconut_module, "PagedKVCache", RecordingCache)
    coconut._cache = None
    samples = ragged_samples()
    longer = [coconut_module.CoconutSample(s.prompt[:-1] * 4 + s.prompt[-1:], s.num_thoughts, s.suffix)
              for s in samples]
    gc.collect()
    gc.disable()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = coconut(samples, mode="paged")
        loss.backward()  # outside autocast, as torch.autocast prescribes (and the trainer does)
        if replaced_by == "another dtype":
            loss = coconut(samples, mode="paged")  # fp32: a new pool, while the last loss is still held
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = coconut(longer, mode="paged")
        loss.backward()
    finally:
        gc.enable()
    assert alive_at_allocation == [[], [False, False, False]]


def test_a_backward_called_inside_autocast_gives_the_gradients_of_one_called_outside(coconut):
    """torch.autocast prescribes the backward outside the region, but users call it inside too: the
    paged step's backward must not let autocast recast its kernels' fp32 arithmetic (it raised a dtype
    mismatch in the one-token step's dK before)."""
    grads = []
    for inside in (False, True):
        coconut.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = coconut(ragged_samples(), mode="paged")
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([p.grad.clone() for p in coconut.parameters() if p.grad is not None])
    coconut.zero_grad(set_to_none=True)
    assert len(grads[0]) == len(grads[1]) > 0
    for outside, inside in zip(*grads):
        torch.testing.assert_close(inside, outside, rtol=0, atol=0)


def test_a_second_backward_through_a_paged_step_is_refused_by_name(coconut):
    """The backward releases the step's pages; a second one (retain_graph) would read released pages."""
    loss = coconut(ragged_samples(), mode="paged")
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backpropagated twice"):
        loss.backward()
