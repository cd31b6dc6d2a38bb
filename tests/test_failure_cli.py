"""Issue 18, command line: generate and eval report bad input as errors (no traceback), open the
output first and write results as they finish, and exit non-zero when a request failed."""
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from coconut_engine import cli
from coconut_engine.checkpoint import checkpoint_dirs
from coconut_engine.errors import InvalidArgumentError
from coconut_engine.generate import Generator
from coconut_engine.trainer import Trainer
from test_trainer import tiny


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    Trainer(tiny(root, num_epochs=1)).run()
    return checkpoint_dirs(root / "run")[-1], root / "run" / "data" / "val.json"


def run(*argv):
    """`coconut-engine ARGV` in this process: (exit code, SystemExit message or None)."""
    try:
        return cli.main([*argv, "--backend", "torch"]), None
    except SystemExit as exc:
        return (exc.code if isinstance(exc.code, int) else 1), (None if isinstance(exc.code, int) else exc.code)


@pytest.mark.parametrize("line,message", [
    ({"prompt": 5}, r"q\.jsonl:2: 'prompt' must be a string, got int 5"),
    ({"question": ["a"]}, r"q\.jsonl:2: 'question' must be a string, got list"),
    ({"prompt": "hi", "num_thoughts": "abc"}, r"q\.jsonl:2: 'num_thoughts' must be an integer >= 0 or .auto., got str 'abc'"),
    ({"prompt": "hi", "num_thoughts": 2.7}, r"q\.jsonl:2: 'num_thoughts' must be an integer >= 0 or .auto., got float 2\.7"),
    ({"prompt": "hi", "num_thoughts": True}, r"q\.jsonl:2: 'num_thoughts' must be an integer >= 0 or .auto., got bool True"),
    # a misspelt key was ignored (the command line's thoughts were used); two texts, one silently dropped
    ({"prompt": "hi", "num_thought": 3}, r"q\.jsonl:2: unknown key 'num_thought' \(did you mean 'num_thoughts'\?\)"),
    ({"prompt": "hi", "Prompt": "hi"}, r"q\.jsonl:2: unknown key 'Prompt' \(did you mean 'prompt'\?\)"),
    ({"prompt": "hi", "question": "ho"}, r"q\.jsonl:2: both 'prompt' and 'question': give one"),
    ({"questions": "hi"}, r"q\.jsonl:2: unknown key 'questions' \(did you mean 'question'\?\)"),
    ({"prompt": "hi", "num-thoughts": 2}, r"q\.jsonl:2: unknown key 'num-thoughts' \(did you mean 'num_thoughts'\?\)"),
])
def test_generate_rejects_malformed_request_lines(checkpoint, tmp_path, line, message):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps(line) + "\n")
    code, error = run("generate", "--model", str(checkpoint[0]), "--input", str(path))
    assert code != 0 and error.startswith("error: ") and __import__("re").search(message, error)


def test_request_lines_may_be_official_records(tmp_path):
    from coconut_engine.requests import PromptRequest, read_requests

    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"question": "Is Tom a wumpus?", "answer": "Yes.", "steps": ["Tom is a wumpus."],
                                "num_thoughts": 2, "question_id": 7, "prompt_id": "a", "subquestion": "x",
                                "idx_to_symbol": ["Tom"], "target": 1, "neg_target": 2}) + "\n")
    assert read_requests(path) == [PromptRequest("Is Tom a wumpus?\n", 2)]


def test_generate_input_and_model_errors_are_clear(checkpoint, tmp_path):
    model = str(checkpoint[0])
    (tmp_path / "latin1.jsonl").write_bytes(json.dumps({"prompt": "caf\xe9"}).encode("latin-1").replace(b"\\u00e9", b"\xe9"))
    code, error = run("generate", "--model", model, "--input", str(tmp_path / "latin1.jsonl"))
    assert code != 0 and "latin1.jsonl: not UTF-8 text" in error
    code, error = run("generate", "--model", model, "--input", str(tmp_path / "missing.jsonl"))
    assert code != 0 and "missing.jsonl: file not found" in error
    code, error = run("generate", "--model", str(tmp_path), "hello")
    assert code != 0 and error.startswith("error: ") and "config.json not found" in error
    code, error = run("generate", "--model", model, "--top-p", "0", "hello")
    assert code != 0 and "top_p must be > 0.0" in error


