"""`coconut-engine` command line: smoke | generate | bench (train and eval arrive with the trainer)."""
from __future__ import annotations

import argparse
import sys


def cmd_smoke(args: argparse.Namespace) -> int:
    """Build a tiny random model, save and reload it, run prefill + thoughts + decode on the paged cache."""
    import tempfile

    import torch

    from .cache import PagedKVCache
    from .config import ModelConfig
    from .loader import load_model, save_model
    from .model import Decoder

    torch.manual_seed(0)
    config = ModelConfig.from_dict({"model_type": args.family, **_TINY[args.family]})
    with tempfile.TemporaryDirectory() as tmp:
        save_model(Decoder(config), tmp)
        model = load_model(tmp, attention_backend=args.backend)
    prompts = [[1, 2, 3, 4, 5, 6, 7], [8, 9, 10], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21]]
    cache = PagedKVCache(config, num_pages=16, page_size=16)
    seqs = list(range(len(prompts)))
    for s in seqs:
        cache.add_sequence(s)
    with torch.no_grad():
        batch = cache.prepare(seqs, [len(p) for p in prompts])
        hidden = model(batch, input_ids=torch.tensor(sum(prompts, [])), cache=cache)
        last = hidden[batch.last_token_indices()]
        for _ in range(args.thoughts):  # continuous thoughts: last hidden state -> next input embedding
            batch = cache.prepare(seqs, [1] * len(seqs))
            last = model(batch, inputs_embeds=last, cache=cache)
        logits = model.logits(last)
    print(f"{args.family}: {len(prompts)} prompts, {args.thoughts} thoughts, logits shape {tuple(logits.shape)}, "
          f"{cache.num_pages - cache.num_free_pages} pages in use, backend {model.attention_backend}")
    return 0


_TINY = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coconut-engine", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help=cmd_smoke.__doc__)
    smoke.add_argument("--family", choices=sorted(_TINY), default="gpt2")
    smoke.add_argument("--thoughts", type=int, default=3)
    smoke.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    smoke.set_defaults(func=cmd_smoke)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
