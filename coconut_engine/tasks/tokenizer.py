"""A small byte-level BPE tokenizer trained on a task's own text (exact decoding, newlines kept)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

EOS = "<|endoftext|>"


def train_task_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 512):
    """Train a byte-level BPE on `texts`, save `tokenizer.json` + `tokenizer_config.json` in `path`,
    and return it loaded as a transformers tokenizer (eos = `<|endoftext|>`). The folder is written
    under a temporary name and renamed into place: a crash leaves no half-written tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from ..loader import load_tokenizer

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    path = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir()
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS, "unk_token": EOS,
        "pad_token": EOS, "model_max_length": 4096, "clean_up_tokenization_spaces": False}))
    if final.exists():
        shutil.rmtree(final)
    os.replace(path, final)
    return load_tokenizer(final)
