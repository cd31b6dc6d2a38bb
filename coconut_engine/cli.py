"""`coconut-engine` command line: train | eval | generate | data convert | bench | smoke."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


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


def thought_count(text: str) -> int | str:
    """`--num-thoughts` values: an integer >= 0 or "auto" (adaptive thinking)."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0 or 'auto', got {text!r}")
    return value


def format_thoughts(thoughts) -> list[str]:
    """One line per thought: its input norm, p(<eot>) and nearest tokens through the LM head."""
    lines = []
    for t, trace in enumerate(thoughts, 1):
        nearest = " | ".join(f"{json.dumps(text) if text is not None else token} {p:.3f}"
                             for token, text, p in trace.top_tokens)
        lines.append(f"[thought {t}] norm {trace.norm:.2f}  p(<eot>) {trace.p_eot:.3f}  nearest: {nearest}")
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate (with continuous thoughts) for prompts given as arguments or in a JSONL file."""
    from .errors import CoconutEngineError

    if bool(args.prompts) == bool(args.input):
        raise SystemExit("error: give prompts as arguments or --input FILE, not both (and not neither)")
    try:
        return _generate(args)
    except CoconutEngineError as exc:
        raise SystemExit(f"error: {exc}")


def _generate(args: argparse.Namespace) -> int:
    import dataclasses

    from .checkpoint import COCONUT_FILE, checkpoint_thought_transform, read_coconut_info
    from .generate import Generator
    from .loader import load_model, load_tokenizer
    from .requests import InOrder, PromptRequest, read_requests
    from .scoring import default_device, trained_thoughts
    from .validation import check_device

    if args.device is not None:
        check_device(args.device, "--device")
    requests = read_requests(args.input) if args.input else [PromptRequest(p) for p in args.prompts]
    prompts = [r.prompt for r in requests]
    # a Coconut checkpoint thinks as it was trained to (coconut.json) unless told otherwise
    trained, markers = trained_thoughts(args.model) if args.num_thoughts is None else (args.num_thoughts, None)
    thoughts = [trained if r.num_thoughts is None else r.num_thoughts for r in requests]
    # before the work: an unwritable path fails now, not after it
    out = _open_outputs({"--output": args.output}, {"--input": args.input}, args.model)["--output"]
    # an --input line may ask for auto: the settings apply there too
    max_thoughts, eot_threshold = _adaptive_settings(args, args.num_thoughts == "auto" or args.input is not None)
    failed = []
    printed_errors: dict[int, str] = {}  # a request's error once, not once per sample (--n)

    def emit(index: int, sample: int, result) -> None:
        if result.error is not None:
            failed.append(index)
        if out is None:
            if args.show_thoughts and result.thoughts:
                print("\n".join(format_thoughts(result.thoughts)))
            if result.error is None:
                print(result.text, flush=True)
            elif printed_errors.get(index) != result.error:
                printed_errors[index] = result.error
                print(f"ERROR: {result.error}" + (f" (every one of its {args.n} samples)" if args.n > 1 else ""),
                      flush=True)
            return
        row = {"index": index, "sample": sample, "prompt": prompts[index], "text": result.text,
               "token_ids": result.token_ids, "finish_reason": result.finish_reason,
               "prompt_tokens": result.prompt_tokens, "num_thoughts": result.num_thoughts,
               "generated_tokens": result.generated_tokens, "error": result.error}
        if args.show_thoughts:
            row["thoughts"] = [dataclasses.asdict(t) for t in result.thoughts or []]
        out.write(json.dumps(row) + "\n")
        out.flush()

    try:
        device = default_device(args.device)
        model = load_model(args.model, dtype=args.dtype, device=device, attention_backend=args.backend)
        tokens, transform = None, None
        if (args.model / COCONUT_FILE).is_file():  # a trained checkpoint: its markers and thought transform
            tokens, info = read_coconut_info(args.model)
            transform = checkpoint_thought_transform(args.model, info, model)
        generator = Generator(model, load_tokenizer(args.model), max_pages=args.max_pages, page_size=args.page_size,
                              allow_long_context=args.allow_long_context, special_tokens=tokens,
                              thought_transform=transform)
        results = generator.generate(prompts, num_thoughts=thoughts, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     stop=args.stop, n=args.n, seed=args.seed, progress=bool(args.input),
                                     thought_markers=markers, on_result=InOrder(emit, args.n),
                                     max_thoughts=max_thoughts, eot_threshold=eot_threshold,
                                     return_thoughts=args.show_thoughts)
    finally:
        if out is not None:
            out.close()
    if args.output:
        print(f"wrote {len(results)} results to {args.output}", file=sys.stderr)
    if failed:
        print(f"{len(set(failed))} of {len(prompts)} request(s) failed", file=sys.stderr)
    return 1 if failed else 0


def _open_outputs(outputs: dict, inputs: dict, model: Path | None = None) -> dict:
    """Open every output ({flag: path}; None: stdout) for writing, after checking them all: none is the
    same file as an input, another output or an existing file of the `model` directory (opening it
    would empty it). Files are opened without truncating and emptied only once every one has
    opened, so a failure leaves every existing file as it was. Returns {flag: file or None}."""
    from .errors import InvalidArgumentError
    from .validation import check_not_an_input

    for flag, path in outputs.items():
        check_not_an_input(path, flag, {**inputs, **{f: p for f, p in outputs.items() if f != flag}})
        if path is not None and model is not None and Path(path).exists() \
                and Path(model).resolve() in Path(path).resolve().parents:
            raise InvalidArgumentError(f"{flag} {path} is a file of --model {model}: writing it would destroy it; "
                                       "pick another file")
    opened = {}
    try:
        for flag, path in outputs.items():
            if path is None:
                opened[flag] = None
                continue
            try:
                opened[flag] = open(path, "a", encoding="utf-8")
            except OSError as exc:
                raise InvalidArgumentError(f"{flag} {path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        for f in opened.values():
            if f is not None:
                f.close()
        raise
    for f in opened.values():
        if f is not None and os.path.isfile(f.name):
            f.seek(0)
            f.truncate()
    return opened


def _overrides(pairs: list[str]) -> dict:
    """`--key value` pairs (dashes in keys become underscores) -> {key: "value"}."""
    out, i = {}, 0
    while i < len(pairs):
        key = pairs[i]
        if not key.startswith("--") or i + 1 >= len(pairs) or pairs[i + 1].startswith("--"):
            raise SystemExit(f"error: expected '--key value' pairs, got {pairs[i:i + 2]}")
        out[key[2:].replace("-", "_")] = pairs[i + 1]
        i += 2
    return out


def _main_job_resume(overrides: dict) -> bool | None:
    """The main job's `--resume true|false` where the overrides are that alone (or nothing); else None
    (the overrides describe one run)."""
    if set(overrides) - {"resume"}:
        return None
    text = overrides.get("resume", "false").strip().lower()
    if text not in ("true", "false", "1", "0", "yes", "no"):
        raise SystemExit(f"error: --resume takes true or false, got {overrides['resume']!r}")
    return text in ("true", "1", "yes")


def cmd_train(args: argparse.Namespace, extra: list[str]) -> int:
    """Train: with no arguments, the main job (built-in task, Coconut vs baselines; `--resume true`
    continues an interrupted one); otherwise one run from --config FILE and/or --key value overrides
    (official Coconut key names)."""
    from .errors import CoconutEngineError
    from .trainer import TrainConfig, train

    overrides = _overrides(extra)
    main_job_resume = _main_job_resume(overrides) if args.config is None else None
    config = None
    try:
        if main_job_resume is not None:
            from .main_job import run_main_job

            run_main_job(task=args.task or "small", resume=main_job_resume)
            return 0
        if args.task is not None:
            raise SystemExit("error: --task picks the main job's task; it takes no --config or --key value "
                             "other than --resume")
        config = (TrainConfig.from_yaml(args.config, overrides) if args.config
                  else TrainConfig.from_dict(overrides, source="command line"))
        history = train(config)
    except CoconutEngineError as exc:
        raise SystemExit(f"error: {exc}")
    except KeyboardInterrupt:
        # checkpoints are written atomically: the newest complete one is the last good state
        main_job = main_job_resume is not None
        again = "coconut-engine train" + (f" --task {args.task}" if args.task else "") if main_job else "the command"
        flags = "--resume true" + (" --overwrite false" if config is not None and config.overwrite else "")
        if _is_main_process():  # under torchrun every rank is interrupted: one line, not one a rank
            print(f"\ninterrupted: {again} with {flags} continues from the newest complete checkpoint "
                  f"(under {'runs/default' if main_job else config.save_dir if config else 'its save_dir'})",
                  file=sys.stderr)
        return 130
    from .distributed import leave_process_group

    leave_process_group()  # under torchrun: before interpreter exit (see its docstring)
    if history:
        last = history[-1]
        print(f"done: epoch {last['epoch']} stage {last['stage']} accuracy {last['accuracy']:.3f}; "
              f"checkpoints in {config.save_dir}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a checkpoint, or a plain Hugging Face model directory with --method, on official-format JSON
    as training evaluates (answer and CoT exact match, tokens and thoughts per answer)."""
    from .data import load_records
    from .errors import CoconutEngineError, InvalidArgumentError
    from .scoring import load_for_scoring
    from .trainer import official_max_new_tokens
    from .validation import check_device

    try:
        if args.stage is not None and args.stage < 0:
            raise InvalidArgumentError(f"--stage must be >= 0, got {args.stage}")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
        if args.device is not None:
            check_device(args.device, "--device")
        records = load_records(args.data)
        max_thoughts, eot_threshold = _adaptive_settings(args, adaptive_possible=args.num_thoughts == "auto")
        # before the work: an unwritable path fails now, not after every question ran
        opened = _open_outputs({"--output": args.output, "--dump": args.dump}, {"--data": args.data}, args.model)
        out, dump = opened["--output"], opened["--dump"]
        try:
            setup = load_for_scoring(args.model, method=args.method, stage=args.stage, device=args.device,
                                     attention_backend=args.backend, c_thought=args.c_thought,
                                     pad_latent_to_max=args.pad_latent_to_max)
            max_new_tokens = args.max_new_tokens or official_max_new_tokens(args.data)
            result = setup.evaluate(records, max_new_tokens, progress=True, num_thoughts=args.num_thoughts,
                                    max_thoughts=max_thoughts, eot_threshold=eot_threshold,
                                    return_thoughts=args.dump is not None)
            if out is not None:
                out.writelines(json.dumps({k: v for k, v in g.items() if k != "thought_traces"}) + "\n"
                               for g in result["generations"])
            if dump is not None:  # per question: its answer and every thought's inspection
                dump.writelines(json.dumps(g) + "\n" for g in result["generations"])
        finally:
            for f in (out, dump):
                if f is not None:
                    f.close()
    except (CoconutEngineError, KeyError) as exc:
        raise SystemExit(f"error: {exc}")
    print(json.dumps({key: result[key] for key in ("method", "stage", "accuracy", "cot_accuracy", "tokens_per_answer",
                                                   "thoughts_per_answer")}
                     | {"num_thoughts": args.num_thoughts, "questions": len(records), "failed": len(result["errors"])}))
    for error in result["errors"]:
        print(f"ERROR: {error}", file=sys.stderr)
    if result["errors"]:
        print(f"{len(result['errors'])} of {len(records)} request(s) failed: the accuracy counts them as wrong",
              file=sys.stderr)
    return 1 if result["errors"] else 0


