"""The thought transform: every variant starts as the identity, and all four training modes agree on
the loss and every gradient (the transform's own included) for every variant, with and without the
halting (<eot>) loss."""
import pytest
import torch

from coconut_engine.coconut import CoconutModel
from coconut_engine.loader import load_model
from coconut_engine.thoughts import THOUGHT_TRANSFORMS, ThoughtTransform, build_thought_transform
from test_coconut_modes import TOKENS, loss_and_grads, ragged_samples
from tiny_models import build_hf_model

VARIANTS = sorted(THOUGHT_TRANSFORMS)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_model("llama", path)  # untied LM head: the halting loss reaches both matrices separately
    return load_model(path, attention_backend="torch")


def perturbed(kind: str, decoder, seed: int = 0):
    """A transform of `kind` moved away from its identity start (so that it matters)."""
    transform = build_thought_transform(kind, decoder.embed_tokens.weight)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in transform.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen) + (0.5 if p.dim() == 0 else 0.0))
    return transform


@pytest.mark.parametrize("kind", VARIANTS)
def test_each_variant_starts_as_the_identity(decoder, kind):
    transform = build_thought_transform(kind, decoder.embed_tokens.weight)
    hidden = torch.randn(5, 64)
    marker = decoder.embed_tokens.weight[TOKENS.thought]
    out = transform(hidden, marker)
    if kind == "norm":  # the direction is kept and the scale becomes the embeddings' mean norm
        scale = decoder.embed_tokens.weight.norm(dim=1).mean()
        torch.testing.assert_close(out, hidden / hidden.norm(dim=1, keepdim=True) * scale)
    else:
        torch.testing.assert_close(out, hidden, rtol=0, atol=0)


@pytest.mark.parametrize("eot_loss_weight", [0.0, 0.5])
@pytest.mark.parametrize("kind", VARIANTS)
def test_modes_agree_for_every_variant(decoder, kind, eot_loss_weight):
    coconut = CoconutModel(decoder, TOKENS, page_size=4, thought_transform=perturbed(kind, decoder))
    samples = ragged_samples()

    def run(mode):
        coconut.zero_grad()
        loss = coconut(samples, mode=mode, eot_loss_weight=eot_loss_weight)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in coconut.named_parameters()}

    ref_loss, ref_grads = run("paged")
    own = [n for n in ref_grads if n.startswith("thought_transform.")]
    assert len(own) == len(list(coconut.thought_transform.parameters()))
    for name in own:
        assert ref_grads[name].norm() > 0, name  # the transform trains
    for mode in ("two_pass", "multipass", "recompute"):
        loss, grads = run(mode)
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), mode
        for name, grad in grads.items():
            ref = ref_grads[name]
            assert (grad - ref).norm() <= 1e-4 * ref.norm() + 1e-12, (mode, name)


def test_the_transform_is_what_the_thoughts_feed_back(decoder):
    """A transform that changes its input changes the loss (in every mode alike), and the identity
    variant gives exactly the loss of a model built without one."""
    samples = ragged_samples()
    plain = CoconutModel(decoder, TOKENS, page_size=4)(samples).item()
    identity = CoconutModel(decoder, TOKENS, page_size=4, thought_transform=build_thought_transform(
        "identity", decoder.embed_tokens.weight))(samples).item()
    assert identity == plain
    linear = CoconutModel(decoder, TOKENS, page_size=4, thought_transform=perturbed("linear", decoder))
    assert abs(linear(samples, mode="paged").item() - plain) > 1e-3


def test_halting_loss_labels(decoder):
    """The halting loss is the BCE of p(<eot>) at the positions after <bot> and after each thought:
    1 after the last thought, 0 before the others; a sample without markers adds nothing."""
    coconut = CoconutModel(decoder, TOKENS, page_size=4)
    samples = ragged_samples()
    with torch.no_grad():
        base = coconut(samples, mode="recompute", reduction="sum").item()
        with_eot = coconut(samples, mode="recompute", reduction="sum", eot_loss_weight=2.0).item()
        # the positions, by hand: one no-cache forward per sample over its prompt and thoughts
        expected = 0.0
        for s in samples:
            if s.prompt[-1] != TOKENS.bot:
                continue
            inputs = decoder.embed_tokens.weight[s.prompt]
            for t in range(s.num_thoughts + 1):
                from coconut_engine.cache import AttentionBatch

                hidden = decoder(AttentionBatch.packed([len(inputs)]), inputs_embeds=inputs)[-1]
                p_eot = torch.softmax(decoder.logits(hidden[None]).float(), dim=-1)[0, TOKENS.eot]
                expected += float(-torch.log(p_eot if t == s.num_thoughts else 1 - p_eot))
                inputs = torch.cat([inputs, hidden[None]])
    assert with_eot - base == pytest.approx(2.0 * expected, rel=1e-4)
    with pytest.raises(ValueError, match="eot_loss_weight"):
        coconut(samples, eot_loss_weight=-1.0)


