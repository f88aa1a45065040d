"""`edgeft bench`: backbones x runtimes x precisions x batch sizes, each row timed in a fresh
process, written as a Markdown, JSON and PNG report."""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edgeft import formats, jsonio
from edgeft.checkpoint import load_checkpoint, save_checkpoint
from edgeft.config import BenchConfig, ExportConfig
from edgeft.cpu import cpu_description, has_bf16
from edgeft.data import default_preprocess
from edgeft.devices import cuda_index, torch_device
from edgeft.export import export
from edgeft.interrupts import atomic_write, atomic_write_text
from edgeft.models import get_model, list_models, model_from_checkpoint, model_info
from edgeft.plots import plot_benchmark
from edgeft.timing import run_measurement

__all__ = ["BenchConfig", "BenchReport", "BenchRow", "combine_rounds", "machine_info", "run_bench"]

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    model: str  # the source's label: its architecture, or "arch (run/file)" where checkpoints share one
    runtime: str
    precision: str
    batch: int
    device: str  # cpu, cuda or cuda:N
    status: str = "ok"  # ok, or why the row did not run
    arch: str | None = None  # the architecture (torchvision's name)
    file: str | None = None  # with --keep-files: the file timed, relative to the report's folder
    provider: str = ""  # what actually ran it
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    mean_ms: float | None = None
    images_per_s: float | None = None
    load_s: float | None = None  # model load / session creation
    first_ms: float | None = None  # first inference at this batch size
    peak_rss_mb: float | None = None  # peak resident memory of the process that loaded and ran it
    iterations: int | None = None
    file_mb: float | None = None
    params_m: float | None = None
    gflops: float | None = None  # G multiply-adds at this image size (torchvision's "GFLOPS" count, scaled)
    accuracy: float | None = None  # with --checkpoints: the export's validation accuracy
    vs_fp32: float | None = None  # speed-up: p50 of this model's and runtime's fp32 row (same batch) / this p50
    gflop_per_s: float | None = None  # achieved: 2 x multiply-adds x batch / p50
    pct_of_peak: float | None = None  # gflop_per_s against the machine's measured fp32 matmul peak


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    rows: list[BenchRow] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # md, json, png; timed: the kept files' folder


@dataclass
class _Source:
    """One model to time: random weights of `arch`, or a checkpoint."""

    label: str  # how rows and tables name it, unique within a report
    arch: str
    checkpoint: str | None = None


@dataclass
class _Run:
    """What every row of one bench shares."""

    config: BenchConfig
    device: str  # cpu, cuda or cuda:N
    threads: int
    warmup: int
    iterations: int  # per round
    budget_s: float  # per round
    rounds: int  # fresh processes per row, taking turns with the model's other rows