def test_generate_opens_the_output_first_and_writes_results_as_they_finish(checkpoint, tmp_path, monkeypatch):
    model = str(checkpoint[0])
    loads = []
    monkeypatch.setattr("coconut_engine.loader.load_model", lambda *a, **k: loads.append(a))
    code, error = run("generate", "--model", model, "--output", str(tmp_path / "no" / "such" / "dir.jsonl"), "hi")
    assert code != 0 and "--output" in error and "cannot write" in error and loads == []  # before the work
    monkeypatch.undo()

    step, calls = Generator._step, {"n": 0}

    def crash_on_second_step(self, running, params):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return step(self, running, params)

    monkeypatch.setattr(Generator, "_step", crash_on_second_step)
    requests, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    requests.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": ""}, {"prompt": "Tom is a"}, {"prompt": "Tom is a", "num_thoughts": 2}]))
    with pytest.raises(KeyboardInterrupt):  # request 0 is bad, 1 finishes in step 1, 2 is in its thoughts
        run("generate", "--model", model, "--input", str(requests), "--output", str(out), "--max-new-tokens", "1")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["index"], r["finish_reason"]) for r in rows] == [(0, "error"), (1, "length")]


def test_generate_exits_non_zero_when_a_request_fails(checkpoint, tmp_path):
    out = tmp_path / "a.jsonl"
    code, _ = run("generate", "--model", str(checkpoint[0]), "--output", str(out), "--max-new-tokens", "2",
                  "Tom is", "x " * 1100)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert code == 1 and rows[0]["error"] is None and "learned positions stop at 1024" in rows[1]["error"]


def test_eval_reports_failed_requests_and_exits_non_zero(checkpoint, tmp_path, capsys):
    model, data = map(str, checkpoint)
    code, error = run("eval", "--model", model, "--data", data, "--stage", "-1")
    assert code != 0 and "--stage must be >= 0, got -1" in error
    code, error = run("eval", "--model", model, "--data", data, "--max-new-tokens", "1100")
    captured = capsys.readouterr()
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 1 and summary["failed"] == summary["questions"] > 0
    assert "ERROR: record 0: request 0:" in captured.err and "request(s) failed" in captured.err
    code, _ = run("eval", "--model", model, "--data", data, "--max-new-tokens", "3")
    assert code == 0 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["failed"] == 0
    code, error = run("eval", "--model", model, "--data", str(tmp_path / "nope.json"))
    assert code != 0 and "nope.json: file not found" in error


def test_requests_keep_unicode_line_separators_inside_prompts(tmp_path):
    # json.dumps(ensure_ascii=False) writes U+2028, \x0c, \x85 raw inside a string: still one line each
    from coconut_engine.requests import read_requests

    path = tmp_path / "q.jsonl"
    prompts = ["a\u2028b", "form\x0cfeed \x85 next", "plain"]
    path.write_text("".join(json.dumps({"prompt": p}, ensure_ascii=False) + "\r\n" for p in prompts), encoding="utf-8")
    assert [r.prompt for r in read_requests(path)] == prompts
    path.write_text('{"prompt": "ok"}\n\u2028\n{"prompt": 5}\n', encoding="utf-8")
    with pytest.raises(Exception, match=r"q\.jsonl:3: 'prompt' must be a string"):  # line numbers as an editor's
        read_requests(path)


def test_eval_data_that_cannot_be_read_is_an_error_naming_it(checkpoint, tmp_path):
    code, error = run("eval", "--model", str(checkpoint[0]), "--data", str(tmp_path))
    assert code != 0 and error == f"error: {tmp_path}: cannot read (Is a directory)"


@pytest.mark.parametrize("change,message", [
    ({"c_thought": "x"}, r"coconut\.json: c_thought must be an integer >= 0, got 'x'"),
    ({"stage": "2"}, r"coconut\.json: stage must be an integer >= 0, got '2'"),
    ({"pad_latent_to_max": "no"}, r"coconut\.json: pad_latent_to_max must be true or false, got 'no'"),
    ({"mode": "weird"}, r"coconut\.json: mode 'weird' is not one of"),
    ({"c_thought": None}, r"coconut\.json: c_thought must be an integer >= 0, got None"),
    ("c_thought", r"coconut\.json lacks c_thought \(needed to evaluate\)"),
    ({"special_tokens": {"bot": 5, "thought": 6, "eot": 5}}, r"coconut\.json: special_tokens bot and eot have the same id"),
])
def test_eval_names_malformed_curriculum_settings_in_coconut_json(checkpoint, tmp_path, change, message):
    # before: raw TypeErrors, "error: 'c_thought'", or "no" taken as true
    import shutil

    model = tmp_path / "model"
    shutil.copytree(checkpoint[0], model)
    info = json.loads((model / "coconut.json").read_text())
    info.pop(change) if isinstance(change, str) else info.update(change)
    (model / "coconut.json").write_text(json.dumps(info))
    code, error = run("eval", "--model", str(model), "--data", str(checkpoint[1]), "--max-new-tokens", "2")
    assert code != 0 and error.startswith("error: ") and re.search(message, error), error


