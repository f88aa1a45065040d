"""`edgeft export`, `edgeft validate` and `edgeft info`: exported files, their gate, their metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from edgeft import jsonio, progress
from edgeft.config import DEFAULT_OPSET, OPSETS, PRECISIONS
from edgeft.config import ExportConfig as C
from edgeft.errors import GateError, InputError
from edgeft.formats.onnx_int8 import ACTIVATION_TYPES, CALIBRATION_METHODS, QUANT_FORMATS, WEIGHT_TYPES

from . import THREADS_HELP, app, format_choices, load_note
from .helptext import one_of

_CHOICES = format_choices()
_WRITE = "What to write"
_INT8 = "int8"
_GATE = "The gate"
_OUTPUT = "Output"


def _newest_checkpoint(runs: Path = Path("runs")) -> Path:
    found = sorted(runs.glob("*/best.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise InputError("no checkpoint given and none in runs/*/best.pt; run `edgeft train` first")
    return found[-1]


def _validation_rows(v) -> list[tuple[str, str]]:
    if not v.n_images:
        return [
            ("comparison", "not run: the file does not describe the checkpoint's model"),
            ("gate", f"[red]FAILED[/]: {escape(v.reason)}"),
        ]
    rows = [
        ("reference accuracy", f"{v.reference_acc:.2%}"),
        ("exported accuracy", f"{v.exported_acc:.2%}  (drop {v.acc_drop:.2f} pt, gate {v.max_acc_drop:g} pt)"),
        ("agreement", f"top-1 {v.top1_agreement:.2%}, top-5 {v.top5_agreement:.2%}"),
        ("logit difference", f"max {v.max_abs_logit_diff:.3g} (relative {v.max_rel_logit_diff:.3g})"),
        ("probability difference", f"max {v.max_prob_diff:.3g}, mean {v.mean_prob_diff:.3g}"),
        ("images", escape(f"{v.n_images} at batch {' and '.join(map(str, v.batch_sizes))}, {v.dataset}")),
        ("ran on", escape(f"{v.provider}, " + (f"{v.threads} thread(s)" if v.threads else "default threads"))),
        ("gate", "[green]passed[/]" if v.passed else f"[red]FAILED[/]: {escape(v.reason)}"),
    ]
    return rows + [("note", f"[yellow]{escape(note)}[/]") for note in v.notes]


_CheckpointArgument = Annotated[
    Optional[Path],
    typer.Argument(help="An edgeft checkpoint (default: the newest runs/*/best.pt).", show_default=False),
]
_FormatOption = Annotated[
    str,
    typer.Option(
        help=f"{_CHOICES['formats']}. all: one file of each; auto: the fastest file that passes its gate, "
        "of every edge runtime installed (see --formats).",
        rich_help_panel=_WRITE,
    ),
]
_PrecisionOption = Annotated[
    Optional[str],
    typer.Option(
        help=f"{one_of((*PRECISIONS, 'auto'))} (each format writes: {_CHOICES['precisions']}; fp16 TorchScript: "
        "CUDA). auto: the fastest of the format's files that passes its gate. Default: fp32; auto with "
        "--format auto.",
        show_default=False,
        rich_help_panel=_WRITE,
    ),
]
_CandidateFormatsOption = Annotated[
    Optional[str],
    typer.Option(
        "--formats",
        help=f"--format auto: the formats compared, comma-separated (default: {_CHOICES['deployable']}).",
        show_default=False,
        rich_help_panel=_WRITE,
    ),
]
_OpsetOption = Annotated[
    Optional[int],
    typer.Option(
        help=f"ONNX opset, {OPSETS[0]}-{OPSETS[-1]} (default {DEFAULT_OPSET}).",
        show_default=False,
        rich_help_panel=_WRITE,
    ),
]
_DeviceOption = Annotated[
    str,
    typer.Option(
        help="cpu | cuda[:N]: where TorchScript is traced and the files are validated.", rich_help_panel=_WRITE
    ),
]
_CalibDataOption = Annotated[
    Optional[str],
    typer.Option(help="Calibration images (default: the checkpoint's training data).", rich_help_panel=_INT8),
]
_CalibSizeOption = Annotated[int, typer.Option(help="Calibration images used.", rich_help_panel=_INT8)]
_CalibMethodOption = Annotated[
    Optional[str],
    typer.Option(help=f"Calibration: {one_of(CALIBRATION_METHODS)} (default: minmax).", rich_help_panel=_INT8),
]
_ActivationTypeOption = Annotated[
    Optional[str],
    typer.Option(
        help=f"Activations: {one_of(ACTIVATION_TYPES)} (default: uint8 on x86, int8 on ARM).",
        rich_help_panel=_INT8,
    ),
]
_WeightTypeOption = Annotated[
    Optional[str],
    typer.Option(help=f"Weights: {one_of(WEIGHT_TYPES)} (default: int8).", rich_help_panel=_INT8),
]
_QuantFormatOption = Annotated[
    Optional[str], typer.Option(help=f"Graph: {one_of(QUANT_FORMATS)} (default: qdq).", rich_help_panel=_INT8)
]
_ReduceRangeOption = Annotated[
    Optional[bool],
    typer.Option(
        "--reduce-range/--no-reduce-range",
        help="7-bit int8 weights (default: on for x86 without VNNI).",
        show_default=False,
        rich_help_panel=_INT8,
    ),
]
_FallbackOption = Annotated[
    Optional[bool],
    typer.Option(
        "--fallback/--no-fallback",
        show_default=False,
        help="ONNX int8 that fails its gate: try more calibration images, another method, "
        "first conv + classifier in float (default: on).",
        rich_help_panel=_INT8,
    ),
]
_ValidateOption = Annotated[
    bool,
    typer.Option(
        "--validate/--no-validate",
        help="Compare with the checkpoint on real images and gate the result.",
        rich_help_panel=_GATE,
    ),
]
_DataOption = Annotated[
    Optional[str],
    typer.Option(help="Validation data (default: the checkpoint's validation split).", rich_help_panel=_GATE),
]
_DataRootOption = Annotated[
    Optional[str],
    typer.Option(help="Root of torchvision datasets (default: the checkpoint's).", rich_help_panel=_GATE),
]
_MaxAccDropOption = Annotated[
    Optional[float],
    typer.Option(help="Accuracy-drop gate in points (default: fp32 0, fp16 0.1, int8 1.0).", rich_help_panel=_GATE),
]
_BatchSizeOption = Annotated[int, typer.Option(help="The batch > 1 validated besides batch 1.", rich_help_panel=_GATE)]
_ForceOption = Annotated[
    bool,
    typer.Option(
        "--force", help="Keep a file that fails its gate (marked failed in its metadata).", rich_help_panel=_GATE
    ),
]
_ThreadsOption = Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False, rich_help_panel=_WRITE)]
_OutOption = Annotated[Path, typer.Option(help="Output folder.", rich_help_panel=_OUTPUT)]
_NameOption = Annotated[
    Optional[str],
    typer.Option(help="File stem (default: the run's name, plus -fp16/-int8).", rich_help_panel=_OUTPUT),
]


@app.command("export")
def export_command(
    checkpoint: _CheckpointArgument = None,
    format: _FormatOption = C.format,
    precision: _PrecisionOption = C.precision,
    candidate_formats: _CandidateFormatsOption = C.candidate_formats,
    opset: _OpsetOption = C.opset,
    device: _DeviceOption = C.device,
    calib_data: _CalibDataOption = C.calib_data,
    calib_size: _CalibSizeOption = C.calib_size,
    calib_method: _CalibMethodOption = C.calib_method,
    activation_type: _ActivationTypeOption = C.activation_type,
    weight_type: _WeightTypeOption = C.weight_type,
    quant_format: _QuantFormatOption = C.quant_format,
    reduce_range: _ReduceRangeOption = C.reduce_range,
    fallback: _FallbackOption = C.fallback,
    validate: _ValidateOption = C.validate,
    data: _DataOption = C.data,
    data_root: _DataRootOption = C.data_root,
    max_acc_drop: _MaxAccDropOption = C.max_acc_drop,
    batch_size: _BatchSizeOption = C.batch_size,
    force: _ForceOption = C.force,
    threads: _ThreadsOption = C.threads,
    out: _OutOption = Path(C.out),
    name: _NameOption = C.name,
) -> None:
    """Write exported files that carry their classes and preprocessing, proven on real images."""
    options = dict(locals())
    options["checkpoint"] = str(checkpoint or _newest_checkpoint())
    options["out"] = str(out)
    config = C(**options)
    load_note()
    with progress.shown():
        with progress.stage("starting (importing torch)"):
            from edgeft.export import export
        result = export(config)
    _print_files(result.files, auto="auto" in (format, precision))
    failed = [f for f in result.files if f.validation is not None and not f.validation.passed]
    if failed:
        raise GateError("; ".join(f"{Path(f.path).name}: {f.validation.reason}" for f in failed))


def _print_files(files, *, auto: bool) -> None:
    """Each written file: its attempts (int8 ladder, auto's candidates), then its facts and gate."""
    from rich.console import Console

    console = Console()
    for f in files:
        if f.attempts:
            console.print(_attempts_table(f.attempts, auto=auto))
        table = _facts_table(f"{f.path} ({f.format}, {f.precision}, {f.size_bytes / 2**20:.1f} MiB)")
        if f.validation is not None:
            for row in _validation_rows(f.validation):
                table.add_row(*row)
        else:
            table.add_row("validation", "[yellow]skipped (--no-validate)[/]")
        if f.delegation is not None:
            table.add_row("outside XNNPACK", _outside_delegate(f.delegation))
        if not f.kept:
            table.add_row("file", "[red]removed[/] (use --force to keep it, marked failed)")
        console.print(table)


def _attempts_table(attempts, *, auto: bool):
    """The int8 fallback ladder's attempts, or auto's candidates, one row each between rules: a
    long candidate name or reason wraps inside its row (at 80 columns), numbers never."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    from edgeft.candidates import attempts_table

    head, *rows = attempts_table(attempts)
    table = Table(
        title="candidates (the fastest that passed is kept)" if auto else "int8 attempts",
        title_justify="left",
        box=box.SIMPLE,
        show_edge=False,
        show_lines=True,  # a wrapped name stays visibly inside its own row
    )
    names = len(head) - 5  # format (where several are compared) and candidate, then the numbers
    for column, name in enumerate(head):
        if column < names:  # wraps, never narrower than a word
            longest = max(len(word) for row in rows for word in row[column].split())
            table.add_column(name, min_width=longest, overflow="fold")
        else:
            table.add_column(name, no_wrap=True, justify="right" if name != head[-1] else "left")
    reasons = []
    for *cells, result in rows:
        outcome, _, why = result.partition(": ")  # "failed: why" -> "failed", why below the table
        table.add_row(*map(escape, cells), escape(outcome))
        if why:
            reasons.append(f"{' '.join(cells[:names])}: {why}")
    return Group(table, *(Text(line) for line in reasons))


@app.command("validate")
def validate_command(
    file: Annotated[Path, typer.Argument(help=f"An exported file ({_CHOICES['files']}).")],
    reference: Annotated[
        Optional[Path], typer.Option(help="Reference checkpoint (default: the one it was exported from).")
    ] = None,
    data: Annotated[
        Optional[str], typer.Option(help="Validation data (default: the checkpoint's validation split).")
    ] = None,
    data_root: Annotated[
        Optional[str], typer.Option(help="Root of torchvision datasets (default: the checkpoint's).")
    ] = None,
    max_acc_drop: Annotated[
        Optional[float], typer.Option(help="Accuracy-drop gate in points (default: fp32 0, fp16 0.1, int8 1.0).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="The batch > 1 validated besides batch 1.")] = C.batch_size,
    device: Annotated[
        str, typer.Option(help="cpu | cuda[:N]: where the exported file runs (the checkpoint runs on the CPU).")
    ] = "cpu",
    workers: Annotated[int, typer.Option(help="Threads that decode the validation images.")] = 2,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Compare an exported file with its checkpoint on real images; exit 1 when the gate fails."""
    if not as_json:
        load_note()
    with progress.shown(not as_json):
        with progress.stage("starting (importing torch)"):
            from edgeft.validate import validate_file
        result = validate_file(
            file,
            reference=reference,
            data=data,
            data_root=data_root,
            max_acc_drop=max_acc_drop,
            batch_size=batch_size,
            device=device,
            workers=workers,
            threads=threads,
        )
    if as_json:
        typer.echo(jsonio.dumps(result.to_dict(), indent=2))
    else:
        from rich.console import Console

        table = _facts_table(str(file))
        table.add_row("reference", escape(result.reference))
        for row in _validation_rows(result):
            table.add_row(*row)
        Console().print(table)
    if not result.passed:
        raise GateError(f"{file}: {result.reason}")


@app.command("info")
def info_command(
    file: Annotated[Path, typer.Argument(help=f"An exported file ({_CHOICES['files']}).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the whole metadata document as JSON.")] = False,
) -> None:
    """Print the metadata embedded in an exported file."""
    from edgeft.artifact import read_metadata

    metadata = read_metadata(file)
    if as_json:
        typer.echo(jsonio.dumps(metadata, indent=2))
        return
    from rich.console import Console

    table = _facts_table(str(file))
    for name, value in _info_rows(metadata):
        table.add_row(name, escape(value))
    Console().print(table)
    candidates = _recorded_candidates(metadata)
    if candidates:
        Console().print(_attempts_table(candidates, auto=True))


def _recorded_candidates(metadata: dict) -> list:
    """The decision table an automatic choice recorded in the file (empty when there is none or it
    does not read as one)."""
    from edgeft.candidates import Attempt

    recorded = metadata.get("precision_auto")
    try:
        return [Attempt(**row) for row in recorded["candidates"]]
    except (KeyError, TypeError):
        return []


def _facts_table(title: str):
    """A name | value table whose values fold (a digest or path is never cut short at 80 columns)."""
    from rich.table import Table

    table = Table(title=escape(title), show_header=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")
    return table


def _outside_delegate(delegation: dict) -> str:
    """What an ExecuTorch program runs outside the XNNPACK delegate, in one line."""
    ops = (
        ", ".join(f"{name} x{count}" for name, count in dict(delegation.get("outside_by_op", {})).items()) or "nothing"
    )
    return f"{ops} ({delegation.get('delegated_ops')} ops in {delegation.get('delegated_subgraphs')} XNNPACK subgraphs)"


def _accuracies(v: dict) -> str:
    try:
        return f"{v['exported_acc']:.2%} vs {v['reference_acc']:.2%} on {v['n_images']} images"
    except (KeyError, TypeError, ValueError):
        return str(v.get("reason") or "no accuracies recorded")


def _info_rows(metadata: dict) -> list[tuple[str, str]]:
    """Every field the file records, one row each: the known ones in words, any other as JSON."""
    v, p, source = metadata.get("validation"), metadata["preprocess"], metadata["source_checkpoint"]
    classes, inp, out = metadata["classes"], metadata["input"], metadata.get("output") or {}
    known = {
        "arch": ("model", f"{metadata['arch']}, {metadata['num_classes']} classes, {metadata['precision']}"),
        "classes": ("classes", ", ".join(classes[:20]) + (" ..." if len(classes) > 20 else "")),
        "input": ("input", f"{inp.get('name')} {inp.get('dtype', 'float32')} {inp.get('layout')} {inp.get('shape')}"),
        "output": ("output", f"{out.get('name')} {out.get('dtype')} {out.get('shape')}"),
        "preprocess": (
            "preprocess",
            f"resize {p['resize']} ({p['interpolation']}), crop {p['size']}, mean {p['mean']}, std {p['std']}",
        ),
        "opset": ("opset", str(metadata.get("opset"))),
        "quantization": ("int8 settings", _settings(metadata.get("quantization"))),
        "precision_auto": ("auto decision", _auto_decision(metadata.get("precision_auto"))),
        "delegation": ("outside XNNPACK", _outside_delegate(metadata.get("delegation") or {})),
        "content_sha256": ("content sha256", f"{metadata['content_sha256']} (verified)"),
        "source_checkpoint": (
            "source",
            f"runs/{source.get('run')}/{source.get('file')} (sha256 {str(source.get('sha256'))[:12]}...)",
        ),
        "validation": ("validation", "not run" if not v else _validation_line(v)),
        "versions": ("versions", ", ".join(f"{k} {val}" for k, val in metadata.get("versions", {}).items())),
        "created": ("created", str(metadata.get("created"))),
        "format": ("metadata format", str(metadata.get("format"))),
    }
    shown = {*known, "num_classes", "precision"}  # the last two: in the model row
    rows = [known[key] for key in known if metadata.get(key) is not None]
    return rows + [(key, jsonio.dumps(value)) for key, value in metadata.items() if key not in shown]


def _settings(settings) -> str:
    if not isinstance(settings, dict):
        return str(settings)
    plain = {k: jsonio.dumps(val) if isinstance(val, (list, dict)) else val for k, val in settings.items()}
    return ", ".join(f"{k} {val}" for k, val in plain.items())


def _auto_decision(decision) -> str:
    """An automatic choice: which candidate was kept, of how many (the table follows `info`'s)."""
    if not isinstance(decision, dict) or not isinstance(decision.get("candidates"), list):
        return str(decision)
    return f"kept {decision.get('chosen')} of {len(decision['candidates'])} candidates (table below)"


def _validation_line(v: dict) -> str:
    threads = v.get("threads")
    ran = f", {v.get('provider')}" + (f", {threads} thread(s)" if threads else "")
    return f"{'passed' if v['passed'] else 'FAILED'}: {_accuracies(v)}{ran}"