def machine_info(device: str) -> dict:
    """CPU model and cores, GPU (the one `device` names) and driver, library versions: what a
    reader needs to compare."""
    import torchvision

    cpu = cpu_description()
    info = {
        "cpu": cpu["cpu"],
        "cores": cpu["cores"],
        "cpu_features": cpu["features"],  # the flags that decide int8 / bf16 kernels
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "runtimes": _runtime_versions(),  # each installed format's libraries, e.g. onnxruntime
        "gpu": None,
        "driver": None,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(cuda_index(device))
        info["driver"] = _nvidia_driver()
        info["cuda"] = torch.version.cuda
    return info


def _runtime_versions() -> dict:
    """The versions (and details, such as onnxruntime's providers) of every installed format's libraries."""
    found = {}
    for fmt in formats.all_formats():
        if fmt.missing() is None:
            found.update({**fmt.versions(), **fmt.details()})
    return found


def _int8_settings() -> dict[str, str]:
    """The first int8 setting of each runtime with int8 files (what bench's int8 rows use)."""
    config = ExportConfig(checkpoint="")
    return {f.runtime: f.int8_rungs(config)[0].label() for f in formats.all_formats() if "int8" in f.precisions}


def _nvidia_driver() -> str | None:
    """The NVIDIA driver version (one driver serves every GPU of a machine), or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return None


def _plan(config: BenchConfig, device: str) -> list[tuple[str, str, str | None]]:
    """(runtime, precision, reason to skip or None) for each requested combination; what runs
    where is each format's own answer (eager PyTorch is the baseline, not a format)."""
    precisions = config.precisions or default_precisions(device)
    plan = []
    for runtime in config.runtimes:
        for precision in precisions:
            reason = (
                _eager_unavailable(precision, device)
                if runtime == "eager"
                else _runtime_unavailable(runtime, precision, device)
            )
            if reason and precision != "fp32" and not config.precisions and precision not in _precisions(runtime):
                continue  # by default, each runtime's rows are the precisions it has files of
            plan.append((runtime, precision, reason))
    return plan


def default_precisions(device: str) -> tuple[str, ...]:
    """What a bench times when not told: fp32 and what this device computes faster (CUDA: fp16;
    a CPU: int8, and bf16 where native)."""
    if device.startswith("cuda"):
        return ("fp32", "fp16")
    return ("fp32", "bf16", "int8") if has_bf16() else ("fp32", "int8")


def _precisions(runtime: str) -> tuple[str, ...]:
    return ("fp32", "fp16") if runtime == "eager" else formats.by_runtime(runtime).precisions


def _runtime_unavailable(runtime: str, precision: str, device: str) -> str | None:
    return formats.by_runtime(runtime).unavailable(precision, device)


def _eager_unavailable(precision: str, device: str) -> str | None:
    if precision not in ("fp32", "fp16"):
        runtimes = ", ".join(f.runtime for f in formats.all_formats() if precision in f.precisions)
        return f"{precision} runs through {runtimes} only"
    if precision == "fp16" and device == "cpu":
        return "fp16 PyTorch on CPU is not a deployment target; use --device cuda"
    return None


def _sources(config: BenchConfig) -> list[_Source]:
    """The models to time, each once, labelled by its architecture; checkpoints that share one
    by their run folder and file (by their whole path where even those are the same)."""
    if not config.checkpoints:
        sources = [_Source(name, name) for name in dict.fromkeys(config.models)]
    else:
        paths = list(dict.fromkeys(Path(c).resolve() for c in config.checkpoints))
        archs = [load_checkpoint(path)["arch"] for path in paths]
        sources = [
            _Source(arch if archs.count(arch) == 1 else f"{arch} ({path.parent.name}/{path.name})", arch, str(path))
            for arch, path in zip(archs, paths)
        ]
        labels = [s.label for s in sources]
        sources = [replace(s, label=f"{s.arch} ({s.checkpoint})") if labels.count(s.label) > 1 else s for s in sources]
    for source in sources:
        if source.arch not in list_models():
            get_model(source.arch, num_classes=2)  # the unknown-model error, with the list
    return sources


def _folder_name(label: str) -> str:
    """A folder name for a source's files: its label with anything but letters, digits, '.',
    '_' and '-' replaced by '-'."""
    return re.sub(r"[^\w.-]+", "-", label).strip("-")


def _artifacts(source: _Source, run: _Run, folder: Path, needed) -> dict:
    """The files each (runtime, precision) loads, written into `folder`, their sizes, and
    accuracies with a checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = source.checkpoint or _random_weights_checkpoint(source.arch, run.config.img_size, folder)
    content = load_checkpoint(checkpoint)
    model = model_from_checkpoint(content)
    spec = default_preprocess(size=content["preprocess"]["size"], channels=content["in_chans"])
    eager_file = checkpoint
    if source.checkpoint and run.config.keep_files and any(runtime == "eager" for runtime, _ in needed):
        eager_file = str(folder / Path(checkpoint).name)  # kept with the others
        with open(checkpoint, "rb") as original, atomic_write(eager_file) as copy:
            shutil.copyfileobj(original, copy)
    files: dict[tuple[str, str], str] = {}
    accuracy: dict[tuple[str, str], float] = {}
    for runtime, precision in needed:
        key = (runtime, precision)
        if runtime == "eager":
            files[key] = eager_file
        elif source.checkpoint:  # a real export, with its validation
            exported = _export_checkpoint(source, runtime, precision, run, folder)
            files[key] = exported.path
            accuracy[key] = exported.validation.exported_acc
            accuracy[("eager", "fp32")] = exported.validation.reference_acc
        else:
            files[key] = _write_random_weights(
                model, spec, runtime, precision, run.device, folder / f"{source.arch}-{precision}"
            )
    return {
        "files": files,
        "accuracy": accuracy,
        "size": spec.size,
        "channels": content["in_chans"],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
    }


def _random_weights_checkpoint(arch: str, img_size: int, folder: Path) -> str:
    """A checkpoint of `arch` with random weights, 1000 classes and RGB `img_size` input."""
    path = folder / f"{arch}.pt"
    model = get_model(arch, num_classes=1000, in_chans=3)
    spec = default_preprocess(size=img_size, channels=3)
    save_checkpoint(
        path,
        {
            "arch": arch,
            "num_classes": 1000,
            "in_chans": 3,
            "classes": [str(i) for i in range(1000)],
            "preprocess": spec.to_dict(),
            "state_dict": model.state_dict(),
        },
    )
    return str(path)


def _export_checkpoint(source: _Source, runtime: str, precision: str, run: _Run, folder: Path):
    """The validated export of `source`'s checkpoint that `runtime` loads."""
    fmt = formats.by_runtime(runtime).name
    result = export(
        ExportConfig(
            checkpoint=source.checkpoint,
            format=fmt,
            precision=precision,
            out=str(folder),
            data=run.config.data,
            name=f"{source.arch}-{runtime}",
            device=run.device,
            force=True,
        )
    )
    return result.files[0]


def _write_random_weights(model, spec, runtime: str, precision: str, device: str, stem: Path) -> str:
    """The file `runtime` loads for a model without a checkpoint (only speed is measured), written
    by its format; int8 with the format's first setting, calibrated on random images."""
    fmt = formats.by_runtime(runtime)
    path = stem.with_name(stem.name + fmt.suffixes[0])
    rng = np.random.default_rng(0)

    def calibration(count: int):
        return (
            rng.standard_normal((min(8, count - i), spec.channels, spec.size, spec.size), dtype=np.float32)
            for i in range(0, count, 8)
        )

    config = ExportConfig(checkpoint="", format=fmt.name, precision=precision, calib_size=16, device=device)
    with tempfile.TemporaryDirectory(dir=stem.parent) as workdir:  # the file appears whole, or not at all
        rung = fmt.int8_rungs(config)[0] if precision == "int8" else None
        request = formats.WriteRequest(model, spec, precision, device, config, Path(workdir), rung, calibration)
        fmt.write(request, Path(workdir) / path.name)
        fmt.replace(Path(workdir) / path.name, path)
    return str(path)


def _resolve(config: BenchConfig) -> _Run:
    """The device (its index kept: cuda:1 stays cuda:1), threads and timing counts of a bench."""
    quick = config.quick
    rounds = 1 if quick else config.rounds
    return _Run(
        config,
        device=str(torch_device(config.device)),  # CUDA that is not usable here: InputError
        threads=config.threads or os.cpu_count() or 1,
        warmup=1 if quick else config.warmup,
        iterations=min(config.iterations, 10) if quick else -(-config.iterations // rounds),
        budget_s=min(config.budget_s, 2.0) if quick else config.budget_s / rounds,
        rounds=rounds,
    )


@contextlib.contextmanager
def _files_folder(config: BenchConfig, stamp: str) -> Iterator[Path]:
    """Where the timed files are written: bench-<stamp>-files/ beside the report with
    `keep_files`, else a temporary folder removed afterwards."""
    if not config.keep_files:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    folder = Path(config.out) / f"bench-{stamp}-files"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder


def run_bench(config: BenchConfig, *, progress: bool = False) -> BenchReport:
    """Measure every row; rows that cannot run say why. Writes the report files to `config.out`
    (with `config.keep_files`, the files it timed too)."""
    run = _resolve(config)
    sources = _sources(config)
    plan = _plan(config, run.device)
    report = BenchReport(
        machine={**machine_info(run.device), "matmul_peak": _matmul_peak(run.device, run.threads)},
        settings={
            **asdict(config),
            "device": run.device,
            "threads": run.threads,
            "warmup": run.warmup,
            "iterations": run.iterations,
            "budget_s": run.budget_s,
            "rounds": run.rounds,
            "int8": _int8_settings(),
        },
    )
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=Console(stderr=True), disable=not progress) as bar,
        _files_folder(config, stamp) as folder,
    ):
        update = functools.partial(bar.update, bar.add_task("bench", total=len(sources) * len(plan)))
        for source in sources:
            report.rows += _bench_source(source, plan, run, folder / _folder_name(source.label), update)
        if config.keep_files:
            report.files["timed"] = str(folder)
    add_speed_columns(report.rows, report.machine["matmul_peak"]["gflop_per_s"])
    _write_reports(report, Path(config.out), stamp)
    return report