def test_unknown_variant_is_named(decoder):
    with pytest.raises(ValueError, match="'mlp' is not one of"):
        build_thought_transform("mlp", decoder.embed_tokens.weight)


@pytest.mark.parametrize("kind", VARIANTS)
def test_modes_agree_under_bf16_autocast(decoder, kind):
    """Training with `bf16: true` runs the forward under autocast, where a learned transform's output
    is bf16 while the token embeddings are fp32: every mode takes it (multipass's index_put refused
    the mixed dtypes for `linear`) and the modes agree to bf16 precision."""
    coconut = CoconutModel(decoder, TOKENS, page_size=4, thought_transform=perturbed(kind, decoder))
    losses = {}
    for mode in ("paged", "two_pass", "multipass", "recompute"):
        coconut.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = coconut(ragged_samples(), mode=mode, eot_loss_weight=0.5)
        loss.backward()
        losses[mode] = loss.item()
    assert max(losses.values()) - min(losses.values()) <= 1e-2 * abs(losses["paged"]), losses


def test_halting_loss_is_refused_where_it_labels_nothing_or_the_wrong_positions():
    """In pause_as_thought the `<|latent|>` tokens sit in the prompt, so only stage-0 samples end their
    prompt in `<bot>`: the halting loss taught p(<eot>) = 1 after `<bot>` and nothing else. In cot /
    no_cot there are no markers and it added nothing. Such configs are refused, naming the key."""
    from coconut_engine.trainer import TrainConfig, TrainingError

    for mode in ("pause_as_thought", "cot", "no_cot"):
        with pytest.raises(TrainingError, match=f"eot_loss_weight has no meaning in mode {mode}"):
            TrainConfig(mode=mode, eot_loss_weight=0.5)
        TrainConfig(mode=mode, eot_loss_weight=0.0)
    for mode in ("coconut", "no_thoughts"):
        TrainConfig(mode=mode, eot_loss_weight=0.5)


class IndexedThought(ThoughtTransform):
    """A variant that reads the thought index (`uses_index`): `h + (index + 1) * v`, v learned."""

    kind = "indexed"
    uses_marker = False
    uses_index = True

    def __init__(self, hidden_size: int, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.v = torch.nn.Parameter(0.3 * torch.randn(hidden_size, generator=gen))
        self.seen = []

    def forward(self, hidden, marker=None, index=None):
        self.seen.append(index.tolist())
        return hidden + (index + 1).to(hidden.dtype)[:, None] * self.v


def test_a_variant_that_reads_the_thought_index_gets_it_in_every_mode(decoder):
    """DESIGN: the transform maps the hidden state and, for variants that need them, the <|latent|>
    embedding and the thought index. Every mode passes each row's index (0 = first thought) and all
    modes agree on the loss and every gradient (the index was not passed at all before)."""
    transform = IndexedThought(64)
    coconut = CoconutModel(decoder, TOKENS, page_size=4, thought_transform=transform)
    samples = ragged_samples()  # thoughts 2, 0, 4, 1, 0
    results = {}
    for mode in ("paged", "two_pass", "multipass", "recompute"):
        coconut.zero_grad()
        transform.seen.clear()
        loss = coconut(samples, mode=mode, eot_loss_weight=0.5)
        loss.backward()
        results[mode] = loss.item(), {n: p.grad.clone() for n, p in coconut.named_parameters()}
        assert sorted(i for call in transform.seen for i in call) == sorted([0, 1] + [0, 1, 2, 3] + [0]), mode
        assert all(len(set(call)) == 1 for call in transform.seen), mode  # one thought index per step
    ref_loss, ref_grads = results["paged"]
    assert ref_grads["thought_transform.v"].norm() > 0
    for mode, (loss, grads) in results.items():
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), mode
        for name, grad in grads.items():
            assert (grad - ref_grads[name]).norm() <= 1e-4 * ref_grads[name].norm() + 1e-12, (mode, name)


@pytest.mark.parametrize("kind", ["gated", "linear", "norm"])
def test_transform_gradients_with_deferred_weight_gradients(decoder, kind):
    """Models from hidden 256 on defer weight gradients in training (linear.DeferredWeightGrads); the
    transform's gradients (and the <|latent|> row the gated variant reads) are the same with them."""
    transform = perturbed(kind, decoder)
    results = []
    for defer, mode in ((True, "paged"), (True, "two_pass"), (False, "recompute")):
        coconut = CoconutModel(decoder, TOKENS, page_size=4, thought_transform=transform, defer_weight_grads=defer)
        coconut.zero_grad()
        loss = coconut(ragged_samples(), mode=mode, eot_loss_weight=0.5)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in coconut.named_parameters()}))
    ref_loss, ref_grads = results[-1]
    for loss, grads in results[:-1]:
        assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
        for name, grad in grads.items():
            assert (grad - ref_grads[name]).norm() <= 1e-4 * ref_grads[name].norm() + 1e-12, name
