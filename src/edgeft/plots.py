"""matplotlib figures, drawn headless."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
from matplotlib.ticker import MaxNLocator  # noqa: E402

from edgeft.interrupts import atomic_write  # noqa: E402

__all__ = ["plot_benchmark", "plot_comparison", "plot_training_curves"]


def _save_png(fig, path: str | Path) -> Path:
    """The figure as a PNG file at `path`, written whole or not at all (`atomic_write`), then closed."""
    with atomic_write(path) as f:
        fig.savefig(f, dpi=100, format="png")
    plt.close(fig)
    return Path(path)


def plot_training_curves(history: list[dict], step_losses: list[float], path: str | Path, *, title: str = "") -> Path:
    """Loss and accuracy per epoch (train and val) and the loss of every iteration, as a PNG
    file at `path`."""
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
    return _save_png(fig, path)


def plot_benchmark(rows: list[dict], path: str | Path) -> Path:
    """p50 latency per model and runtime (one panel per batch size) and, where the rows carry
    an accuracy, accuracy against latency."""
    ok = [r for r in rows if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in ok}) or [1]
    with_accuracy = [r for r in ok if r.get("accuracy") is not None]
    panels = len(batches) + (1 if with_accuracy else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), constrained_layout=True, squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in ok))
    variants = list(dict.fromkeys(f"{r['runtime']} {r['precision']}" for r in ok))
    width = 0.8 / max(1, len(variants))
    for ax, batch in zip(axes[0], batches):
        for i, variant in enumerate(variants):
            values = [
                next(
                    (
                        r["p50_ms"]
                        for r in ok
                        if r["model"] == m and r["batch"] == batch and f"{r['runtime']} {r['precision']}" == variant
                    ),
                    0.0,
                )
                for m in models
            ]
            ax.bar([x + i * width for x in range(len(models))], values, width, label=variant)
        ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(models))], models)
        ax.set(ylabel="p50 latency (ms)", title=f"latency at batch {batch} (lower is better)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    if with_accuracy:
        ax = axes[0][-1]
        for r in with_accuracy:
            ax.scatter(r["p50_ms"], 100 * r["accuracy"])
            ax.annotate(
                f"{r['model']} {r['runtime']} {r['precision']} b{r['batch']}",
                (r["p50_ms"], 100 * r["accuracy"]),
                fontsize=7,
            )
        ax.set(xlabel="p50 latency (ms)", ylabel="accuracy (%)", title="accuracy against latency")
        ax.grid(alpha=0.3)
    return _save_png(fig, path)


def plot_comparison(histories: dict[str, list[dict]], path: str | Path, *, title: str = "") -> Path:
    """Validation accuracy, validation loss and training loss per epoch, one line per run."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    panels = (
        ("val_acc", "validation accuracy (%)", 100),
        ("val_loss", "validation loss", 1),
        ("train_loss", "training loss", 1),
    )
    for ax, (key, label, scale) in zip(axes, panels):
        for name, history in histories.items():
            ax.plot([r["epoch"] for r in history], [scale * r[key] for r in history], "o-", label=name)
        ax.set(xlabel="epoch", ylabel=label, title=label)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend()
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)
