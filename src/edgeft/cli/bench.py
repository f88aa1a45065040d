"""`edgeft bench`: which model, which runtime, which precision, how fast, how big."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from edgeft.config import BenchConfig as C

from . import app, format_choices, load_note

_WHAT = "What to time"
_ACC = "Accuracy"
_HOW = "How long, how many threads"
_OUT = "Output"


def _split(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


_ModelsOption = Annotated[
    Optional[str],
    typer.Option(
        help=f"Comma-separated backbones (default: {', '.join(C.models)}; --quick: resnet18).",
        show_default=False,
        rich_help_panel=_WHAT,
    ),
]
_RuntimesOption = Annotated[
    str,
    typer.Option(
        help=f"Comma-separated, of: {format_choices()['runtimes']} (default: all).",
        show_default=False,
        rich_help_panel=_WHAT,
    ),
]
_PrecisionsOption = Annotated[
    str,
    typer.Option(
        help="Comma-separated fp32, fp16, int8 (default: fp32 + int8 on CPU, fp32 + fp16 on CUDA).",
        rich_help_panel=_WHAT,
    ),
]
_BatchSizesOption = Annotated[
    Optional[str],
    typer.Option(
        help=f"Comma-separated batch sizes (default: {','.join(map(str, C.batch_sizes))}; --quick: 1).",
        show_default=False,
        rich_help_panel=_WHAT,
    ),
]
_ImgSizeOption = Annotated[int, typer.Option(help="Input side in pixels.", rich_help_panel=_WHAT)]
_DeviceOption = Annotated[
    str, typer.Option(help="auto | cpu | cuda[:N] (CUDA that is not usable here: exit 2).", rich_help_panel=_WHAT)
]
_ThreadsOption = Annotated[
    int, typer.Option(help="Intra-op threads for every runtime (0: all cores).", rich_help_panel=_HOW)
]
_WarmupOption = Annotated[int, typer.Option(help="Untimed runs per row.", rich_help_panel=_HOW)]
_IterationsOption = Annotated[
    int, typer.Option(help="Timed runs per row, at most, over all rounds.", rich_help_panel=_HOW)
]
_BudgetSOption = Annotated[
    float,
    typer.Option(help="Seconds per row, at most, over all rounds (after 5 runs a round).", rich_help_panel=_HOW),
]
_RoundsOption = Annotated[
    int,
    typer.Option(
        help="Fresh processes per row, taking turns with the model's other rows; p50 is their median.",
        rich_help_panel=_HOW,
    ),
]
_QuickOption = Annotated[
    bool,
    typer.Option(
        "--quick",
        help="A first look in a few minutes: every installed runtime and default precision, but resnet18 "
        "only, batch 1, 1 round of <= 10 runs (<= 2 s) per row; options given explicitly still apply.",
        rich_help_panel=_HOW,
    ),
]
_CheckpointsOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--checkpoints",
        "--checkpoint",
        help="An edgeft checkpoint (repeatable): benchmark its model, with each export's accuracy.",
        rich_help_panel=_ACC,
    ),
]
_DataOption = Annotated[
    Optional[str],
    typer.Option(
        help="Accuracy data for --checkpoints (default: each checkpoint's validation split).", rich_help_panel=_ACC
    ),
]
_OutOption = Annotated[str, typer.Option(help="Report folder.", rich_help_panel=_OUT)]
_KeepFilesOption = Annotated[
    bool,
    typer.Option(
        "--keep-files",
        help="Keep the files it timed in bench-<stamp>-files/ beside the report "
        "(each row names its file; up to ~800 MB for the default backbones).",
        rich_help_panel=_OUT,
    ),
]
_CacheOption = Annotated[
    bool,
    typer.Option(
        "--cache/--no-cache",
        help="Reuse the files an earlier bench made from the same weights, format, precision and versions.",
        rich_help_panel=_OUT,
    ),
]
_CacheDirOption = Annotated[
    Optional[str],
    typer.Option(help="Cache folder (default: $EDGEFT_CACHE or ~/.cache/edgeft, then bench/).", rich_help_panel=_OUT),
]


@app.command("bench")
def bench_command(
    models: _ModelsOption = None,
    runtimes: _RuntimesOption = ",".join(C.runtimes),
    precisions: _PrecisionsOption = "",
    batch_sizes: _BatchSizesOption = None,
    img_size: _ImgSizeOption = C.img_size,
    device: _DeviceOption = C.device,
    threads: _ThreadsOption = C.threads,
    warmup: _WarmupOption = C.warmup,
    iterations: _IterationsOption = C.iterations,
    budget_s: _BudgetSOption = C.budget_s,
    rounds: _RoundsOption = C.rounds,
    quick: _QuickOption = C.quick,
    checkpoints: _CheckpointsOption = None,
    data: _DataOption = None,
    out: _OutOption = C.out,
    keep_files: _KeepFilesOption = C.keep_files,
    cache: _CacheOption = C.cache,
    cache_dir: _CacheDirOption = C.cache_dir,
) -> None:
    """Latency, throughput, load time, memory, size and accuracy per backbone x runtime x precision."""
    options = {name: value for name, value in locals().items() if name not in ("batch_sizes", "checkpoints")}
    from rich.console import Console

    from edgeft.bench import run_bench
    from edgeft.errors import InputError, RunError

    if models is None:
        models = "resnet18" if quick else ",".join(C.models)
    if batch_sizes is None:
        batch_sizes = "1" if quick else ",".join(map(str, C.batch_sizes))
    try:
        sizes = tuple(int(b) for b in _split(batch_sizes))
    except ValueError:
        raise InputError(f"--batch-sizes must be comma-separated integers, got {batch_sizes!r}") from None
    config = C(
        **{**options, "models": _split(models), "runtimes": _split(runtimes), "precisions": _split(precisions)},
        batch_sizes=sizes,
        checkpoints=tuple(checkpoints or ()),
    )
    load_note()
    report = run_bench(config, progress=True)
    console = Console()
    print_report(report, console)
    if not any(r.status == "ok" for r in report.rows):
        raise RunError("no row could run; see the reasons above")


def print_report(report, console) -> None:
    """One narrow table per model (fits 80 columns), rows that did not run below it, then where
    the full report is."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    def cell(value, spec: str) -> str:
        return "" if value is None else format(value, spec)

    peaks = report.machine["peak"]["per_precision"]
    for model in dict.fromkeys(r.model for r in report.rows):
        rows = [r for r in report.rows if r.model == model]
        table = Table(
            title=escape(model), title_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 1, 0, 0)
        )
        for name in ("runtime", "prec", "batch", "p50 ms", "x fp32", "img/s", "GFLOP/s", "% peak", "acc %"):
            table.add_column(name, justify="left" if name in ("runtime", "prec") else "right")
        for r in (r for r in rows if r.status == "ok"):
            acc = None if r.accuracy is None else 100 * r.accuracy
            table.add_row(
                r.runtime,
                r.precision,
                str(r.batch),
                f"{r.p50_ms:.2f}",
                cell(r.vs_fp32, ".2f"),
                f"{r.images_per_s:.1f}",
                cell(r.gflop_per_s, ".1f"),
                cell(r.pct_of_peak, ".0f"),
                cell(acc, ".2f"),
            )
        console.print(table)
        for r in dict.fromkeys((r.runtime, r.precision, r.status) for r in rows if r.status != "ok"):
            console.print(f"[yellow]{escape(model)} {escape(r[0])} {escape(r[1])}: {escape(r[2])}[/]")
    s, load = report.settings, report.machine["load_average"]
    console.print(
        f"{s['device']}, {s['threads']} threads, {s['rounds']} round(s) taking turns"
        + ("" if load is None else f", load average {load:.1f} at start")
    )
    measured = ", ".join(f"{precision} {cell(p['g_per_s'], '.0f')} {p['unit']}" for precision, p in peaks.items())
    console.print(f"x fp32: speed-up vs the runtime's fp32; % peak: of its precision's fastest product ({measured})")
    console.print(f"report: {escape(report.files['md'])} (+ .json, .png; every column there)")
    if "timed" in report.files:
        console.print(f"timed files: {escape(report.files['timed'])}")