def test_a_bad_device_is_an_error_naming_the_argument(checkpoint):
    model, data = map(str, checkpoint)
    code, error = run("generate", "--model", model, "--device", "gpu9", "hi")
    assert code != 0 and error.startswith("error: --device 'gpu9' is not a torch device")
    code, error = run("eval", "--model", model, "--data", data, "--device", "gpu9")
    assert code != 0 and error.startswith("error: --device 'gpu9' is not a torch device")
    # a torch device the engine cannot run on (it failed inside torch with a trace)
    code, error = run("generate", "--model", model, "--device", "meta", "hi")
    assert code != 0 and error.startswith("error: --device 'meta': a meta device holds no data"), error


def test_a_device_index_past_the_last_gpu_is_refused(monkeypatch):
    from coconut_engine.validation import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1", "--device") == torch.device("cuda:1")
    with pytest.raises(InvalidArgumentError, match=r"--device 'cuda:2': this machine has 2 CUDA device\(s\)"):
        check_device("cuda:2", "--device")
    assert check_device("cpu:0", "--device") == torch.device("cpu:0")


def test_main_job_reports_failed_prosqa_requests(tmp_path, monkeypatch):
    # the default main job scores the real split once and counts failed requests as wrong: it must say so
    import coconut_engine.main_job as main_job

    class Finished:
        def __init__(self, config, records, split):
            assert records is None and split is None  # the default task does not score the split per stage
            self.tokenizer = self.tokens = self.rules = None
            self.history = []
            self.decoder = SimpleNamespace(eval=lambda: None)
            self.model = SimpleNamespace(thought_transform=None)  # the identity

        def run(self):
            return [{"epoch": 1, "stage": 0, "accuracy": 0.5, "tokens_per_answer": 3.0, "val_loss": 1.0,
                     "thoughts_per_answer": 0.0, "train_seconds": 1.0}]

    valid = tmp_path / "valid.json"
    valid.write_text(json.dumps([{"question": "q?", "steps": [], "answer": "a"}] * 2))
    monkeypatch.setattr(main_job, "StageEndScoring", Finished)
    monkeypatch.setattr(main_job, "PROSQA_VALID", valid)
    monkeypatch.setattr(main_job, "evaluate", lambda *args, **kwargs: {
        "accuracy": 0.5, "errors": ["record 1: request 1: need 1100 positions"]})
    result = main_job.run_main_job(tmp_path / "out", scale=0.01, progress=False)
    assert result["prosqa_valid_failed"] == 1
    assert "1 of 2 ProsQA requests failed and count as wrong (first: record 1: request 1: need 1100 positions)" \
        in (tmp_path / "out" / "results.md").read_text()


def test_main_job_says_when_the_real_split_is_not_scored(tmp_path, monkeypatch, capsys):
    # run away from the repository, the default split is not found: the job says so before and after the run,
    # and a split named explicitly that is not a file stops the job before any training
    import coconut_engine.main_job as main_job

    class Finished:
        def __init__(self, config, records, split):
            self.tokenizer = self.tokens = self.rules = None
            self.history = []
            self.decoder = SimpleNamespace(eval=lambda: None)
            self.model = SimpleNamespace(thought_transform=None)

        def run(self):
            return [{"epoch": 1, "stage": 0, "accuracy": 0.5, "tokens_per_answer": 3.0, "val_loss": 1.0,
                     "thoughts_per_answer": 0.0, "train_seconds": 1.0}]

    absent = tmp_path / "elsewhere" / "prosqa_valid.json"
    monkeypatch.delenv(main_job.PROSQA_VALID_ENV, raising=False)
    monkeypatch.setattr(main_job, "StageEndScoring", Finished)
    monkeypatch.setattr(main_job, "PROSQA_VALID", absent)
    result = main_job.run_main_job(tmp_path / "out", scale=0.01, progress=False)
    assert result["real_split_missing"] == str(absent) and "prosqa_valid_accuracy" not in result
    out = capsys.readouterr().out
    assert out.startswith(f"The real ProsQA validation split is not scored: {absent} is not a file")
    assert f"Real ProsQA validation split not scored: {absent} is not a file" in \
        (tmp_path / "out" / "results.md").read_text()
    monkeypatch.setattr(main_job, "StageEndScoring", None)  # nothing may train
    with pytest.raises(main_job.TrainingError, match=rf"real split to score \(real_split\), {re.escape(str(absent))}, is not"):
        main_job.run_main_job(tmp_path / "out2", scale=0.01, progress=False, real_split=absent)
    monkeypatch.chdir(tmp_path)
    for named in ("missing.json", str(tmp_path)):  # named by the environment: a missing file, a directory
        monkeypatch.setenv(main_job.PROSQA_VALID_ENV, named)
        with pytest.raises(main_job.TrainingError,
                           match=rf"\(\$COCONUT_PROSQA_VALID\), {re.escape(str((tmp_path / named).resolve()))}, is not a file"):
            main_job.run_main_job(tmp_path / "out3", scale=0.01, progress=False)


