"""`CoconutModel.forward(thought_steps=N)`: more thought steps than the batch needs (FSDP2's agreed count)
call every decoder block in each step, rows or not, and give the same loss and gradients."""
import pytest
import torch

from coconut_engine.coconut import CoconutModel, CoconutSample, SpecialTokens
from coconut_engine.config import ModelConfig
from coconut_engine.model import Decoder


def tiny_model(backend: str = "torch", defer: bool = False) -> CoconutModel:
    torch.manual_seed(0)
    cfg = ModelConfig.from_dict({"model_type": "gpt2", "vocab_size": 60, "n_embd": 64, "n_layer": 2, "n_head": 4,
                                 "n_positions": 256})
    decoder = Decoder(cfg, attention_backend=backend)
    with torch.no_grad():
        for p in decoder.parameters():
            p.normal_(0.0, 0.1) if p.dim() > 1 else p.uniform_(0.5, 1.0)
    return CoconutModel(decoder, SpecialTokens(bot=57, thought=58, eot=59), page_size=4, defer_weight_grads=defer)


def samples(thoughts: list[int]) -> list[CoconutSample]:
    g = torch.Generator().manual_seed(1)
    return [CoconutSample(torch.randint(0, 56, (4 + 3 * i,), generator=g).tolist() + [57], k,
                          [59] + torch.randint(0, 56, (4,), generator=g).tolist()) for i, k in enumerate(thoughts)]


def loss_and_grads(model, batch, mode, **kwargs):
    model.zero_grad()
    loss = model(batch, mode=mode, reduction="sum", eot_loss_weight=0.0, **kwargs)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("defer", [False, True])
@pytest.mark.parametrize("mode", ["paged", "two_pass"])
@pytest.mark.parametrize("thoughts", [[3, 0, 1], [0, 0]])  # [0, 0]: every step (and the suffix step) without rows
def test_extra_thought_steps_give_the_same_loss_and_gradients(mode, defer, thoughts):
    model = tiny_model(defer=defer)
    batch = samples(thoughts)
    loss, grads = loss_and_grads(model, batch, mode)
    extra_loss, extra_grads = loss_and_grads(model, batch, mode, thought_steps=max(thoughts) + 2)
    torch.testing.assert_close(extra_loss, loss, rtol=0, atol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(extra_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def block_calls(model, mode: str, thought_steps: int) -> tuple[list[int], list[int]]:
    """Per decoder block: how many times its forward ran, and how many of those outputs the backward reached."""
    calls, backward_calls = [0, 0], [0, 0]
    for i, block in enumerate(model.decoder.layers):
        def count(_block, _args, output, i=i):
            calls[i] += 1
            output.register_hook(lambda grad: backward_calls.__setitem__(i, backward_calls[i] + 1))
        block.register_forward_hook(count)
    loss_and_grads(model, samples([1, 0]), mode, thought_steps=thought_steps)
    return calls, backward_calls


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_every_block_runs_forward_and_backward_in_every_step(backend):
    """Paged: prefill (with the suffix of the sample without thoughts) + 3 thought steps (the first
    with the other sample's suffix, 2 and 3 without rows), each calling both blocks, and each call's
    output reached by the backward (FSDP2 all-gathers for it there)."""
    assert block_calls(tiny_model(backend), "paged", 3) == ([4, 4], [4, 4])


def test_two_pass_runs_every_thought_steps_backward():
    """two_pass: prefill + 3 thought steps (the last one's output unread) + the full forward; each call's
    output reached by the backward (without it FSDP2's unread last step hangs the ranks)."""
    assert block_calls(tiny_model(), "two_pass", 3) == ([5, 5], [5, 5])


def test_bad_thought_steps():
    model, batch = tiny_model(), samples([2, 1])
    with pytest.raises(ValueError, match=r"thought_steps=1: must be an integer >= the batch's longest thought chain \(2\)"):
        model(batch, thought_steps=1)
    with pytest.raises(ValueError, match="thought_steps is for the paged and two_pass modes, not 'multipass'"):
        model(batch, mode="multipass", thought_steps=2)
