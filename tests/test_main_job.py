"""The main job's per-stage scoring of a fixed question set (the real ProsQA split in the job)."""
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


def test_a_fresh_main_job_clears_the_earlier_jobs_runs_before_it_trains(tmp_path, monkeypatch):
    """An earlier job's no-CoT run must not survive an interrupted fresh job: a resume would take it
    for this job's progress. Folders with files a run does not write are refused, not cleared."""
    import coconut_engine.main_job as main_job

    monkeypatch.setenv("COCONUT_ATTENTION_BACKEND", "torch")
    no_cot = tmp_path / "job" / "no_cot"
    (no_cot / "checkpoint-0001").mkdir(parents=True)
    (no_cot / "metrics.jsonl").write_text("{}\n")

    def stop(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(main_job.StageEndScoring, "run", stop)
    with pytest.raises(KeyboardInterrupt):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=_tiny_split(tmp_path))
    assert not any(no_cot.iterdir())
    (no_cot / "checkpoint-0001").mkdir()
    mine = tmp_path / "job" / "coconut" / "data" / "notes.txt"  # the Coconut run's data/ holds a user's file
    mine.write_text("mine")
    with pytest.raises(TrainingError, match=r"overwrite would remove .*coconut/data, which holds files a run does not"):
        main_job.run_main_job(tmp_path / "job", scale=0.01, progress=False, real_split=_tiny_split(tmp_path))
    assert mine.read_text() == "mine" and (no_cot / "checkpoint-0001").is_dir()  # refused before anything is removed