def test_main_job_finds_the_real_split_beside_its_checkout_from_any_directory(tmp_path, monkeypatch):
    import coconut_engine.main_job as main_job

    monkeypatch.delenv(main_job.PROSQA_VALID_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    beside = Path(main_job.__file__).resolve().parent.parent / main_job.PROSQA_VALID
    assert main_job.real_split_path() == ((beside, False) if beside.is_file() else (main_job.PROSQA_VALID, False))
    split = tmp_path / "split.json"
    monkeypatch.setenv(main_job.PROSQA_VALID_ENV, str(split))
    assert main_job.real_split_path() == (split, True)
    assert main_job.real_split_path("x.json") == (Path("x.json"), True)


def test_train_task_picks_the_main_job_task_and_takes_nothing_else_but_resume(monkeypatch, capsys):
    """`train [--task T] [--resume true]` is the main job; Ctrl-C exits 130 naming the command that continues."""
    import coconut_engine.main_job as main_job

    called = []

    def job(**kwargs):
        called.append(kwargs)
        if len(called) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(main_job, "run_main_job", job)
    assert cli.main(["train", "--task", "prosqa"]) == 0 and cli.main(["train"]) == 0
    assert cli.main(["train", "--resume", "true"]) == 0
    assert called == [{"task": "prosqa", "resume": False}, {"task": "small", "resume": False},
                      {"task": "small", "resume": True}]
    assert cli.main(["train", "--task", "prosqa", "--resume", "true"]) == 130
    assert ("interrupted: coconut-engine train --task prosqa with --resume true continues from the newest complete "
            "checkpoint (under runs/default)") in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--task picks the main job's task; it takes no --config or --key value"):
        cli.main(["train", "--task", "prosqa", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="--task picks the main job's task"):
        cli.main(["train", "--task", "small", "--resume", "true", "--lr", "1e-3"])
    with pytest.raises(SystemExit, match="--resume takes true or false, got 'maybe'"):
        cli.main(["train", "--resume", "maybe"])
    assert len(called) == 4


def test_ctrl_c_in_a_run_names_its_save_dir(monkeypatch, capsys, tmp_path):
    import coconut_engine.trainer as trainer

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "train", interrupted)
    assert cli.main(["train", "--save_dir", str(tmp_path / "run"), "--lr", "1e-3"]) == 130
    assert (f"interrupted: the command with --resume true continues from the newest complete checkpoint "
            f"(under {tmp_path / 'run'})") in capsys.readouterr().err
    assert cli.main(["train", "--save_dir", str(tmp_path / "run"), "--overwrite", "true"]) == 130
    assert "interrupted: the command with --resume true --overwrite false continues" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")  # under torchrun only rank 0 says it
    monkeypatch.setenv("RANK", "1")
    assert cli.main(["train", "--save_dir", str(tmp_path / "run"), "--lr", "1e-3"]) == 130
    assert "interrupted" not in capsys.readouterr().err


def test_generate_jsonl_requests_may_think_adaptively(checkpoint, tmp_path):
    """A request line's "num_thoughts": "auto" thinks as `Generator.generate(num_thoughts="auto")` does with
    the command line's --max-thoughts / --eot-threshold, next to lines with a fixed count."""
    from coconut_engine.checkpoint import read_coconut_info
    from coconut_engine.loader import load_model, load_tokenizer

    model = checkpoint[0]
    requests, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    lines = [{"question": "Is Tom a wumpus?", "num_thoughts": "auto"}, {"question": "Is Tom a wumpus?", "num_thoughts": 1}]
    requests.write_text("".join(json.dumps(r) + "\n" for r in lines))
    # a threshold of 0 leaves the thought phase at once; 1 never does (max_thoughts then ends it)
    for threshold, expected_auto in (("0", 0), ("1", 3)):
        code, error = run("generate", "--model", str(model), "--input", str(requests), "--output", str(out),
                          "--max-new-tokens", "2", "--max-thoughts", "3", "--eot-threshold", threshold)
        assert code == 0, error
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["num_thoughts"] for r in rows] == [expected_auto, 1]
    tokens, _ = read_coconut_info(model)
    gen = Generator(load_model(model, attention_backend="torch"), load_tokenizer(model), special_tokens=tokens)
    direct = gen.generate(["Is Tom a wumpus?\n"], num_thoughts="auto", max_thoughts=3, eot_threshold=1.0, max_new_tokens=2)
    assert rows[0]["token_ids"] == direct[0].token_ids