def cmd_data_convert(args: argparse.Namespace) -> int:
    """Convert GSM8K internalized-CoT text or ProntoQA's 5hop_0shot_random.json into official Coconut JSON."""
    from .convert.command import convert
    from .data import DataError, StageRules
    from .errors import CoconutEngineError
    from .loader import load_tokenizer
    from .validation import check_not_an_input

    try:
        splits = None
        if args.splits:
            try:
                sizes = [int(x) for x in args.splits.split(",")]
            except ValueError:
                sizes = []
            if len(sizes) != 2 or min(sizes) < 0:
                raise SystemExit(f"error: --splits takes two sizes TRAIN,VALID (the rest is test), got {args.splits!r}")
            splits = {"train": sizes[0], "valid": sizes[1]}
        outputs = [args.output] if args.format != "prontoqa" else \
            [args.output / f"prontoqa_{name}.json" for name in ("train", "valid", "test")]
        for output in outputs:
            check_not_an_input(output, "--output", {"input": args.input}, DataError)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else None
        rules = StageRules(args.c_thought, args.max_latent_stage, args.pad_latent_to_max)
        for line in convert(args.format, args.input, args.output, splits, tokenizer, args.max_length, rules):
            print(line)
    except (CoconutEngineError, ValueError) as exc:
        raise SystemExit(f"error: {exc}")
    return 0


