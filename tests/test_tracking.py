"""log_with: tensorboard writes the step losses and every epoch metric as TensorBoard scalars."""
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from coconut_engine.trainer import Trainer, TrainingError
from test_trainer import tiny


def test_tensorboard_scalars(tmp_path):
    trainer = Trainer(tiny(tmp_path, num_epochs=2, max_eval_questions=2, log_with="tensorboard"))
    history = trainer.run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/step_loss", "train/lr", "epoch/accuracy", "epoch/cot_accuracy", "epoch/val_loss",
            "epoch/tokens_per_answer"} <= tags
    assert [e.value for e in events.Scalars("epoch/train_loss")] == pytest.approx([m["train_loss"] for m in history])
    assert [e.step for e in events.Scalars("epoch/accuracy")] == [1, 2]
    assert len(events.Scalars("train/step_loss")) == trainer.global_step
    with pytest.raises(TrainingError, match="log_with 'wandb'"):
        tiny(tmp_path, log_with="wandb")
    assert tiny(tmp_path, log_with="none").log_with is None
