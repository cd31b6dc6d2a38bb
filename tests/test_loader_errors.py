"""Bad model directories: each raises CheckpointError naming the file and the tensor."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from coconut_engine import CheckpointError
from coconut_engine.loader import load_model
from tiny_models import build_hf_model


@pytest.fixture
def llama_dir(tmp_path):
    build_hf_model("llama", tmp_path)
    return tmp_path


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json not found"):
        load_model(llama_dir)


def test_unknown_model_type(llama_dir):
    raw = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({**raw, "model_type": "t5"}))
    with pytest.raises(CheckpointError, match=r"config\.json: model_type 't5'"):
        load_model(llama_dir)


def test_missing_tensor(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor\(s\) model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(llama_dir)


def test_unexpected_tensor(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(llama_dir)


def test_wrong_shape(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}))
    with pytest.raises(CheckpointError, match=r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 64\), expected \(32, 64\)"):
        load_model(llama_dir)


def test_integer_tensor(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.update({"model.norm.weight": torch.zeros(64, dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype torch\.int32"):
        load_model(llama_dir)


@pytest.mark.parametrize("dtype", [torch.int8, "float8", torch.float64, "int"])
def test_wrong_dtype_request(llama_dir, dtype):
    with pytest.raises(CheckpointError, match="dtype"):
        load_model(llama_dir, dtype=dtype)


def test_truncated_file(llama_dir):
    data = (llama_dir / "model.safetensors").read_bytes()
    (llama_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(llama_dir)


def test_corrupt_header(llama_dir):
    data = bytearray((llama_dir / "model.safetensors").read_bytes())
    data[8:20] = b"#not json!#!"
    (llama_dir / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read safetensors file"):
        load_model(llama_dir)


def test_index_names_missing_shard(tmp_path):
    build_hf_model("llama", tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (tmp_path / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard} \(holding tensor .+\) does not exist"):
        load_model(tmp_path)


def test_no_weights(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_model(llama_dir)


def test_empty_and_missing_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty"):
        load_model(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere")
