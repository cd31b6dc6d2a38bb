"""`task_fresh_each_epoch`: every epoch after the first trains on a new, deterministic draw of the built-in
task that holds no held-out question; a resumed run trains on the same draws."""
import json

import pytest
import torch

import coconut_engine.tasks as tasks
from coconut_engine.data import positions_needed
from coconut_engine.trainer import TrainConfig, Trainer, TrainingError, _task_draw_seed

TASK = {"num_concepts": 6, "extra_edges": 1, "person_facts": 0, "min_steps": 2, "max_steps": 2, "concept_pool": 12}


def config(tmp_path, name="run", **overrides):
    values = dict(save_dir=str(tmp_path / name), model="builtin:gpt2-micro", task_train_size=24, task_val_size=8,
                  batch_size=8, num_epochs=3, epochs_per_stage=1, max_latent_stage=2, lr=3e-3,
                  eval_max_new_tokens=6, attention_backend="torch", progress=False, task_config=TASK,
                  task_fresh_each_epoch=True)
    values.update(overrides)
    return TrainConfig(**values)


def questions(trainer, epoch):
    """The question texts of an epoch's records (tokenized with their newline)."""
    return [trainer.tokenizer.decode(list(rec.question)).rstrip("\n") for rec in trainer.epoch_records(epoch)]


def test_each_epoch_draws_new_questions_and_never_a_held_out_one(tmp_path):
    trainer = Trainer(config(tmp_path))
    saved = [r["question"] for r in json.loads((tmp_path / "run" / "data" / "train.json").read_text())]
    held_out = {r["question"] for r in json.loads((tmp_path / "run" / "data" / "val.json").read_text())}
    draws = [questions(trainer, epoch) for epoch in range(3)]
    assert draws[0] == saved  # the first epoch trains on the saved training set
    assert all(len(d) == 24 for d in draws)
    assert len(set(draws[1]) & set(draws[0])) < 6 and len(set(draws[2]) & set(draws[1])) < 6
    assert not held_out & (set(draws[1]) | set(draws[2]))
    again = Trainer(config(tmp_path, resume=True))  # a second process draws the same questions
    assert [questions(again, epoch) for epoch in range(3)] == draws
    other_seed = Trainer(config(tmp_path, "seed1", task_seed=1))
    assert len(set(questions(other_seed, 1)) & set(draws[1])) < 6

    plain = Trainer(config(tmp_path, "plain", task_fresh_each_epoch=False))
    assert questions(plain, 2) == questions(plain, 0) == saved


def test_samples_of_a_later_epoch_come_from_its_draw(tmp_path):
    trainer = Trainer(config(tmp_path))
    first, drawn = [r.question for r in trainer.epoch_records(0)], [r.question for r in trainer.epoch_records(1)]

    def source(sample, pool):
        return [q for q in pool if tuple(sample.prompt[:len(q)]) == q]

    samples = trainer.epoch_samples(1)
    assert len(samples) == len(drawn) and all(source(s, drawn) for s in samples)
    assert sum(not source(s, first) for s in samples) > len(samples) // 2


def test_held_out_questions_are_dropped_from_a_draw(tmp_path, monkeypatch):
    trainer = Trainer(config(tmp_path))
    held_out = json.loads((tmp_path / "run" / "data" / "val.json").read_text())
    real = tasks.generate_prosqa
    monkeypatch.setattr(tasks, "generate_prosqa", lambda n, cfg, seed: held_out[:5] + real(n - 5, cfg, seed))
    kept = questions(trainer, 1)
    assert len(kept) == 19 and not {r["question"] for r in held_out} & set(kept)

    monkeypatch.setattr(tasks, "generate_prosqa", lambda n, cfg, seed: held_out)
    with pytest.raises(TrainingError, match="epoch 3: every question of the fresh draw is a held-out question"):
        trainer.epoch_records(2)