def _ints(text: str, sep: str = ",", maxsplit: int = -1) -> list[int]:
    """The integers of `text` split at `sep`; [] where one is not an integer."""
    try:
        return [int(x) for x in text.split(sep, maxsplit)]
    except ValueError:
        return []


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process outside one (also where its environment is malformed)."""
    from .distributed import DistEnv
    from .errors import CoconutEngineError

    try:
        return DistEnv.from_environment().is_main
    except CoconutEngineError:
        return True


def _stages(text: str) -> list[int]:
    """`--stages` "0-6" or "0,2,6" -> stage list (a usage error unless stages >= 0, a range low to high)."""
    if "-" in text:
        bounds = _ints(text, "-", 1)
        stages = list(range(bounds[0], bounds[1] + 1)) if bounds else []
    else:
        stages = _ints(text)
    if not stages or min(stages) < 0:
        raise argparse.ArgumentTypeError(f"expected stages >= 0 as LOW-HIGH or a comma list, got {text!r}")
    return stages


def _positive_ints(text: str) -> list[int]:
    """`--batches` "1,16,64" -> [1, 16, 64] (a usage error unless every one is an integer >= 1)."""
    values = _ints(text)
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas, got {text!r}")
    return values


def _positive_int(text: str) -> int:
    """An integer >= 1 (a usage error otherwise)."""
    values = _ints(text)
    if len(values) != 1 or values[0] < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return values[0]


def _bench_dtype(name: str):
    """`--dtype` of `bench`: a torch dtype from its name, or a usage error that lists the names."""
    from .errors import CoconutEngineError
    from .loader import resolve_dtype

    try:
        if name == "auto":
            raise CoconutEngineError("'auto' is not a dtype here: leave --dtype out for the device's default")
        return resolve_dtype(name)
    except CoconutEngineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_bench(args: argparse.Namespace) -> int:
    """Benchmarks: train (modes by stage), generate (vs transformers and the official style), decode (one step
    with equal and ragged prompts vs transformers), kernels."""
    import torch

    from . import bench
    from .plots import plot_bench
    from .validation import check_device

    if args.device is not None:
        check_device(args.device, "--device")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype is not None and args.what == "train":
        raise SystemExit("error: --dtype applies to bench generate, decode and kernels: bench train keeps fp32 weights "
                         "(with bf16 autocast on a GPU, as the trainer does)")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise SystemExit(f"error: --out {out} is a file; it names the folder the results go to")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SystemExit(f"error: --out {out}: cannot make the folder ({exc.strerror or exc})") from None
    stamp = f"{args.what}-{args.shape}-{device}"
    if args.what != "train":
        dtype = bench.serving_dtype(device, args.dtype)
        stamp += f"-{str(dtype).removeprefix('torch.')}"
    if args.what == "train":
        modes = args.modes.split(",") if args.modes else list(bench.TRAIN_MODES)
        unknown = sorted(set(modes) - set(bench.TRAIN_MODES))
        if unknown:
            raise SystemExit(f"error: unknown mode(s) {unknown}; known: {', '.join(bench.TRAIN_MODES)}")

        def show(row):
            tensors = f"  {row['tensor_mb']:8.1f} MB tensors" if "tensor_mb" in row else ""
            print(f"stage {row['stage']} {row['mode']:<12} {row['median_ms']:9.1f} ms  {row['peak_mb']:8.1f} MB peak "
                  f"{row['step_mb']:8.1f} MB step{tensors}", flush=True)

        rows = bench.bench_train(args.shape, args.stages, modes, batch=args.batch, reps=args.reps,
                                 device=device, backend=args.backend, prompt_len=args.prompt_len,
                                 tensor_memory=args.tensor_memory, interleave=args.interleave, progress=show)
        table = bench.format_train_table(rows)
        plot_bench(rows, out / f"{stamp}.png", title=f"bench train --shape {args.shape} ({device})")
    elif args.what == "generate":
        rows = bench.bench_generate(args.shape, batch=args.batch, device=device, backend=args.backend, reps=args.reps,
                                    dtype=dtype, progress=lambda r: print(f"{r['name']}: {r['tokens_per_s']:.1f} tok/s", flush=True))
        table = "\n".join(["| what | seconds | tokens/s |", "|---|---:|---:|"] +
                          [f"| {r['name']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |" for r in rows])
    elif args.what == "decode":
        rows = bench.bench_decode_steps(args.shape, batches=args.batches,
                                        prompt_len=args.prompt_len, steps=args.reps, device=device,
                                        backend=args.backend, dtype=dtype,
                                        progress=lambda r: print(f"B={r['batch']} {r['contender']}: {r['median_ms']:.1f} ms",
                                                                 flush=True))
        table = "\n".join(["| batch | contender | ms per step | ms per token |", "|---:|---|---:|---:|"] +
                          [f"| {r['batch']} | {r['contender']} | {r['median_ms']:.1f} | {r['ms_per_token']:.2f} |"
                           for r in rows])
    else:
        timings = bench.bench_kernels(device=device, dtype=dtype)
        rows = [t.as_dict() for t in timings]
        table = bench.format_table(timings)
    (out / f"{stamp}.json").write_text(json.dumps(rows, indent=2))
    print(table)
    print(f"results: {out / stamp}.json")
    return 0


_TINY = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=256),
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
    "qwen2": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=256),
}


def _thought_arguments(parser: argparse.ArgumentParser, default, help_default: str) -> None:
    """--num-thoughts K|auto, --max-thoughts, --eot-threshold (eval and generate)."""
    parser.add_argument("--num-thoughts", type=thought_count, default=default,
                        help=f"thoughts per question, or 'auto' to stop when p(<eot>) > --eot-threshold "
                             f"(default {help_default})")
    parser.add_argument("--max-thoughts", type=int, default=None, help="upper bound for --num-thoughts auto (default 8)")
    parser.add_argument("--eot-threshold", type=float, default=None,
                        help="p(<eot>) that ends thinking (auto; default 0.5)")


def _adaptive_settings(args: argparse.Namespace, adaptive_possible: bool) -> tuple[int, float]:
    """(max_thoughts, eot_threshold) of an eval or generate command; given where nothing thinks
    adaptively (`adaptive_possible` False: eval without --num-thoughts auto) they would be ignored:
    an error saying so."""
    from .errors import InvalidArgumentError

    given = [flag for flag, value in (("--max-thoughts", args.max_thoughts), ("--eot-threshold", args.eot_threshold))
             if value is not None]
    if given and not adaptive_possible:
        raise InvalidArgumentError(f"{' and '.join(given)} appl{'y' if len(given) > 1 else 'ies'} only with "
                                   "--num-thoughts auto")
    return (8 if args.max_thoughts is None else args.max_thoughts,
            0.5 if args.eot_threshold is None else args.eot_threshold)


class _PrintVersion(argparse.Action):
    """`--version`: the engine's version and the torch build it runs on (what a bug report needs
    first); torch is imported only when asked, so every other command starts as fast as before."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="print the version and the torch build, then exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import torch

        from . import __version__

        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU build"
        print(f"coconut-engine {__version__} (torch {torch.__version__}, {build})")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="coconut-engine", description=__doc__)
    parser.add_argument("--version", action=_PrintVersion)
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser("smoke", help=cmd_smoke.__doc__)
    smoke.add_argument("--family", choices=sorted(_TINY), default="gpt2")
    smoke.add_argument("--thoughts", type=int, default=3)
    smoke.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    smoke.set_defaults(func=cmd_smoke)

    tr = sub.add_parser("train", help=cmd_train.__doc__, description=cmd_train.__doc__)
    tr.add_argument("--config", type=Path, help="YAML config (official Coconut keys)")
    tr.add_argument("--task", choices=("small", "prosqa"), default=None,
                    help="the main job's task (no other arguments but --resume true): small (default, the 24-name task) or prosqa "
                         "(questions from ProsQA's own distribution, warmed up on small ProsQA graphs; see README)")
    tr.set_defaults(func=cmd_train, takes_extra=True)

    ev = sub.add_parser("eval", help=cmd_eval.__doc__)
    ev.add_argument("--model", required=True, type=Path,
                    help="a checkpoint directory written by the trainer, or a plain HF model directory (with --method)")
    ev.add_argument("--data", required=True, type=Path, help="official-format JSON")
    ev.add_argument("--method", choices=["no_cot", "cot", "coconut", "no_thoughts", "pause_as_thought"], default=None,
                    help="how to prompt the model (default: the checkpoint's mode; required for a plain directory)")
    ev.add_argument("--stage", type=int, default=None, help="curriculum stage (default: the checkpoint's, else 0)")
    ev.add_argument("--c-thought", type=int, default=None, help="thoughts per stage (default: the checkpoint's, else 1)")
    ev.add_argument("--pad-latent-to-max", action="store_true", default=None,
                    help="give every question the stage's thoughts (default: capped at its steps, as official)")
    ev.add_argument("--max-new-tokens", type=int, default=None, help="default: the official 64 (GSM8K) or 128")
    ev.add_argument("--output", type=Path, help="write the generations as JSONL")
    ev.add_argument("--dump", type=Path, help="write per question its generation and thoughts (norm, nearest "
                    "tokens, p(<eot>)) as JSONL")
    _thought_arguments(ev, default=None, help_default="the stage's")
    ev.add_argument("--device", default=None)
    ev.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    ev.set_defaults(func=cmd_eval)

    data = sub.add_parser("data", help="data files: convert")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    conv = data_sub.add_parser("convert", help=cmd_data_convert.__doc__, description=cmd_data_convert.__doc__)
    conv.add_argument("format", choices=["gsm8k", "prontoqa"])
    conv.add_argument("input", type=Path, help="gsm8k: gsm_{split}.txt lines; prontoqa: 5hop_0shot_random.json")
    conv.add_argument("--output", "-o", required=True, type=Path,
                      help="gsm8k: the JSON file to write; prontoqa: the directory for prontoqa_{train,valid,test}.json")
    conv.add_argument("--splits", default=None, help="prontoqa: TRAIN,VALID sizes (default 9000,200, as official)")
    conv.add_argument("--max-length", type=int, default=None,
                      help="drop records whose longest training sample exceeds this many tokens (needs --tokenizer)")
    conv.add_argument("--tokenizer", type=Path, default=None, help="model directory whose tokenizer counts tokens")
    conv.add_argument("--c-thought", type=int, default=1, help="curriculum for --max-length (thoughts per stage)")
    conv.add_argument("--max-latent-stage", type=int, default=6)
    conv.add_argument("--pad-latent-to-max", action="store_true")
    conv.set_defaults(func=cmd_data_convert)

    be = sub.add_parser("bench", help=cmd_bench.__doc__)
    be.add_argument("what", choices=["train", "generate", "decode", "kernels"])
    from .bench import SHAPES

    be.add_argument("--shape", default="tiny", choices=sorted(SHAPES), help="model shape")
    be.add_argument("--stages", default="0-6", type=_stages, help="curriculum stages, e.g. 0-6 or 0,3,6 (train)")
    be.add_argument("--modes", default=None, help="comma-separated train modes (default: all)")
    be.add_argument("--batch", type=_positive_int, default=8)
    be.add_argument("--batches", default="1,16,64", type=_positive_ints,
                    help="decode: the batch sizes whose step is timed")
    be.add_argument("--prompt-len", type=_positive_int, default=250)
    be.add_argument("--reps", type=_positive_int, default=3)
    be.add_argument("--device", default=None)
    be.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    be.add_argument("--dtype", default=None, type=_bench_dtype,
                    help="generate, decode, kernels: the weights' (or kernels' inputs') dtype, float32 | float16 | "
                         "bfloat16 (default: bfloat16 on a GPU, float32 on a CPU)")
    be.add_argument("--no-interleave", dest="interleave", action="store_false",
                    help="train: time each point in its own process instead of a stage's modes taking turns in one")
    be.add_argument("--tensor-memory", choices=["all", "last", "none"], default="last",
                    help="train on CPU: which stages' points also get the exact tensor memory (a profiled step in a "
                         "process of its own): every stage, the last one (default: one profiled point per mode), none")
    be.add_argument("--no-tensor-memory", dest="tensor_memory", action="store_const", const="none",
                    help="the same as --tensor-memory none")
    be.add_argument("--out", default="runs/bench")
    be.set_defaults(func=cmd_bench)

    gen = sub.add_parser("generate", help=cmd_generate.__doc__)
    gen.add_argument("prompts", nargs="*", help="prompt texts")
    gen.add_argument("--model", required=True, type=Path, help="HF model directory (config, safetensors, tokenizer)")
    gen.add_argument("--input", type=Path, help="JSONL with 'prompt' or 'question' (+ optional 'num_thoughts')")
    gen.add_argument("--output", type=Path, help="JSONL results (default: print texts)")
    _thought_arguments(gen, default=None,
                       help_default="the thoughts a Coconut checkpoint was trained with (coconut.json), else 0")
    gen.add_argument("--show-thoughts", action="store_true",
                     help="print each thought's norm, p(<eot>) and nearest tokens (and add them to --output)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--n", type=int, default=1, help="samples per prompt (they share the prompt's pages)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--max-pages", type=int, default=2048)
    gen.add_argument("--page-size", type=int, default=16)
    gen.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default float32)")
    gen.add_argument("--device", default=None)
    gen.add_argument("--backend", choices=["auto", "torch", "triton"], default="auto")
    gen.add_argument("--allow-long-context", action="store_true",
                     help="let a RoPE model run past max_position_embeddings (its trained length)")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import CoconutEngineError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if not getattr(args, "takes_extra", False) and extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args, extra) if getattr(args, "takes_extra", False) else args.func(args)
    except CoconutEngineError as exc:  # every command: a bad argument or input is one line, not a traceback
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
