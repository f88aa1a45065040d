"""`edgeft predict`: top-k labels for images, from an exported file of any format (ONNX never
imports torch; TorchScript and ExecuTorch files do)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from edgeft import jsonio

from . import app, interrupt_note


@app.command("predict")
def predict_command(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders (walked for images).")],
    model: Annotated[
        Optional[Path], typer.Option(help="An exported file (default: the newest good .onnx in ./exported/).")
    ] = None,
    top_k: Annotated[int, typer.Option(help="Labels shown per image.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per image.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N] (cuda never falls back silently).")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = 8,
) -> None:
    """Classify images with an exported file's own runtime; exit 2 when any input could not be read."""
    from edgeft.devices import parse_device
    from edgeft.predict import Predictor, check_options, collect_images, newest_model

    device = parse_device(device)
    check_options(top_k=top_k, batch_size=batch_size)
    if model is None:
        model = newest_model()
        print(f"edgeft: using {model}", file=sys.stderr)
    predictor = Predictor(model, device=device)
    if predictor.gate_failure:
        print(
            f"edgeft: warning: {model} failed its accuracy gate at export and was kept with --force "
            f"({predictor.gate_failure}); its predictions may be wrong",
            file=sys.stderr,
        )
    fmt = predictor.format
    note = (
        ""
        if fmt.torch_free
        else f" ({fmt.title} files run through {fmt.runtime}, which imports torch: a slower start than ONNX)"
    )
    print(f"edgeft: running on {predictor.provider}{note}", file=sys.stderr)
    interrupt_note("interrupted; the predictions printed above are complete")
    predictions = predictor.predict_iter(collect_images(inputs), top_k=top_k, batch_size=batch_size)
    failed = _print_json(predictions) if as_json else _print_table(predictions)
    if failed:
        print(f"edgeft: {failed} input(s) could not be read", file=sys.stderr)
        raise typer.Exit(2)


def _print_json(predictions) -> int:
    """One JSON object per line, as each prediction arrives; returns the number of failures."""
    failed = 0
    for p in predictions:
        failed += p.error is not None
        print(jsonio.dumps(p.to_dict()), flush=True)
    return failed


def _print_table(predictions) -> int:
    """A Rich table of every prediction; returns the number of failures. File names, labels and
    errors are plain `Text`: never read as markup or emoji codes, so `[red]x.png` shows as written."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    table = Table()
    table.add_column("file", overflow="fold")
    table.add_column("top-k (probability)")
    failed = 0
    for p in predictions:
        failed += p.error is not None
        labels = [Text(f"{t.label} {t.prob:.1%}", style="bold" if i == 0 else "") for i, t in enumerate(p.top_k)]
        table.add_row(Text(p.file), Text(f"error: {p.error}", style="red") if p.error else Text(", ").join(labels))
    Console().print(table)
    return failed
