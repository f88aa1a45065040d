"""`edgeft models`: the backbones edgeft can build."""

from __future__ import annotations

import typer

from . import app


@app.command("models")
def models_command() -> None:
    """List the backbones with their size, cost at 224 px, and offline ImageNet weights."""
    from rich.console import Console
    from rich.table import Table

    from edgeft.models import list_models, model_info

    table = Table(title="edgeft models")
    for column in ("model", "params (M)", "GFLOPs @224", "ImageNet weights", "weights file"):
        table.add_column(column, justify="right" if "(" in column or "@" in column else "left")
    for name in list_models():
        info = model_info(name)
        table.add_row(
            name,
            f"{info.params_m:.1f}",
            f"{info.gflops:.2f}",
            "[green]cached[/]" if info.cached else "[yellow]download needed[/]",
            info.weights_file.name,
        )
    Console().print(table)
    folder = info.weights_file.parent
    typer.echo(f"ImageNet weights are read from {folder}/ (set TORCH_HOME to move it); offline, put the file there.")
