"""Issue 18, loading: malformed configs and index files, sizes checked before allocating, NaN
weights, and integer-only page counts. Each case raises the project's error naming file and key."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from coconut_engine import CheckpointError, ConfigError, ModelConfig, PagedKVCache
from coconut_engine.errors import InvalidArgumentError
from coconut_engine.loader import load_model
from test_config import QWEN25_HUB
from tiny_models import build_hf_model


@pytest.fixture(scope="module")
def llama_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    build_hf_model("llama", path)
    return path


@pytest.fixture
def llama_dir(llama_source, tmp_path):
    for file in llama_source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    raw.update(changes)
    (path / "config.json").write_text(json.dumps(raw))


@pytest.mark.parametrize("change,message", [
    ({"rope_scaling": {"rope_type": "linear"}}, r"linear rope_scaling lacks field 'factor'"),
    ({"rope_scaling": {"type": "linear", "factor": "two"}}, r"factor must be a positive number, got 'two'"),
    ({"rope_scaling": "linear"}, r"rope_scaling must be an object, got str 'linear'"),
    ({"rope_parameters": [1, 2]}, r"rope_parameters must be an object"),
    ({"hidden_size": "abc"}, r"hidden_size must be a positive integer, got 'abc'"),
    ({"num_hidden_layers": -2}, r"num_hidden_layers must be a positive integer, got -2"),
    ({"vocab_size": 2.5}, r"vocab_size must be a positive integer, got 2.5"),
    ({"num_attention_heads": True}, r"num_attention_heads must be a positive integer, got True"),
    ({"rms_norm_eps": "small"}, r"rms_norm_eps must be a positive number"),
    ({"rope_theta": float("nan")}, r"rope_theta must be a positive number"),
    ({"tie_word_embeddings": "yes"}, r"tie_word_embeddings must be true or false"),
    ({"eos_token_id": "</s>"}, r"eos_token_id must be a token id"),
    ({"layer_types": "full_attention"}, r"layer_types must be a list"),
    ({"hidden_size": 900}, r"hidden_size=900 is not a multiple of num_attention_heads=14"),
])
def test_malformed_config_values_are_config_errors_naming_the_key(change, message):
    with pytest.raises(ConfigError, match=r"my/config\.json.*" + message):
        ModelConfig.from_dict({**QWEN25_HUB, **change}, source="my/config.json")


def test_gpt2_config_values_are_checked():
    base = {"model_type": "gpt2", "n_embd": 64, "n_head": 4, "n_layer": 2, "vocab_size": 100, "n_positions": 64}
    with pytest.raises(ConfigError, match="n_embd=64 is not a multiple of n_head=5"):
        ModelConfig.from_dict({**base, "n_head": 5})
    with pytest.raises(ConfigError, match="activation_function must be a string"):
        ModelConfig.from_dict({**base, "activation_function": ["gelu"]})
    with pytest.raises(ConfigError, match="n_inner must be a positive integer"):
        ModelConfig.from_dict({**base, "n_inner": "big"})


@pytest.fixture(scope="module")
def sharded_source(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    build_hf_model("llama", path, max_shard_size="40KB")
    return path


@pytest.fixture
def sharded_dir(sharded_source, tmp_path):
    for file in sharded_source.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    return tmp_path


def write_index(path, weight_map):
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_malformed_index_files(sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    write_index(sharded_dir, [name, shard])
    with pytest.raises(CheckpointError, match=r"index\.json: not a safetensors index"):
        load_model(sharded_dir)
    write_index(sharded_dir, {**index["weight_map"], name: 7})
    with pytest.raises(CheckpointError, match=rf"weight_map\['{name}'\] must be a file name, got 7"):
        load_model(sharded_dir)
    (sharded_dir / "model.safetensors.index.json").write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(CheckpointError, match=r"index\.json: not valid JSON"):
        load_model(sharded_dir)


@pytest.mark.parametrize("escape", ["../outside.safetensors", "/tmp/outside.safetensors", "sub/../x.safetensors"])
def test_index_shards_outside_the_model_folder_are_refused(sharded_dir, escape, tmp_path_factory):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    shard = index["weight_map"][next(iter(index["weight_map"]))]
    outside = sharded_dir.parent / "outside.safetensors"  # a real file there: the refusal is not "missing"
    outside.write_bytes((sharded_dir / shard).read_bytes())
    write_index(sharded_dir, {k: (escape if v == shard else v) for k, v in index["weight_map"].items()})
    with pytest.raises(CheckpointError, match=r"is not a file name inside the model folder"):
        load_model(sharded_dir)


def test_config_sizes_are_checked_against_the_headers_before_allocating(llama_dir, monkeypatch):
    edit_config(llama_dir, vocab_size=10**12)
    allocations = []
    monkeypatch.setattr(torch.nn.Module, "to_empty", lambda self, **kw: allocations.append(kw) or self)
    with pytest.raises(CheckpointError, match=r"'(lm_head|model\.embed_tokens)\.weight' has shape \(160, 64\), "
                                              r"expected \(1000000000000, 64\)"):
        load_model(llama_dir)
    assert allocations == []


def test_non_finite_weights_are_refused_unless_allowed(llama_dir):
    def poison(tensors):
        tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors = load_file(llama_dir / "model.safetensors")
    poison(tensors)
    save_file(tensors, llama_dir / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight' holds NaN or Inf"):
        load_model(llama_dir)
    model = load_model(llama_dir, allow_non_finite=True)
    assert not torch.isfinite(model.layers[1].mlp.gate_up_proj.weight).all()


@pytest.mark.parametrize("counts", [[2.0], [1.5], [True], ["3"]])
def test_prepare_takes_integer_counts_only(counts):
    config = ModelConfig.from_dict({"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 1,
                                    "vocab_size": 10, "n_positions": 32})
    cache = PagedKVCache(config, num_pages=4, page_size=4)
    cache.add_sequence(0)
    with pytest.raises(InvalidArgumentError, match=r"new-token counts must be integers >= 0"):
        cache.prepare([0], counts)
    assert cache.seq_len(0) == 0 and cache.num_free_pages == 4
    with pytest.raises(InvalidArgumentError, match="page_size must be an integer"):
        PagedKVCache(config, num_pages=4, page_size=4.0)


def test_weights_that_overflow_the_load_dtype_are_refused(llama_dir):
    # finite in the file (float32), Inf once converted to float16: as bad as an Inf in the file
    tensors = load_file(llama_dir / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.weight"] = tensors["model.layers.0.mlp.down_proj.weight"].float()
    tensors["model.layers.0.mlp.down_proj.weight"][1, 2] = 1e6
    save_file(tensors, llama_dir / "model.safetensors")
    assert torch.isfinite(load_model(llama_dir).layers[0].mlp.down_proj.weight).all()  # float32 holds it
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.mlp\.down_proj\.weight' holds values outside "
                                              r"the range of torch\.float16"):
        load_model(llama_dir, dtype="float16")
    model = load_model(llama_dir, dtype="float16", allow_non_finite=True)
    assert not torch.isfinite(model.layers[0].mlp.down_proj.weight).all()


def test_a_config_deeper_than_the_weights_fails_before_building_the_model(llama_dir, monkeypatch):
    # before: a meta Decoder of num_hidden_layers blocks was built first (10**6: minutes, gigabytes)
    import coconut_engine.loader as loader

    edit_config(llama_dir, num_hidden_layers=10**6)

    def not_yet(*args, **kwargs):
        raise AssertionError("a Decoder was built before the layer count was checked")

    monkeypatch.setattr(loader, "Decoder", not_yet)
    with pytest.raises(CheckpointError, match=r"config\.json: num_hidden_layers=1000000, but the weights hold 2 "
                                              r"layer\(s\) \(no tensor of layer 999999\)"):
        load_model(llama_dir)
