"""`edgeft predict`: top-k labels for images, from an exported ONNX file (never imports torch) or an
ExecuTorch .pte (imports torch, through ExecuTorch's runtime)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from . import app


@app.command("predict")
def predict_command(
    inputs: Annotated[list[Path], typer.Argument(help="Image files and/or folders (walked for images).")],
    model: Annotated[Optional[Path], typer.Option(help="An exported .onnx file (default: the newest in ./exported/), or a .pte with the executorch extra.")] = None,
    top_k: Annotated[int, typer.Option(help="Labels shown per image.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="JSON Lines: one object per image.")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda[:N] (cuda never falls back silently).")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = 8,
) -> None:
    """Classify images with onnxruntime (or ExecuTorch for a .pte); exit 2 when any input could not be read."""
    from edgeft.predict import Predictor, collect_images, newest_model

    if model is None:
        model = newest_model()
        print(f"edgeft: using {model}", file=sys.stderr)
    predictor = Predictor(model, device=device)
    note = " (a .pte runs through ExecuTorch's runtime, which imports torch: a slower start than ONNX)" if model.suffix.lower() == ".pte" else ""
    print(f"edgeft: running on {predictor.provider}{note}", file=sys.stderr)
    predictions = predictor.predict_iter(collect_images(inputs), top_k=top_k, batch_size=batch_size)
    failed = 0
    if as_json:
        for p in predictions:
            failed += p.error is not None
            print(json.dumps(p.to_dict()), flush=True)
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table()
        table.add_column("file", overflow="fold")
        table.add_column("top-k (probability)")
        for p in predictions:
            failed += p.error is not None
            labels = ", ".join(f"[bold]{t.label}[/] {t.prob:.1%}" if i == 0 else f"{t.label} {t.prob:.1%}" for i, t in enumerate(p.top_k))
            table.add_row(p.file, f"[red]error: {p.error}[/]" if p.error else labels)
        Console().print(table)
    if failed:
        print(f"edgeft: {failed} input(s) could not be read", file=sys.stderr)
        raise typer.Exit(2)
