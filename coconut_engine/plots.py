"""PNG charts: training history (loss and accuracy by epoch, stage boundaries) and benchmark lines."""
from __future__ import annotations

from pathlib import Path


def _two_panels():
    """A headless figure with two side-by-side axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    return plt, fig, axes


def _save(plt, fig, path: str | Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_history(history: list[dict], path: str | Path, title: str = "") -> None:
    """Train/val loss and accuracy by epoch, with a dashed line where the curriculum stage changes."""
    if not history:
        return
    epochs = [m["epoch"] for m in history]
    plt, fig, (ax_loss, ax_acc) = _two_panels()
    ax_loss.plot(epochs, [m["train_loss"] for m in history], marker="o", label="train loss")
    ax_loss.plot(epochs, [m["val_loss"] for m in history], marker="o", label="val loss")
    ax_acc.plot(epochs, [m["accuracy"] for m in history], marker="o", color="tab:green", label="val accuracy")
    ax_acc.set_ylim(0, 1)
    for prev, cur in zip(history, history[1:]):
        if cur["stage"] != prev["stage"]:
            for ax in (ax_loss, ax_acc):
                ax.axvline(prev["epoch"] + 0.5, color="grey", linestyle="--", linewidth=0.8)
            ax_acc.text(prev["epoch"] + 0.6, 0.02, f"stage {cur['stage']}", fontsize=7, color="grey")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.legend()
    _save(plt, fig, path, title)


def plot_bench(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Step time and peak memory by stage, one line per mode (rows from bench.bench_train)."""
    plt, fig, (ax_t, ax_m) = _two_panels()
    for mode in dict.fromkeys(r["mode"] for r in rows):
        points = sorted((r["stage"], r) for r in rows if r["mode"] == mode)
        stages = [s for s, _ in points]
        ax_t.plot(stages, [r["median_ms"] for _, r in points], marker="o", label=mode)
        ax_m.plot(stages, [r["peak_mb"] for _, r in points], marker="o", label=mode)
    ax_t.set_ylabel("forward + backward (ms)")
    ax_m.set_ylabel("peak memory (MB)")
    for ax in (ax_t, ax_m):
        ax.set_xlabel("stage (thoughts per sample)")
        ax.legend()
    _save(plt, fig, path, title)
