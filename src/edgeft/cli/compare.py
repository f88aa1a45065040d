"""`edgeft compare`: from scratch vs frozen-then-fine-tuned vs fully fine-tuned, as one table and plot."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from edgeft.config import STEMS
from edgeft.config import TrainConfig as C

from . import THREADS_HELP, app, load_note
from .helptext import DATA_CHOICES, one_of


@app.command("compare")
def compare_command(
    weights: Annotated[str, typer.Option(help="imagenet, or an edgeft checkpoint trained on other data (offline).")],
    model: Annotated[str, typer.Option(help="Backbone, see `edgeft models`.")] = C.model,
    data: Annotated[str, typer.Option(help=DATA_CHOICES)] = C.data,
    data_root: Annotated[str, typer.Option(help="Folder of the torchvision datasets.")] = C.data_root,
    freeze_epochs: Annotated[
        Optional[int],
        typer.Option(
            help="Head-only epochs of the 'frozen' run (default: 2, at most --epochs - 1).", show_default=False
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of each of the three runs (at least 2).")] = C.epochs,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = C.batch_size,
    img_size: Annotated[
        Optional[int], typer.Option(help="Input side in pixels (default: as `edgeft train`).", show_default=False)
    ] = C.img_size,
    stem: Annotated[str, typer.Option(help=f"{one_of(STEMS)}.")] = C.stem,
    lr: Annotated[
        Optional[float], typer.Option(help="Peak learning rate (default: 3e-3 from scratch, 1e-3 fine-tuning).")
    ] = C.lr,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | cuda:N.")] = C.device,
    seed: Annotated[int, typer.Option(help="Seed of every run (the same for all three).")] = C.seed,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = C.threads,
    out: Annotated[str, typer.Option(help="Parent of the comparison folder.")] = C.out,
) -> None:
    """Train one backbone three ways on the same data and compare the curves."""
    config = C(
        model=model,
        data=data,
        data_root=data_root,
        epochs=epochs,
        batch_size=batch_size,
        img_size=img_size,
        stem=stem,
        lr=lr,
        device=device,
        seed=seed,
        threads=threads,
        out=out,
        patience=0,
    )
    from rich.console import Console
    from rich.markup import escape

    from edgeft.progress import say

    say(f"edgeft compare: three runs of {epochs} epochs (scratch, frozen, finetune); starting (importing torch)")
    load_note()
    from edgeft.compare import compare

    result = compare(config, weights=weights, freeze_epochs=freeze_epochs, progress=True)
    console = Console()
    console.print(_table(result.rows))
    console.print(f"table: {escape(result.files['md'])}  plot: {escape(result.files['png'])}")


def _table(rows: list[list[str]]):
    """The comparison at 80 columns: labels wrap, numbers and names never lose a character."""
    from rich import box
    from rich.table import Table

    head, *body = rows
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0))
    for i, name in enumerate(head):
        longest = max(len(word) for row in (head, *body) for word in row[i].split())
        if i == 1:  # the weights: whole names, folded only when longer than the screen
            table.add_column(name, min_width=max(len(row[i]) for row in body), overflow="fold")
        else:  # as narrow as their longest value or heading word: headings wrap, values never
            table.add_column(
                name, width=max(longest, *(len(row[i]) for row in body)), justify="left" if i < 2 else "right"
            )
    for row in body:
        table.add_row(*row)
    return table
