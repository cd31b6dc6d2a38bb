"""The main job's per-stage scoring of a fixed question set (the real ProsQA split in the job)."""
import json

import pytest

from coconut_engine.data import Record
from coconut_engine.main_job import MAIN_JOBS, StageEndScoring, default_configs, format_table
from coconut_engine.tasks import generate_prosqa
from coconut_engine.trainer import TrainConfig, TrainingError

TASK = {"num_concepts": 6, "extra_edges": 1, "person_facts": 0, "min_steps": 2, "max_steps": 2, "concept_pool": 12}


def test_the_fixed_set_is_scored_at_the_last_epoch_of_each_stage_only(tmp_path):
    cfg = TrainConfig(save_dir=str(tmp_path), model="builtin:gpt2-micro", task_train_size=16, task_val_size=4,
                      batch_size=16, stage0_epochs=1, epochs_per_stage=2, max_latent_stage=1, num_epochs=3, lr=3e-3,
                      eval_max_new_tokens=4, attention_backend="torch", progress=False, task_config=TASK)
    scored = [Record(r["question"], tuple(r["steps"]), r["answer"]) for r in generate_prosqa(3, seed=11)]
    history = StageEndScoring(cfg, scored).run()
    assert [m["stage"] for m in history] == [0, 1, 1]
    # stage 0 ends at epoch 1, stage 1 spans epochs 2-3: scored at epochs 1 and 3
    assert [("real_accuracy" in m) for m in history] == [True, False, True]
    assert history[-1]["real_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)


def test_table_has_the_real_split_column_only_when_scored():
    rows = [{"method": "no-CoT", "thoughts": 0, "accuracy": 0.75, "tokens_per_answer": 7.0, "real_accuracy": 0.6}]
    timing = {"seconds": 10.0, "cpu_seconds": 9.0, "phases": {"coconut": 6.0, "no_cot": 4.0, "training": 8.0}}
    with_real = format_table({"rows": rows, "real_split": "valid.json", **timing})
    assert "| no-CoT | 0.0 | 0.750 | 0.600 | 7.0 |" in with_real and "valid.json" in with_real
    without = format_table({"rows": rows, "real_split": None, **timing})
    assert "| no-CoT | 0.0 | 0.750 | 7.0 |" in without and "real ProsQA" not in without


def test_a_fixed_question_the_model_cannot_take_is_an_error_naming_it(tmp_path):
    cfg = TrainConfig(save_dir=str(tmp_path), model="builtin:gpt2-micro", task_train_size=16, task_val_size=4,
                      batch_size=16, stage0_epochs=1, epochs_per_stage=1, max_latent_stage=1, num_epochs=1, lr=3e-3,
                      eval_max_new_tokens=4, attention_backend="torch", progress=False, task_config=TASK)
    too_long = Record("Every wumpus is a yumpus. " * 400 + "Is Tom a wumpus or yumpus?", ("Tom is a wumpus.",),
                      "Tom is a wumpus.")
    with pytest.raises(TrainingError, match="scoring the fixed question set after epoch 1: 1 request"):
        StageEndScoring(cfg, [too_long]).run()


def test_the_default_task_is_the_small_one_and_prosqa_adds_the_all_latent_stage(tmp_path):
    runs = default_configs(tmp_path, progress=False)
    coconut, no_cot = runs.coconut, runs.no_cot
    assert runs.coconut_warmup is None and runs.no_cot_warmup is None
    assert coconut.task_config["concept_pool"] == 24 and coconut.max_latent_stage == 3
    assert (coconut.stage0_epochs, coconut.epochs_per_stage, coconut.num_epochs, no_cot.num_epochs) == (6, 2, 12, 12)
    assert no_cot.tokenizer == str(tmp_path / "coconut" / "tokenizer")
    runs = default_configs(tmp_path, progress=False, task="prosqa")
    coconut, no_cot = runs.coconut, runs.no_cot
    assert coconut.task_config == {"distribution": "prosqa"}
    settings = MAIN_JOBS["prosqa"]
    cot, per_stage = settings.coconut_epochs["cot"], settings.coconut_epochs["per_stage"]
    assert (coconut.stage0_epochs, coconut.epochs_per_stage, no_cot.num_epochs) == (cot, per_stage,
                                                                                    settings.no_cot_epochs)
    assert coconut.num_epochs == cot + per_stage * (coconut.max_latent_stage + 1)  # + the all-latent stage
    with pytest.raises(TrainingError, match="main job: unknown task 'prosq'"):
        default_configs(tmp_path, task="prosq")


def test_prosqa_runs_start_from_their_own_warmups_on_small_graphs(tmp_path):
    """Coconut warms up with CoT, no-CoT with no-CoT, on the same small-graph questions and tokenizer
    from the same initial weights; each main run starts from its warm-up's last checkpoint."""
    runs = default_configs(tmp_path, progress=False, task="prosqa")
    warm = MAIN_JOBS["prosqa"].warmup
    cw, nw = runs.coconut_warmup, runs.no_cot_warmup
    assert (cw.mode, nw.mode) == ("cot", "no_cot") and cw.num_epochs == nw.num_epochs == warm.epochs
    assert cw.task_config == nw.task_config == {"distribution": "prosqa_small"}
    assert cw.task_train_size == warm.task_train_size and cw.seed == nw.seed and cw.model == nw.model
    assert nw.train_path == str(tmp_path / "coconut_warmup" / "data" / "train.json")
    assert nw.tokenizer == str(tmp_path / "coconut_warmup" / "tokenizer")
    last = f"checkpoint-{warm.epochs:04d}"
    assert runs.coconut.model == str(tmp_path / "coconut_warmup" / last)
    assert runs.no_cot.model == str(tmp_path / "no_cot_warmup" / last)
    assert runs.no_cot.tokenizer is None  # the warm-up checkpoint's, which is the Coconut warm-up's
    assert runs.no_cot.train_path == str(tmp_path / "coconut" / "data" / "train.json")


def _tiny_split(tmp_path):
    import json

    from coconut_engine.tasks import ProsQAConfig

    split = tmp_path / "split.json"
    split.write_text(json.dumps(generate_prosqa(4, ProsQAConfig.official_like(), seed=99)))
    return split


def test_an_interrupted_main_job_resumes_where_it_stopped(tmp_path, monkeypatch):
    """Ctrl-C in the Coconut run's third epoch, then `resume`: the finished epochs are not trained
    again, and the job's table equals that of a job that was never interrupted."""
    import coconut_engine.main_job as main_job
    from coconut_engine.trainer import Trainer

    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    split = _tiny_split(tmp_path)
    whole = main_job.run_main_job(tmp_path / "whole", scale=0.01, progress=False, real_split=split)

    train_epoch, trained = Trainer._train_epoch, []

    def interrupted(self, epoch):
        if self.cfg.name == "coconut" and epoch == 2 and "resumed" not in trained:
            raise KeyboardInterrupt
        trained.append((self.cfg.name, epoch))
        return train_epoch(self, epoch)

    monkeypatch.setattr(Trainer, "_train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split)
    trained.append("resumed")  # the hook raises only before this marker
    resumed = main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split, resume=True)
    assert trained[trained.index("resumed") + 1:] == [("coconut", 2), ("coconut", 3), ("no-cot", 0)]
    assert resumed["rows"] == whole["rows"]
    assert resumed["prosqa_valid_accuracy"] == whole["prosqa_valid_accuracy"]


def _interrupt_at(monkeypatch, run_name: str, epoch: int) -> list:
    """Make the Trainer raise KeyboardInterrupt before epoch `epoch` of run `run_name`; returns the list of
    (run, epoch) trained since (cleared by the caller to count a later call's epochs)."""
    from coconut_engine.trainer import Trainer

    train_epoch, trained, armed = Trainer._train_epoch, [], [True]

    def hooked(self, e):
        if (self.cfg.name, e) == (run_name, epoch) and armed:
            armed.clear()
            raise KeyboardInterrupt
        trained.append((self.cfg.name, e))
        return train_epoch(self, e)

    monkeypatch.setattr(Trainer, "_train_epoch", hooked)
    return trained


def test_a_resume_starts_over_a_run_without_a_checkpoint_and_refuses_other_settings(tmp_path, monkeypatch):
    """Interrupted before the Coconut run's first checkpoint, its generated data must not outlive the
    settings it was drawn for: a resume at another scale draws new data; a run with a checkpoint
    and other settings is refused before anything trains; the timing line says what it covers."""
    import coconut_engine.main_job as main_job

    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    split = _tiny_split(tmp_path)
    trained = _interrupt_at(monkeypatch, "coconut", 0)
    with pytest.raises(KeyboardInterrupt):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split)
    data = tmp_path / "job" / "coconut" / "data" / "train.json"
    assert len(json.loads(data.read_text())) == 64
    result = main_job.run_main_job(tmp_path / "job", scale=0.015, progress=False, real_split=split, resume=True)
    assert len(json.loads(data.read_text())) == 90 and result["resumed_epochs"] == 0
    trained.clear()
    with pytest.raises(TrainingError, match=r"coconut/checkpoint-0004: resume with a config that changes the run "
                                            r"\(task_train_size: 90 -> 64\)"):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split, resume=True)
    assert trained == []  # refused before anything trained