def test_an_output_is_never_one_of_the_inputs(tmp_path):
    """Opening an output for writing empties it: where it is the input (or the other output) the
    command refuses before anything is opened, and the input is intact; an unwritable --dump fails
    before the model loads, not after every question ran."""
    data = tmp_path / "v.json"
    data.write_text(json.dumps([{"question": "q?", "steps": ["s."], "answer": "a."}]))
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"prompt": "hi"}) + "\n")
    model = str(tmp_path / "no-model")
    cases = [
        (["eval", "--model", model, "--method", "cot", "--data", str(data), "--output", str(data)],
         rf"--output {data} is the same file as --data {data}"),
        (["eval", "--model", model, "--method", "cot", "--data", str(data), "--dump", str(tmp_path / "." / "v.json")],
         r"--dump .*v.json is the same file as --data"),
        (["eval", "--model", model, "--method", "cot", "--data", str(data), "--output", str(tmp_path / "o.jsonl"),
          "--dump", str(tmp_path / "o.jsonl")], r"o.jsonl is the same file as --(dump|output) "),
        (["generate", "--model", model, "--input", str(questions), "--output", str(questions)],
         r"--output .*q.jsonl is the same file as --input"),
        (["data", "convert", "gsm8k", str(data), "-o", str(data)], r"--output .*v.json is the same file as input"),
        (["eval", "--model", model, "--method", "cot", "--data", str(data), "--dump", str(tmp_path / "no" / "d.jsonl")],
         r"--dump .*no/d.jsonl: cannot write"),
    ]
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    kept = tmp_path / "kept.jsonl"
    kept.write_text("earlier results\n")
    cases += [
        (["eval", "--model", str(model_dir), "--method", "cot", "--data", str(data), "--dump",
          str(model_dir / "config.json")], r"--dump .*m/config.json is a file of --model"),
        (["generate", "--model", str(model_dir), "--output", str(model_dir / "config.json"), "hi"],
         r"--output .*m/config.json is a file of --model"),
        (["eval", "--model", model, "--method", "cot", "--data", str(data), "--output", str(kept),
          "--dump", str(tmp_path / "no" / "d.jsonl")], r"--dump .*d.jsonl: cannot write"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit, match=message):
            cli.main(argv)
    assert json.loads(data.read_text())[0]["answer"] == "a." and json.loads(questions.read_text())["prompt"] == "hi"
    assert (model_dir / "config.json").read_text() == "{}"
    assert kept.read_text() == "earlier results\n"  # a failed --dump empties no other output


def test_a_backend_that_cannot_run_is_refused_before_a_run_writes_anything(tmp_path, monkeypatch):
    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "nope")
    run = tmp_path / "run"
    with pytest.raises(SystemExit, match=r"attention_backend 'auto': COCONUT_ATTENTION_BACKEND='nope' is not one of"):
        cli.main(["train", "--model", "builtin:gpt2-micro", "--task_train_size", "16", "--task_val_size", "4",
                  "--save_dir", str(run)])
    assert not run.exists()  # a corrected command starts in an empty folder, not one "holding a run"
    with pytest.raises(SystemExit, match=r"error: COCONUT_ATTENTION_BACKEND='nope' is not one of"):
        cli.main(["smoke"])
    # the main job checks it before it clears the earlier job's outputs
    monkeypatch.chdir(tmp_path)
    earlier = tmp_path / "runs" / "default"
    (earlier / "coconut" / "checkpoint-0012").mkdir(parents=True)
    (earlier / "results.md").write_text("the earlier job's table")
    with pytest.raises(SystemExit, match=r"main job: attention backend 'auto': COCONUT_ATTENTION_BACKEND='nope'"):
        cli.main(["train"])
    assert (earlier / "coconut" / "checkpoint-0012").is_dir() and (earlier / "results.md").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--shape", "nope"], "invalid choice: 'nope'"),
    (["--stages", "abc"], "expected stages >= 0"),
    (["--stages", "5-2"], "expected stages >= 0"),
    (["--batches", "0"], "expected integers >= 1"),
    (["--reps", "0"], "expected an integer >= 1"),
    (["--prompt-len", "-5"], "expected an integer >= 1"),
])
def test_bench_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "decode", *argv])
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["generate", "--model", "m", "--input", "q.jsonl", "hi"], "give prompts as arguments or --input FILE"),
    (["train", "--lr"], "expected '--key value' pairs"),
    (["data", "convert", "gsm8k", "in.txt", "--output", "o", "--splits", "1"], "--splits takes two sizes"),
    (["data", "convert", "gsm8k", "in.txt", "--output", "o", "--splits", "a,b"], "--splits takes two sizes"),
    (["bench", "train", "--dtype", "bfloat16"], "--dtype applies to bench generate, decode and kernels"),
    (["bench", "train", "--modes", "fast"], "unknown mode(s) ['fast']"),
])
def test_every_refusal_is_one_error_line(argv, message, tmp_path, monkeypatch):
    # these printed their message without the "error: " every other refusal starts with
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert str(exc.value.code).startswith("error: ") and message in str(exc.value.code)


