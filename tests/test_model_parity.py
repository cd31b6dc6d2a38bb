"""Decoder + loader vs transformers: logits of a packed batch, sharded checkpoints, save round trip."""
import pytest
import torch

from coconut_engine.cache import AttentionBatch
from coconut_engine.loader import load_model, save_model
from tiny_models import FAMILIES, build_hf_model, hf_logits

SEQUENCES = [[3, 17, 5, 99, 12], list(range(20, 57)), [42]]


def engine_logits(model, sequences):
    batch = AttentionBatch.packed([len(s) for s in sequences])
    with torch.no_grad():
        hidden = model(batch, input_ids=torch.tensor(sum(sequences, [])))
        return model.logits(hidden)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("sharded", [False, True])
def test_logits_match_transformers(family, sharded, tmp_path):
    hf = build_hf_model(family, tmp_path, max_shard_size="40KB" if sharded else None)
    if sharded:
        assert (tmp_path / "model.safetensors.index.json").is_file()
    model = load_model(tmp_path)
    expected = torch.cat(hf_logits(hf, SEQUENCES))
    torch.testing.assert_close(engine_logits(model, SEQUENCES), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_save_model_round_trips_through_transformers(family, tmp_path):
    import transformers

    build_hf_model(family, tmp_path / "src")
    model = load_model(tmp_path / "src")
    save_model(model, tmp_path / "out", shard_size=30_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").float().eval()
    torch.testing.assert_close(torch.cat(hf_logits(reloaded, SEQUENCES)), engine_logits(model, SEQUENCES),
                               atol=1e-4, rtol=0)
    again = load_model(tmp_path / "out")
    torch.testing.assert_close(engine_logits(again, SEQUENCES), engine_logits(model, SEQUENCES), atol=0, rtol=0)


@pytest.mark.parametrize("dtype,atol", [(torch.float16, 3e-2), (torch.bfloat16, 1.5e-1)])
def test_half_precision_forward_is_close_to_fp32(dtype, atol, tmp_path):
    build_hf_model("llama", tmp_path)
    ref = engine_logits(load_model(tmp_path), SEQUENCES)
    half = load_model(tmp_path, dtype=dtype)
    assert half.embed_tokens.weight.dtype == dtype
    out = engine_logits(half, SEQUENCES)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


def test_forward_rejects_mismatched_inputs(tmp_path):
    build_hf_model("gpt2", tmp_path)
    model = load_model(tmp_path)
    batch = AttentionBatch.packed([3, 2])
    with pytest.raises(ValueError, match="exactly one"):
        model(batch)
    with pytest.raises(ValueError, match="4 tokens but the AttentionBatch has 5"):
        model(batch, input_ids=torch.tensor([1, 2, 3, 4]))
