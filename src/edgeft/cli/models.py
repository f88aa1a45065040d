"""`edgeft models`: the backbones edgeft can build."""

from __future__ import annotations

import typer

from . import app


@app.command("models")
def models_command() -> None:
    """List the backbones with their size, cost at 224 px, and offline ImageNet weights."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgeft.models import list_models, model_info

    names = list_models()
    table = Table(title="edgeft models")
    table.add_column("model", no_wrap=True, min_width=max(map(len, names)))  # never cut a name short
    for column in ("params (M)", "GFLOPs @224", "ImageNet weights"):
        table.add_column(column, justify="right" if "(" in column or "@" in column else "left")
    table.add_column("weights file", overflow="fold")  # whole, on narrow terminals too
    for name in names:
        info = model_info(name)
        table.add_row(
            escape(name),
            f"{info.params_m:.1f}",
            f"{info.gflops:.2f}",
            "[green]cached[/]" if info.cached else "[yellow]download needed[/]",
            escape(info.weights_file.name),
        )
    Console().print(table)
    folder = info.weights_file.parent
    typer.echo(f"ImageNet weights are read from {folder}/ (set TORCH_HOME to move it); offline, put the file there.")