def test_bench_out_and_device_are_checked_first(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=r"--out .*file is a file"):
        cli.main(["bench", "kernels", "--out", str(tmp_path / "file")])
    with pytest.raises(SystemExit, match=r"--device 'foo' is not a torch device"):
        cli.main(["bench", "kernels", "--device", "foo"])


def test_an_unreadable_tokenizer_is_an_error_naming_its_files(tmp_path):
    from coconut_engine.errors import CheckpointError
    from coconut_engine.loader import load_tokenizer

    (tmp_path / "tokenizer.json").write_text("{bad")
    with pytest.raises(CheckpointError, match=r"transformers cannot load the tokenizer from tokenizer.json "
                                              r"\(JSONDecodeError"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.json").mkdir()
    with pytest.raises(CheckpointError, match=r"tokenizer.json is a folder"):
        load_tokenizer(tmp_path)


def test_eval_names_what_is_wrong_with_the_model_path(tmp_path):
    data = tmp_path / "v.json"
    data.write_text(json.dumps([{"question": "q?", "steps": [], "answer": "a."}]))
    run = tmp_path / "run"
    (run / "checkpoint-0003").mkdir(parents=True)
    (run / "checkpoint-0003" / "trainer_state.json").write_text("{}")
    for model, message in [(tmp_path / "nope", "model directory does not exist"), (data, "not a folder"),
                           (run, r"a run's folder, not a model: pick one of its checkpoints \(checkpoint-0003\)")]:
        with pytest.raises(SystemExit, match=message):
            cli.main(["eval", "--model", str(model), "--data", str(data)])


def test_adaptive_settings_without_adaptive_thinking_and_errors_once_per_request(checkpoint, capsys):
    """eval ignored --max-thoughts / --eot-threshold without --num-thoughts auto: now an error. generate
    printed a request's error once per sample (--n): now once, saying it covers every sample."""
    path, val = checkpoint
    code, message = run("eval", "--model", str(path), "--data", str(val), "--max-thoughts", "3")
    assert code == 1 and "--max-thoughts applies only with --num-thoughts auto" in message
    code, message = run("eval", "--model", str(path), "--data", str(val), "--max-thoughts", "3", "--eot-threshold", "0.4")
    assert "--max-thoughts and --eot-threshold apply only with --num-thoughts auto" in message
    capsys.readouterr()
    code, _ = run("generate", "--model", str(path), "Is Tom a wumpus?", "--n", "5", "--max-pages", "1")
    lines = capsys.readouterr().out.splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("ERROR: request 0: needs up to")
    assert lines[0].endswith("(every one of its 5 samples)")
