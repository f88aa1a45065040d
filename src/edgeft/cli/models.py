"""`edgeft models`: the backbones edgeft can build."""

from __future__ import annotations

from . import app


@app.command("models")
def models_command() -> None:
    """List the backbones with their size, cost at 224 px, and offline ImageNet weights."""
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edgeft.models import list_models, model_info

    table = Table(
        title="edgeft models (params: millions; GMACs: multiply-adds at 224 px)",
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=0,  # the column separators space the columns
    )
    for column in ("model", "params", "GMACs", "weights", "ImageNet weights file"):  # 78 columns at most
        table.add_column(column, no_wrap=True, justify="right" if column in ("params", "GMACs") else "left")
    for name in list_models():
        info = model_info(name)
        table.add_row(
            escape(name),
            f"{info.params_m:.1f}",
            f"{info.gmacs:.2f}",
            "[green]cached[/]" if info.cached else "[yellow]missing[/]",
            escape(info.weights_file.name),
        )
    console = Console()
    console.print(table)
    console.print("ImageNet weights are read from this folder (TORCH_HOME moves it); offline, put the files there:")
    print(f"{info.weights_file.parent}/")  # whole, on a line of its own: never broken for the width
