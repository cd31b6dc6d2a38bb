"""The command line: generate (arguments and JSONL), the main job at a tiny scale, smoke."""
import json
import os
import subprocess
import sys

import transformers

from coconut_engine.main_job import run_main_job
from coconut_engine.tasks import ProsQAConfig, generate_prosqa, prosqa_vocabulary
from test_tokenizer import build_gpt2_tokenizer_dir


def cli(*args, timeout=300):
    env = dict(os.environ, COCONUT_ATTENTION_BACKEND="torch")
    return subprocess.run([sys.executable, "-m", "coconut_engine.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_generate_from_arguments_and_jsonl(tmp_path):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=50257, n_positions=128)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "m")
    build_gpt2_tokenizer_dir(tmp_path / "m")
    proc = cli("generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "5", "Every wumpus is", "Tom is")
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) >= 2
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"question": "Is Tom a wumpus?"}) + "\n" + json.dumps({"prompt": "Hi"}) + "\n")
    out = tmp_path / "a.jsonl"
    proc = cli("generate", "--model", str(tmp_path / "m"), "--max-new-tokens", "4", "--n", "2", "--temperature", "1",
               "--input", str(questions), "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert rows[0]["prompt"] == "Is Tom a wumpus?\n" and all(r["generated_tokens"] == 4 for r in rows)
    proc = cli("generate", "--model", str(tmp_path / "m"), "--num-thoughts", "2", "hello")
    assert proc.returncode == 1 and "thoughts need the special tokens" in proc.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    proc = cli("generate", "--model", str(tmp_path / "m"), "--input", str(bad))
    assert proc.returncode != 0 and "bad.jsonl:1: not valid JSON" in proc.stderr


def test_train_rejects_unknown_keys(tmp_path):
    proc = cli("train", "--learning-rate", "1e-3", "--save_dir", str(tmp_path))
    assert proc.returncode != 0 and "unknown key(s) ['learning_rate']" in proc.stderr


def test_main_job_runs_end_to_end_at_a_tiny_scale(tmp_path, capsys, monkeypatch):
    """The default main job (the small task) trains the curriculum and the no-CoT baseline, and scores a
    given split (here 6 ProsQA-distribution questions standing in for the real one) once, with the
    final Coconut model; failed requests count as wrong and are reported, not raised."""
    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")  # "auto" would pick the Triton interpreter here
    split = tmp_path / "split.json"
    split.write_text(json.dumps(generate_prosqa(6, ProsQAConfig.official_like(), seed=99)))
    result = run_main_job(tmp_path / "run", scale=0.01, progress=False, real_split=split)
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["no-CoT", "CoT (stage 0)", "Coconut stage 1", "Coconut stage 2", "Coconut stage 3"]
    # evaluation caps a question's thoughts at its steps (the official collator): 2-step questions get 2 at stage 3
    steps = [len(r["steps"]) for r in json.loads((tmp_path / "run" / "coconut" / "data" / "val.json").read_text())]
    stage3 = sum(min(3, n) for n in steps) / len(steps)
    assert [r["thoughts"] for r in result["rows"]] == [0, 0, 1, 2, stage3]
    assert all(0.0 <= r["accuracy"] <= 1.0 and "real_accuracy" not in r for r in result["rows"])
    assert result["task"] == "small" and result["real_split"] is None  # not scored per stage
    assert result["prosqa_valid_accuracy"] in {i / 6 for i in range(7)} and result["prosqa_valid_questions"] == 6
    assert 0 <= result["prosqa_valid_failed"] <= 6
    out = capsys.readouterr().out
    assert "| method | thoughts | held-out accuracy | generated tokens / answer |" in out
    assert f"| Coconut stage 3 | {stage3:.1f} |" in out and "process CPU time" in out
    assert f"Final Coconut model on the real ProsQA validation split ({split})" in out
    assert (tmp_path / "run" / "results.md").is_file() and (tmp_path / "run" / "coconut" / "training.png").is_file()
    train = json.loads((tmp_path / "run" / "coconut" / "data" / "train.json").read_text())
    assert len({s for r in train for s in r["idx_to_symbol"] if s.islower()}) <= 24  # the 24-name concept pool
    staged = [json.loads(line) for line in (tmp_path / "run" / "coconut" / "metrics.jsonl").read_text().splitlines()]
    assert not any("real_accuracy" in m for m in staged)


def test_main_job_prosqa_task_runs_end_to_end_at_a_tiny_scale(tmp_path, capsys, monkeypatch):
    """`task="prosqa"` trains on ProsQA-distribution questions, adds the all-latent stage, and scores a
    given split (here 6 generated questions standing in for the real one) at the end of every stage
    and of the no-CoT run."""
    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")  # "auto" would pick the Triton interpreter here
    split = tmp_path / "split.json"
    split.write_text(json.dumps(generate_prosqa(6, ProsQAConfig.official_like(), seed=99)))
    result = run_main_job(tmp_path / "run", scale=0.01, progress=False, real_split=split, task="prosqa")
    methods = [r["method"] for r in result["rows"]]
    assert methods == ["no-CoT", "CoT (stage 0)", "Coconut stage 1", "Coconut stage 2", "Coconut stage 3",
                       "Coconut stage 4 (all steps latent)"]
    # evaluation caps a question's thoughts at its steps (the official collator)
    steps = [len(r["steps"]) for r in json.loads((tmp_path / "run" / "coconut" / "data" / "val.json").read_text())]
    capped = [sum(min(k, n) for n in steps) / len(steps) for k in (1, 2, 3, 3)]
    assert [r["thoughts"] for r in result["rows"]] == [0, 0, *capped]
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["real_accuracy"] in {i / 6 for i in range(7)} for r in result["rows"])
    out = capsys.readouterr().out
    assert "| method | thoughts | held-out accuracy | real ProsQA valid accuracy |" in out
    assert f"| Coconut stage 4 (all steps latent) | {capped[-1]:.1f} |" in out and "process CPU time" in out
    assert (tmp_path / "run" / "results.md").is_file() and (tmp_path / "run" / "coconut" / "training.png").is_file()
    train = json.loads((tmp_path / "run" / "coconut" / "data" / "train.json").read_text())
    assert {s for r in train for s in r["idx_to_symbol"]} <= set(prosqa_vocabulary.PEOPLE + prosqa_vocabulary.CONCEPTS)
    staged = [json.loads(line) for line in (tmp_path / "run" / "coconut" / "metrics.jsonl").read_text().splitlines()]
    assert [("real_accuracy" in m) for m in staged] == [True] * len(staged)  # one epoch per stage at this scale
    # `coconut-engine eval` on the final checkpoint reproduces the reported real-split number
    final = sorted((tmp_path / "run" / "coconut").glob("checkpoint-*"))[-1]
    proc = cli("eval", "--model", str(final), "--data", str(split), "--backend", "torch")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["accuracy"] == result["rows"][-1]["real_accuracy"]
    # both runs warmed up on small ProsQA-vocabulary graphs first, and started from those weights
    warm = json.loads((tmp_path / "run" / "coconut_warmup" / "data" / "train.json").read_text())
    assert max(len(r["idx_to_symbol"]) for r in warm) < min(len(r["idx_to_symbol"]) for r in train)
    for run in ("coconut_warmup", "no_cot_warmup"):
        assert sorted((tmp_path / "run" / run).glob("checkpoint-*")), run


