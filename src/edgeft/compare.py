"""The transfer-learning experiment: the same backbone and data trained from scratch, fine-tuned
with the backbone frozen first, and fully fine-tuned; one table and one plot of the real runs."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from edgeft import jsonio
from edgeft.config import TrainConfig
from edgeft.errors import InputError
from edgeft.interrupts import atomic_write_text
from edgeft.plots import plot_comparison
from edgeft.progress import say
from edgeft.train import TrainResult, check_inputs, train

__all__ = ["CompareResult", "compare"]

_DESCRIPTIONS = {
    "scratch": "random weights",
    "frozen": "the head alone first, then every layer",
    "finetune": "every layer from the start",
}


@dataclass
class CompareResult:
    folder: str
    runs: dict[str, TrainResult]  # variant -> its run
    table: str  # Markdown
    files: dict[str, str]  # md, json, png
    rows: list[list[str]] = field(default_factory=list)  # the table's header and rows, for a console


def compare(
    config: TrainConfig, *, weights: str, freeze_epochs: int | None = None, progress: bool = False
) -> CompareResult:
    """Train `config` three times under <out>/compare-<model>-<data>[-N]/: `scratch` (no
    weights), `frozen` (`weights`, backbone frozen for `freeze_epochs`, default 2 but at most
    epochs - 1, then all layers) and `finetune` (`weights`, all layers from the start)."""
    if weights in ("none", ""):
        raise InputError("compare needs --weights (imagenet or an edgeft checkpoint trained on other data)")
    if config.epochs < 2:
        raise InputError(
            f"compare needs --epochs 2 or more (the 'frozen' run trains the head alone first), got {config.epochs}"
        )
    if freeze_epochs is None:
        freeze_epochs = min(2, config.epochs - 1)
    elif not 0 < freeze_epochs < config.epochs:
        raise InputError(
            f"--freeze-epochs must be between 1 and --epochs - 1 ({config.epochs - 1}), got {freeze_epochs}"
        )
    variants = {
        "scratch": replace(config, weights="none", freeze_epochs=0),
        "frozen": replace(config, weights=weights, freeze_epochs=freeze_epochs),
        "finetune": replace(config, weights=weights, freeze_epochs=0),
    }
    check_inputs(variants["frozen"])  # the weights are read before the first epoch of any run
    base = Path(config.out) / f"compare-{config.model}-{Path(config.data).name}"
    folder, n = base, 1
    while folder.exists():
        n += 1
        folder = base.with_name(f"{base.name}-{n}")
    runs = {}
    for k, (name, variant) in enumerate(variants.items(), 1):
        if progress:
            say(f"run {k}/3: {name} ({_DESCRIPTIONS[name]})")
        runs[name] = train(replace(variant, out=str(folder), name=name), progress=progress)
    rows = _rows(runs, variants)
    table = _markdown(rows)
    files = {"md": str(folder / "compare.md"), "json": str(folder / "compare.json"), "png": str(folder / "compare.png")}
    atomic_write_text(files["md"], f"# {config.model} on {config.data}: scratch vs fine-tuning\n\n{table}")
    summary = {name: {k: v for k, v in asdict(r).items() if k != "history"} for name, r in runs.items()}
    atomic_write_text(
        files["json"],
        jsonio.dumps({"weights": weights, "freeze_epochs": freeze_epochs, "runs": summary}, indent=2) + "\n",
    )
    plot_comparison(
        {name: r.history for name, r in runs.items()}, files["png"], title=f"{config.model} on {config.data}"
    )
    return CompareResult(str(folder), runs, table, files, rows)


def _rows(runs: dict[str, TrainResult], variants: dict[str, TrainConfig]) -> list[list[str]]:
    """The comparison's header and one row per run; a weights file by its name (never a path of this machine)."""
    rows = [["run", "weights", "frozen epochs", "best val acc", "best epoch", "final val loss", "img/s", "wall s"]]
    for name, r in runs.items():
        v = variants[name]
        rows.append(
            [
                name,
                Path(v.weights).name,
                str(v.freeze_epochs),
                f"{100 * r.best_val_acc:.2f} %",
                str(r.best_epoch),
                f"{r.history[-1]['val_loss']:.4f}",
                f"{r.train_images_per_s:.0f}",
                f"{r.wall_s:.1f}",
            ]
        )
    return rows


def _markdown(rows: list[list[str]]) -> str:
    head, *body = rows
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body]) + "\n"