def _bench_source(source: _Source, plan, run: _Run, folder: Path, update) -> list[BenchRow]:
    """The rows of one model: its files written (exported, for a checkpoint) into `folder`, then
    timed in `run.rounds` rounds, each row once per round in a fresh process."""
    runnable = [(r, p) for r, p, reason in plan if reason is None]
    update(description=f"{source.label}: exporting")
    art = _artifacts(source, run, folder, runnable) if runnable else None
    if hasattr(os, "sync"):
        os.sync()  # the files just written are flushed now, not by the kernel while the first row is timed
    update(description=f"{source.label}: timing")
    measured = {
        **{(r, p): reason for r, p, reason in plan if reason is not None},
        **_time_rows(runnable, art, run, update),
    }
    rows = []
    for runtime, precision, _ in plan:
        group = [
            BenchRow(source.label, runtime, precision, b, run.device, arch=source.arch) for b in run.config.batch_sizes
        ]
        result = measured[(runtime, precision)]
        if isinstance(result, str):
            log.warning("%s %s %s: %s", source.label, runtime, precision, result)
            for row in group:
                row.status = f"skipped: {result}"
        else:
            _fill_measured(group, result, art, (runtime, precision), source.arch, run.config)
        rows += group
    update(advance=len(plan) - len(runnable))
    return rows


