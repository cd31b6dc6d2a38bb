"""Tiny random Hugging Face models (2 layers, hidden 64) built with transformers and saved to disk."""
from __future__ import annotations

from pathlib import Path

import torch

# name -> (transformers config class name, config kwargs)
FAMILIES = {
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=2, n_head=4, vocab_size=160, n_positions=512,
                                bos_token_id=0, eos_token_id=1)),
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
                                  tie_word_embeddings=False)),
    "llama_tied_llama3rope": ("LlamaConfig", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=1, vocab_size=160,
                                                  max_position_embeddings=512, tie_word_embeddings=True,
                                                  rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                    high_freq_factor=4.0,
                                                                    original_max_position_embeddings=64),
                                                  rope_theta=50000.0)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
                                  tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, head_dim=32, vocab_size=160, max_position_embeddings=512,
                                  tie_word_embeddings=False)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=160, max_position_embeddings=512,
                                      sliding_window=None, tie_word_embeddings=False)),
}
CORE_FAMILIES = ("gpt2", "llama", "qwen2")


def build_hf_model(family: str, path: Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Build a tiny random model of `family` with transformers, randomise every weight, save it."""
    import transformers

    cls_name, kwargs = FAMILIES[family]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln_" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.08 * torch.randn_like(p))
    model.tie_weights()
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **save_kwargs)
    return model


def hf_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits of each sequence run alone (batch 1, no padding) through a transformers model."""
    out = []
    with torch.no_grad():
        for ids in sequences:
            out.append(model(torch.tensor([ids])).logits[0])
    return out