def test_smoke_command():
    proc = cli("smoke", "--family", "llama", "--backend", "torch")
    assert proc.returncode == 0 and "logits shape (3, 256)" in proc.stdout


def test_version_names_the_engine_and_its_torch_build():
    import torch

    import coconut_engine

    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip().startswith(f"coconut-engine {coconut_engine.__version__} (torch {torch.__version__}, ")


def test_bench_dtype_is_checked_before_any_work(tmp_path):
    """A bad or inapplicable `--dtype` is a usage error naming the argument; a good one names the results file."""
    from coconut_engine.cli import build_parser

    parser = build_parser()
    assert str(parser.parse_args(["bench", "decode", "--dtype", "bf16"]).dtype) == "torch.bfloat16"
    for bad in ("nonsense", "auto"):
        proc = cli("bench", "decode", "--dtype", bad, "--out", str(tmp_path / bad))
        assert proc.returncode == 2 and "argument --dtype" in proc.stderr and not (tmp_path / bad).exists()
    proc = cli("bench", "train", "--dtype", "bf16", "--out", str(tmp_path))
    assert proc.returncode != 0 and "--dtype applies to bench generate, decode and kernels" in proc.stderr
    proc = cli("bench", "decode", "--shape", "tiny", "--batches", "1", "--prompt-len", "8", "--reps", "1",
               "--dtype", "bf16", "--backend", "torch", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "decode-tiny-cpu-bfloat16.json").read_text())
    assert {r["dtype"] for r in rows} == {"bfloat16"} and len(rows) == 4


def test_bench_train_smoke(tmp_path):
    """`coconut-engine bench train --shape tiny` runs every mode and writes its JSON and chart (no timing checks)."""
    proc = cli("bench", "train", "--shape", "tiny", "--stages", "0,2", "--reps", "1", "--batch", "3",
               "--prompt-len", "24", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "train-tiny-cpu.json").read_text())
    assert sorted({(r["stage"], r["mode"]) for r in rows}) == sorted(
        (s, m) for s in (0, 2) for m in ("paged", "two_pass", "multipass", "recompute", "transformers", "floor"))
    assert all(r["median_ms"] > 0 and r["peak_mb"] > 0 and r["timing"] == "interleaved" for r in rows)
    # exact tensor memory: at least the model's weights and gradients, plus what the step allocated
    from coconut_engine.bench import build_random_model

    weights_mb = 2 * sum(p.numel() * p.element_size() for p in build_random_model("tiny").parameters()) / 2**20
    # by default only the last stage's points are profiled (one profiled point per mode)
    assert all(("tensor_mb" in r) == (r["stage"] == 2) for r in rows)
    assert all(r["tensor_mb"] >= weights_mb + r["tensor_step_mb"] - 1e-6 and r["tensor_step_mb"] > 0
               for r in rows if r["stage"] == 2)
    assert "paged tensor MB" in proc.stdout
    assert (tmp_path / "train-tiny-cpu.png").stat().st_size > 0
    assert "| stage | paged ms |" in proc.stdout

