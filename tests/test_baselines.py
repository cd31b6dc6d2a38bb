"""The transformers implementation of the official algorithm matches the engine's loss and gradients."""
import pytest

from coconut_engine.baselines import OfficialCoconutHF, hf_gradients_by_engine_name
from coconut_engine.coconut import CoconutModel
from coconut_engine.loader import load_model
from test_coconut_modes import TOKENS, ragged_samples
from tiny_models import CORE_FAMILIES, build_hf_model


@pytest.mark.parametrize("family", CORE_FAMILIES)
def test_official_transformers_baseline_matches_the_engine(family, tmp_path):
    hf = build_hf_model(family, tmp_path)
    hf.eval()  # no dropout (transformers draws other masks than the engine); gradients flow in eval mode too
    engine = CoconutModel(load_model(tmp_path, attention_backend="torch"), TOKENS, page_size=4)
    samples = ragged_samples()
    loss = engine(samples, mode="paged")
    loss.backward()
    hf_loss = OfficialCoconutHF(hf, TOKENS, pad_token_id=159)(samples)
    hf_loss.backward()
    assert abs(hf_loss.item() - loss.item()) <= 1e-5 * loss.item()
    hf_grads = hf_gradients_by_engine_name(hf, engine.decoder.config)
    for name, param in engine.decoder.named_parameters():
        ref = param.grad
        assert (hf_grads[name] - ref).norm() <= 1e-4 * ref.norm() + 1e-12, name
