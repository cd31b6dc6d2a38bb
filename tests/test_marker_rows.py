"""Coconut markers get initialised rows also when the vocabulary already has room for them (padding)."""
import shutil

import torch

from coconut_engine.coconut import add_special_tokens
from coconut_engine.loader import load_model, load_tokenizer
from coconut_engine.tasks import train_task_tokenizer
from tiny_models import build_hf_model


def test_markers_on_a_padded_vocabulary_copy_the_init_token(tmp_path):
    # Qwen2.5's layout in small: more embedding rows (400) than tokenizer entries (~270)
    build_hf_model("qwen2", tmp_path / "m", vocab_size=400, tie_word_embeddings=False)
    train_task_tokenizer(["<< a >> b << c >>"] * 4, tmp_path / "tok", vocab_size=270)
    shutil.copytree(tmp_path / "tok", tmp_path / "m", dirs_exist_ok=True)
    tokenizer = load_tokenizer(tmp_path / "m")
    model = load_model(tmp_path / "m")
    before = model.embed_tokens.weight.detach().clone()
    tokens = add_special_tokens(model, tokenizer)
    ids = [tokens.bot, tokens.thought, tokens.eot]
    assert max(ids) < 400 and model.config.vocab_size == 400  # the rows existed: nothing was grown
    init = tokenizer.encode("<<", add_special_tokens=False)[0]
    for weight in (model.embed_tokens.weight, model.lm_head.weight):
        for t in ids:
            assert torch.equal(weight[t], weight[init])
    others = [i for i in range(400) if i not in ids]
    assert torch.equal(model.embed_tokens.weight[others], before[others])  # nothing else touched
    # a tokenizer that already has the markers (a trained checkpoint) keeps its trained rows
    with torch.no_grad():
        model.embed_tokens.weight[tokens.thought] += 1.0
    trained = model.embed_tokens.weight.detach().clone()
    assert add_special_tokens(model, tokenizer) == tokens
    assert torch.equal(model.embed_tokens.weight, trained)
