"""Checkpoints worth keeping: the best one (by validation accuracy) survives rotation; save_only_improve."""
import json

from coconut_engine.checkpoint import best_checkpoint, checkpoint_dirs
from coconut_engine.trainer import Trainer
from test_trainer import tiny


def scripted_eval(trainer, accuracies):
    """Replace generation with a scripted accuracy per epoch (the rest of the metrics as evaluate gives)."""
    def fake(epoch, decoder):
        return {"accuracy": accuracies[epoch], "cot_accuracy": 0.0, "tokens_per_answer": 3.0,
                "thoughts_per_answer": 0.0, "val_loss": 1.0}
    trainer._evaluate = fake


def names(root):
    return [p.name for p in checkpoint_dirs(root)]


def test_best_checkpoint_is_never_rotated_away(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=4, keep_checkpoints=1))
    scripted_eval(trainer, [0.5, 0.9, 0.4, 0.3])
    trainer.run()
    root = tmp_path / "run"
    assert names(root) == ["checkpoint-0002", "checkpoint-0004"]  # the best and the newest
    assert best_checkpoint(root) == root / "checkpoint-0002"
    lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert [m["is_best"] for m in lines] == [False, True, False, False]
    assert [m["checkpoint"] for m in lines] == [f"checkpoint-000{i}" for i in range(1, 5)]


def test_save_only_improve_writes_only_better_checkpoints(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=4, save_only_improve=True))
    scripted_eval(trainer, [0.0, 0.5, 0.4, 0.9])  # official: strictly better than the best so far (from 0)
    trainer.run()
    root = tmp_path / "run"
    assert names(root) == ["checkpoint-0002", "checkpoint-0004"]
    lines = [json.loads(line) for line in (root / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 4  # every epoch is recorded, saved or not
    assert [m["checkpoint"] for m in lines] == [None, "checkpoint-0002", None, "checkpoint-0004"]
    assert [m["is_best"] for m in lines] == [False, False, False, True]
    assert best_checkpoint(root) == root / "checkpoint-0004"
