"""matplotlib figures, drawn headless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_training_curves"]


def plot_training_curves(history: list[dict], step_losses: list[float], path: str | Path, *, title: str = "") -> Path:
    """Loss and accuracy per epoch (train and val) and the loss of every iteration."""
    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc, ax_steps) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax_loss.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    ax_loss.plot(epochs, [row["val_loss"] for row in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss per epoch (train with label smoothing)")
    ax_acc.plot(epochs, [100 * row["train_acc"] for row in history], "o-", label="train")
    ax_acc.plot(epochs, [100 * row["val_acc"] for row in history], "o-", label="val")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy per epoch")
    ax_steps.plot(range(1, len(step_losses) + 1), step_losses, linewidth=0.8)
    ax_steps.set(xlabel="iteration", ylabel="training loss", title="loss per iteration")
    for ax in (ax_loss, ax_acc, ax_steps):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.legend()
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
