"""Experiment tracking beside metrics.jsonl and training.png: `log_with: tensorboard` writes event
files under `<save_dir>/tensorboard` (TensorBoard is an optional dependency)."""
from __future__ import annotations

from pathlib import Path

from .errors import CoconutEngineError

TRACKERS = ("tensorboard",)


class TensorBoardTracker:
    """Scalars to a TensorBoard SummaryWriter: each optimizer step's loss and each epoch's metrics."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise CoconutEngineError("log_with: tensorboard needs the tensorboard package "
                                     f"(pip install tensorboard): {exc}") from exc
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """One optimizer step's training loss and learning rate."""
        self.writer.add_scalar("train/step_loss", loss, step)
        self.writer.add_scalar("train/lr", lr, step)

    def log_epoch(self, metrics: dict) -> None:
        """Every numeric metric of one epoch (accuracy, losses, tokens per answer, ...) at its epoch."""
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "epoch":
                self.writer.add_scalar(f"epoch/{key}", value, metrics["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_tracker(kind: str | None, save_dir: str | Path) -> TensorBoardTracker | None:
    """The tracker `log_with` names (None: metrics.jsonl and the PNG only)."""
    if kind is None:
        return None
    if kind != "tensorboard":
        raise CoconutEngineError(f"log_with {kind!r} is not one of {TRACKERS}")
    return TensorBoardTracker(Path(save_dir) / "tensorboard")