def test_a_resumed_job_times_only_its_own_epochs(tmp_path, monkeypatch, capsys):
    import coconut_engine.main_job as main_job

    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    split = _tiny_split(tmp_path)
    _interrupt_at(monkeypatch, "no-cot", 0)
    with pytest.raises(KeyboardInterrupt):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split)
    result = main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split, resume=True)
    assert result["resumed_epochs"] == 4  # the Coconut run's, trained before the interruption
    assert result["phases"]["training"] <= result["seconds"]
    assert "Wall time of this process:" in capsys.readouterr().out
    assert "Resumed: 4 epoch(s) trained by an earlier process are not in these times." in (
        tmp_path / "job" / "results.md").read_text()


def test_a_resume_refuses_to_score_stages_on_another_split(tmp_path, monkeypatch):
    """A job that scores the real split at every stage end (here the small task made to) records which
    split each stage end saw; a resume with another split, or none, is refused before it trains."""
    import coconut_engine.main_job as main_job

    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    monkeypatch.setitem(main_job.MAIN_JOBS, "small", main_job.MAIN_JOBS["small"]._replace(score_every_stage=True))
    split, other = _tiny_split(tmp_path), tmp_path / "other.json"
    other.write_text(json.dumps(json.loads(split.read_text())[:3]))
    trained = _interrupt_at(monkeypatch, "no-cot", 0)
    with pytest.raises(KeyboardInterrupt):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split)
    trained.clear()
    with pytest.raises(TrainingError, match=rf"its stages were scored on {split} \(SHA-256 [0-9a-f]{{12}}\), this job "
                                            rf"would score {other} \(SHA-256 [0-9a-f]{{12}}\)"):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=other, resume=True)
    with monkeypatch.context() as absent:
        absent.setattr(main_job, "real_split_path", lambda real_split=None: (tmp_path / "absent.json", False))
        with pytest.raises(TrainingError, match=r"this job would score no split"):
            main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, resume=True)
    assert trained == []
    result = main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=split, resume=True)
    assert all("real_accuracy" in r for r in result["rows"])