def _time_rows(keys: list[tuple[str, str]], art: dict, run: _Run, update) -> dict[tuple[str, str], list[dict] | str]:
    """Each (runtime, precision) timed once per round, the rows taking turns, so they all see the
    same drift of a shared machine; per batch size, the rounds combined. A row that fails once
    gets the reason instead."""
    rounds: dict[tuple[str, str], list | str] = {key: [] for key in keys}
    for round_ in range(run.rounds):
        for key in keys:
            if isinstance(rounds[key], str):
                continue
            result = _time_file(art["files"][key], *key, art, run)
            rounds[key] = result if isinstance(result, str) else [*rounds[key], result]
            if round_ == run.rounds - 1 or isinstance(result, str):
                update(advance=1)
    return {key: value if isinstance(value, str) else combine_rounds(value) for key, value in rounds.items()}


def combine_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One result per batch size from several processes' results: the median of their latency
    percentiles, load and first-run times; their runs and mean together; the largest peak memory."""
    combined = []
    for per_batch in zip(*rounds, strict=True):
        runs = sum(r["iterations"] for r in per_batch)
        mean = sum(r["mean_ms"] * r["iterations"] for r in per_batch) / runs
        medians = {
            k: float(np.median([r[k] for r in per_batch])) for k in ("p50_ms", "p90_ms", "p99_ms", "first_ms", "load_s")
        }
        combined.append(
            {
                **per_batch[0],
                **medians,
                "mean_ms": mean,
                "iterations": runs,
                "images_per_s": per_batch[0]["batch"] * 1000 / mean,
                "peak_rss_mb": max(r["peak_rss_mb"] for r in per_batch),
            }
        )
    return combined


def _time_file(file: str, runtime: str, precision: str, art: dict, run: _Run) -> list[dict] | str:
    """One result per batch size from a fresh process, or why it failed."""
    batches = list(run.config.batch_sizes)
    spec = {
        "runtime": runtime,
        "precision": precision,
        "device": run.device,
        "threads": run.threads,
        "file": file,
        "batches": batches,
        "size": art["size"],
        "channels": art["channels"],
        "warmup": run.warmup,
        "iterations": run.iterations,
        "budget_s": run.budget_s,
    }
    return run_measurement(spec, timeout=120 + run.budget_s * 4 * len(batches))


def _fill_measured(
    rows: list[BenchRow], measured: list[dict], art: dict, key: tuple[str, str], arch: str, config: BenchConfig
) -> None:
    """Copy the measurements into `rows` (one per batch size) with the file's size, the model's
    size and cost, the export's accuracy, and with `keep_files` the file's path."""
    file = art["files"][key]
    gflops = model_info(arch).gflops * (art["size"] / 224) ** 2
    for row, result in zip(rows, measured, strict=True):
        for name, value in result.items():
            if name != "batch":
                setattr(row, name, value)
        row.file_mb = Path(file).stat().st_size / 2**20
        row.params_m = art["params_m"]
        row.gflops = gflops
        row.accuracy = art["accuracy"].get(key)
        row.file = os.path.relpath(file, config.out) if config.keep_files else None


def _matmul_peak(device: str, threads: int) -> dict:
    """This machine's fp32 matmul throughput, measured once per report in a fresh process."""
    spec = {"measure": "matmul_peak", "device": device, "threads": threads}
    measured = run_measurement(spec, timeout=120)
    if isinstance(measured, str):
        log.warning("matmul peak not measured: %s", measured)
        return {"gflop_per_s": None, "method": f"not measured: {measured}"}
    return measured