def test_a_resumed_run_trains_on_the_same_draws(tmp_path):
    straight = Trainer(config(tmp_path, "a"))
    history = straight.run()
    Trainer(config(tmp_path, "b", num_epochs=2)).run()
    resumed = Trainer(config(tmp_path, "b", num_epochs=3, resume=True))
    assert resumed.epochs_done == 2
    resumed_history = resumed.run()
    assert [m["train_loss"] for m in resumed_history] == [m["train_loss"] for m in history]
    a, b = straight.decoder.state_dict(), resumed.decoder.state_dict()
    assert all(torch.equal(a[n], b[n]) for n in a)
    stale = Trainer(config(tmp_path, "c", num_epochs=2, task_fresh_each_epoch=False))
    stale.run()
    assert [m["train_loss"] for m in stale.history][1] != history[1]["train_loss"]


def test_fresh_draws_need_the_built_in_task(tmp_path):
    data = tmp_path / "d.json"
    data.write_text(json.dumps([{"question": "q", "steps": [], "answer": "a"}]))
    with pytest.raises(TrainingError, match="task_fresh_each_epoch .* no meaning with train_path"):
        config(tmp_path, train_path=str(data), val_path=str(data))


def test_draw_seeds_are_no_other_run_s_seed():
    """A fresh draw is seeded by a hash of (task_seed, epoch): never a small integer (another run's
    task_seed, whose first questions are that run's held-out set), never another epoch's seed."""
    seeds = {_task_draw_seed(task_seed, epoch) for task_seed in range(4) for epoch in range(1, 6)}
    assert len(seeds) == 20 and min(seeds) > 10**6


def test_resuming_a_run_saved_without_the_key_cannot_switch_fresh_draws_on(tmp_path):
    """A checkpoint from before `task_fresh_each_epoch` existed was trained on one fixed set: its missing
    key counts as the default, so turning the key on at resume is refused, naming it."""
    Trainer(config(tmp_path, task_fresh_each_epoch=False, num_epochs=1)).run()
    state_file = tmp_path / "run" / "checkpoint-0001" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["config"]["task_fresh_each_epoch"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(TrainingError, match=r"task_fresh_each_epoch: not recorded \(the default False\) -> True"):
        Trainer(config(tmp_path, resume=True))
    assert Trainer(config(tmp_path, resume=True, task_fresh_each_epoch=False)).epochs_done == 1


def test_a_draw_drops_questions_longer_than_max_length_and_counts_them(tmp_path, capsys):
    probe = Trainer(config(tmp_path, "probe"))
    need = [positions_needed(rec, probe.rules, probe.tokens, probe.cfg.max_new_tokens()) for rec in probe.val_tok]
    train_need = [positions_needed(rec, probe.rules, probe.tokens) for rec in probe.train_tok]
    limit = max(need + train_need)  # the run's own set and evaluation fit; some drawn questions do not
    trainer = Trainer(config(tmp_path, max_length=limit))
    drawn = [positions_needed(rec, trainer.rules, trainer.tokens) for e in (1, 2) for rec in trainer.epoch_records(e)]
    assert max(drawn) <= limit
    assert "dropped" in capsys.readouterr().out


def test_the_schedule_spans_full_draws_even_when_the_first_set_lost_records(tmp_path):
    """The cosine schedule's length counts task_train_size records per fresh epoch, so later (fuller) draws
    never run past its end at the floor lr."""
    varied = {"distribution": "prosqa_small"}  # questions of different lengths
    probe = Trainer(config(tmp_path, "probe", eval_max_new_tokens=1, task_config=varied))
    limit = max(positions_needed(rec, probe.rules, probe.tokens) for rec in probe.train_tok) - 1
    trainer = Trainer(config(tmp_path, max_length=limit, drop_long_records=True, lr_schedule="cosine",
                             eval_max_new_tokens=1, task_config=varied, batch_size=1))
    assert len(trainer.train_tok) < 24  # the first set lost its longest records
    assert trainer.schedule.total_steps == 3 * 24  # 3 epochs of up to 24 one-sample steps
