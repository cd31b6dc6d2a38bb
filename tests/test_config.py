"""ModelConfig parsing: both config layouts, RoPE scaling, and clear errors for what is unsupported."""
import json

import pytest
import torch

from coconut_engine import ConfigError, ModelConfig
from coconut_engine.loader import load_model
from tiny_models import build_hf_model

QWEN25_HUB = {  # the layout of hub checkpoints (Qwen2.5-0.5B-Instruct's config.json, abridged)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864,
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "rope_scaling": None, "sliding_window": 32768, "use_sliding_window": False,
    "tie_word_embeddings": True, "vocab_size": 151936, "max_position_embeddings": 32768, "hidden_act": "silu",
}
LLAMA32_HUB = {  # Llama-3.2-1B's config.json, abridged
    "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32,
    "num_hidden_layers": 16, "num_key_value_heads": 8, "head_dim": 64, "rms_norm_eps": 1e-05, "rope_theta": 500000.0,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "tie_word_embeddings": True, "vocab_size": 128256, "max_position_embeddings": 131072, "hidden_act": "silu",
}


def to_transformers5_layout(raw: dict) -> dict:
    out = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling")}
    params = dict(raw.get("rope_scaling") or {"rope_type": "default"})
    params["rope_theta"] = raw["rope_theta"]
    out["rope_parameters"] = params
    return out


@pytest.mark.parametrize("raw", [QWEN25_HUB, LLAMA32_HUB], ids=["qwen2.5", "llama3.2"])
def test_both_layouts_give_the_same_config(raw):
    hub = ModelConfig.from_dict(raw)
    v5 = ModelConfig.from_dict(to_transformers5_layout(raw))
    assert hub == v5
    assert hub.num_kv_heads < hub.num_heads


def test_hub_config_fields():
    qwen = ModelConfig.from_dict(QWEN25_HUB)
    assert (qwen.qkv_bias, qwen.o_bias, qwen.tie_word_embeddings, qwen.head_dim) == (True, False, True, 64)
    assert qwen.rope_theta == 1e6
    llama = ModelConfig.from_dict(LLAMA32_HUB)
    assert llama.rope_scaling.kind == "llama3" and llama.rope_scaling.factor == 32.0


@pytest.mark.parametrize("layout", ["hub", "transformers5"])
def test_model_loads_identically_from_either_layout(layout, tmp_path):
    build_hf_model("llama_tied_llama3rope", tmp_path)
    reference = load_model(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    if layout == "hub":
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = params
    else:
        assert "rope_parameters" in raw  # what transformers 5 wrote
    (tmp_path / "config.json").write_text(json.dumps(raw))
    model = load_model(tmp_path)
    assert model.config.rope_scaling.kind == "llama3"
    torch.testing.assert_close(model.rotary.inv_freq, reference.rotary.inv_freq, atol=0, rtol=0)


@pytest.mark.parametrize("rope", [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": {"type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
     "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": {"rope_type": "linear",
                                                                                        "factor": 4.0}, "rope_theta": 500.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta": 500.0, "rope_scaling": None},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 500.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 777.0}, "rope_theta": 1e6},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "rope_scaling": {}},
], ids=["scaling-over-default", "scaling-over-linear", "hub-theta-with-scaling", "parameters-theta", "hub-theta-fallback",
        "scaling-without-theta", "theta-inside-scaling", "empty-scaling"])
def test_a_config_with_both_rope_layouts_resolves_as_transformers_does(rope):
    """Hand-edited or merged configs carry both layouts; transformers 5 resolves them by rules of its
    own (the hub keys win where rope_scaling is given): the engine must compute the same RoPE."""
    import transformers

    raw = {**{k: v for k, v in LLAMA32_HUB.items() if k not in ("rope_theta", "rope_scaling")}, **rope}
    theirs = transformers.LlamaConfig.from_dict(raw).rope_parameters
    ours = ModelConfig.from_dict(raw)
    assert ours.rope_theta == theirs["rope_theta"]
    assert (ours.rope_scaling.kind, ours.rope_scaling.factor) == (theirs["rope_type"], theirs.get("factor", 1.0))


@pytest.mark.parametrize("change,message", [
    ({"model_type": "bert"}, "model_type 'bert' is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, "lacks field 'low_freq_factor'"),
    ({"use_sliding_window": True}, "sliding-window"),
    ({"num_key_value_heads": 3}, "not a multiple"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"hidden_size": None}, "missing required field 'hidden_size'"),
])
def test_unsupported_configs_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_dict({**QWEN25_HUB, **change}, source="my/config.json")


def test_gpt2_unsupported_flags():
    raw = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 10, "n_positions": 8}
    assert ModelConfig.from_dict(raw).mlp == "gelu_tanh"
    with pytest.raises(ConfigError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_dict({**raw, "scale_attn_by_inverse_layer_idx": True})
    with pytest.raises(ConfigError, match="activation_function 'swish'"):
        ModelConfig.from_dict({**raw, "activation_function": "swish"})