def add_speed_columns(rows: list[BenchRow], peak_gflop_per_s: float | None) -> None:
    """Fill each measured row's speed-up against the fp32 row of its model (label), runtime and
    batch, and its achieved GFLOP/s (2 FLOP per multiply-add) against the matmul peak."""
    fp32 = {(r.model, r.runtime, r.batch): r.p50_ms for r in rows if r.precision == "fp32" and r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        base = fp32.get((row.model, row.runtime, row.batch))
        row.vs_fp32 = None if base is None else base / row.p50_ms
        if row.gflops is not None:
            row.gflop_per_s = 2 * row.gflops * row.batch / (row.p50_ms / 1000)
            row.pct_of_peak = None if not peak_gflop_per_s else 100 * row.gflop_per_s / peak_gflop_per_s


def _write_reports(report: BenchReport, out: Path, stamp: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"bench-{stamp}"
    report.files.update(md=f"{base}.md", json=f"{base}.json", png=f"{base}.png")
    atomic_write_text(
        report.files["json"],
        jsonio.dumps(
            {"machine": report.machine, "settings": report.settings, "rows": [asdict(r) for r in report.rows]}, indent=2
        )
        + "\n",
    )
    atomic_write_text(report.files["md"], markdown_report(report))
    plot_benchmark([asdict(r) for r in report.rows], report.files["png"])


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


_COLUMNS = (
    "model",
    "runtime",
    "precision",
    "batch",
    "p50 ms",
    "x fp32",
    "p90 ms",
    "p99 ms",
    "mean ms",
    "img/s",
    "GFLOP/s",
    "% peak",
    "load s",
    "first ms",
    "peak MB",
    "file MB",
    "params M",
    "GMACs",
    "accuracy",
    "provider",
)


def markdown_table(rows: list[BenchRow]) -> str:
    """The results as one Markdown table (rows that did not run say why; kept files: a file column)."""
    with_file = any(r.file for r in rows)
    columns = _COLUMNS + (("file",) if with_file else ())
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r.model, r.runtime, r.precision, str(r.batch)]
        if r.status != "ok":
            cells += [r.status] + [""] * (len(_COLUMNS) - 5)
        else:
            cells += [
                _fmt(r.p50_ms, ".2f"),
                _fmt(r.vs_fp32, ".2f"),
                _fmt(r.p90_ms, ".2f"),
                _fmt(r.p99_ms, ".2f"),
                _fmt(r.mean_ms, ".2f"),
                _fmt(r.images_per_s, ".1f"),
                _fmt(r.gflop_per_s, ".1f"),
                _fmt(r.pct_of_peak, ".0f"),
                _fmt(r.load_s, ".2f"),
                _fmt(r.first_ms, ".1f"),
                _fmt(r.peak_rss_mb, ".0f"),
                _fmt(r.file_mb, ".1f"),
                _fmt(r.params_m, ".1f"),
                _fmt(r.gflops, ".2f"),
                _fmt(None if r.accuracy is None else 100 * r.accuracy, ".2f"),
                r.provider,
            ]
        if with_file:
            cells.append(r.file or "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(report: BenchReport) -> str:
    m, s = report.machine, report.settings
    peak = m["matmul_peak"]
    gpu = f"{m['gpu']} (driver {m['driver']}, CUDA {m.get('cuda')})" if m["gpu"] else "none"
    return (
        f"# edgeft bench\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, "
        f"CPU flags: {', '.join(m['cpu_features']) or 'none of note'}; GPU: {gpu}\n"
        f"- software: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"{', '.join(f'{k} {v}' for k, v in m['runtimes'].items() if isinstance(v, str))}; {m['os']}\n"
        f"- settings: device {s['device']}, {s['img_size']} px, {s['threads']} threads, {s['warmup']} warm-up runs, "
        f"up to {s['iterations']} timed runs or {s['budget_s']} s per row; each (model, runtime, precision) in a fresh "
        f"process (peak MB is that process's resident peak)\n"
        f"- int8 rows: {'; '.join(f'{runtime}: {label}' for runtime, label in s['int8'].items())}\n"
        f"- x fp32: the fp32 row's p50 (same model, runtime, batch) / this row's p50. GFLOP/s: 2 FLOP per "
        f"multiply-add (GMACs: torchvision's count at this image size) x batch / p50; % peak: against "
        f"{_fmt(peak['gflop_per_s'], '.1f')} GFLOP/s measured as {peak['method']}\n"
        + ("- file: the file each row timed, kept, relative to this report's folder\n" if s["keep_files"] else "")
        + "\n"
        + markdown_table(report.rows)
    )