def test_a_fresh_main_job_clears_the_earlier_jobs_runs_before_it_trains(tmp_path, monkeypatch):
    """An earlier job's no-CoT run must not survive an interrupted fresh job: a resume would take it
    for this job's progress. Every folder is checked before anything is removed: one with files a run
    does not write is refused and nothing is cleared. Under torchrun only rank 0 clears."""
    import coconut_engine.main_job as main_job

    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    job = tmp_path / "job"
    for run in ("coconut", "no_cot"):
        (job / run / "checkpoint-0001").mkdir(parents=True)
        (job / run / "metrics.jsonl").write_text("{}\n")
    (job / "results.md").write_text("the earlier job's table")

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_job.StageEndScoring, "run", stop)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(Exception):  # rank 1 goes straight to the Trainer (here: no process group to join)
        main_job.run_main_job(job, scale=0.01, progress=False, real_split=_tiny_split(tmp_path))
    assert (job / "no_cot" / "checkpoint-0001").is_dir()  # rank 1 cleared nothing
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    refused = tmp_path / "refused"
    (refused / "coconut" / "checkpoint-0001").mkdir(parents=True)
    (refused / "no_cot").write_text("a file where a run's folder goes")
    with pytest.raises(TrainingError, match=r"save_dir .*refused/no_cot exists and is not a folder"):
        main_job.run_main_job(refused, scale=0.01, progress=False, real_split=_tiny_split(tmp_path))
    assert (refused / "coconut" / "checkpoint-0001").is_dir()  # checked every folder before removing anything
    mine = job / "no_cot" / "data" / "notes.txt"  # a user's file where a run writes: never removed
    mine.parent.mkdir()
    mine.write_text("mine")
    (job / "coconut" / "notes.txt").write_text("mine too")  # beside the run outputs: kept
    with pytest.raises(KeyboardInterrupt):
        main_job.run_main_job(job, scale=0.01, progress=False, real_split=_tiny_split(tmp_path))
    assert [p.name for p in (job / "no_cot").iterdir()] == ["data"]  # no_cot reads the Coconut run's data: kept
    assert not (job / "coconut" / "checkpoint-0001").exists() and not (job / "coconut" / "metrics.jsonl").exists()
    assert (job / "coconut" / "notes.txt").read_text() == "mine too"  # (data/ and tokenizer/ are this job's)
    assert not (job / "results.md").exists()


def test_a_resume_checks_every_runs_checkpoint_before_clearing_any(tmp_path):
    """`--task prosqa --resume true` over a finished small-task job: its warm-up folder is empty, but the
    later runs' checkpoints belong to another job: refused, nothing removed (they were cleared unchecked)."""
    import dataclasses

    import coconut_engine.main_job as main_job

    small = main_job.default_configs(tmp_path / "job", progress=False)
    for cfg in (small.coconut, small.no_cot):
        last = tmp_path / "job" / cfg.save_dir.rsplit("/", 1)[-1] / f"checkpoint-{cfg.num_epochs:04d}"
        last.mkdir(parents=True)
        (last / "trainer_state.json").write_text(json.dumps(
            {"epochs_done": cfg.num_epochs, "global_step": 1, "history": [], "config": dataclasses.asdict(cfg)}))
    with pytest.raises(TrainingError, match=r"coconut/checkpoint-0012: resume with a config that changes the run"):
        main_job.run_main_job(tmp_path / "job", progress=False, task="prosqa", resume=True,
                              real_split=_tiny_split(tmp_path))
    assert (tmp_path / "job" / "coconut" / "checkpoint-0012").is_dir()
    assert (tmp_path / "job" / "no_cot" / "checkpoint-0012").is_dir()
