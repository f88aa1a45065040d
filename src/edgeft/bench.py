"""`edgeft bench`: backbones x runtimes x precisions x batch sizes, each row timed in a fresh
process, written as a Markdown, JSON and PNG report."""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
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

from edgeft import __version__, formats, jsonio, peak
from edgeft.artifact import read_metadata
from edgeft.checkpoint import load_checkpoint, save_checkpoint
from edgeft.config import BenchConfig, ExportConfig
from edgeft.cpu import cpu_description, has_bf16, load_average, use_threads
from edgeft.data import default_preprocess
from edgeft.devices import cuda_index, torch_device
from edgeft.export import export
from edgeft.filecache import FileCache, default_cache_folder
from edgeft.interrupts import atomic_write, atomic_write_text
from edgeft.models import get_model, list_models, model_from_checkpoint, model_info
from edgeft.plots import plot_benchmark
from edgeft.timing import run_measurement
from edgeft.validate import file_sha256

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
    pct_of_peak: float | None = None  # gflop_per_s against the measured peak of this row's precision (never clamped)


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
        "load_average": load_average(),  # at start: above "cores", other work shared the timings
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


def _make_files(sources: list[_Source], needed, run: _Run, cache: FileCache, update) -> dict[str, dict]:
    """Per source label, the file each (runtime, precision) of `needed` loads: found in the cache or
    made (exported, for a checkpoint), the missing ones of every source `_MAKERS` at a time."""
    checkpoints = {s.label: s.checkpoint or str(_random_weights_checkpoint(s.arch, run, cache)) for s in sources}
    weights = {label: file_sha256(path) for label, path in checkpoints.items()}  # once per checkpoint
    requests = {
        (source.label, runtime, precision): (
            _file_key(weights[source.label], runtime, precision, run),
            functools.partial(_export_checkpoint, source, runtime, precision, run)
            if source.checkpoint
            else functools.partial(_write_random_weights, checkpoints[source.label], runtime, precision, run.device),
        )
        for source in sources
        for runtime, precision in needed
        if runtime != "eager"
    }
    labels = ", ".join(s.label for s in sources)
    update(description=f"{labels}: exporting")
    counted = iter(range(1, len(requests) + 1))
    made = cache.files(
        list(requests.values()),
        workers=_MAKERS,
        setup=functools.partial(use_threads, max(1, run.threads // _MAKERS)),
        done=lambda: update(description=f"{labels}: exporting, {next(counted)} of {len(requests)} made"),
    )
    files = {s.label: {("eager", "fp32"): checkpoints[s.label]} if ("eager", "fp32") in needed else {} for s in sources}
    for (label, runtime, precision), path in zip(requests, made, strict=True):
        files[label][(runtime, precision)] = str(path)
    return {s.label: {"checkpoint": checkpoints[s.label], "files": files[s.label]} for s in sources}


_MAKERS = 2  # files made at once: lowering and converting are mostly single-threaded Python


def _artifacts(source: _Source, made: dict, keep: Path | None) -> dict:
    """The files of `source` to time, their sizes, and accuracies with a checkpoint; with `keep`,
    copies of the files in that folder."""
    content = load_checkpoint(made["checkpoint"])
    files, accuracy = made["files"], {}
    for key, path in files.items():
        validation = (read_metadata(path).get("validation") or {}) if source.checkpoint and key[0] != "eager" else {}
        if validation:  # a checkpoint's export, validated
            accuracy[key], accuracy[("eager", "fp32")] = validation.get("exported_acc"), validation.get("reference_acc")
    if keep is not None:
        files = {key: _keep_copy(path, key[0], keep) for key, path in files.items()}
    return {
        "files": files,
        "accuracy": accuracy,
        "size": content["preprocess"]["size"],
        "channels": content["in_chans"],
        "params_m": sum(p.numel() for p in model_from_checkpoint(content).parameters()) / 1e6,
    }


def _file_key(weights_sha256: str, runtime: str, precision: str, run: _Run) -> dict:
    """What decides a timed file's content: the cache key of `edgeft.filecache`."""
    fmt = formats.by_runtime(runtime)
    return {
        "weights_sha256": weights_sha256,
        "data": run.config.data,  # a checkpoint's export is validated on it
        "format": fmt.name,
        "precision": precision,
        "device": run.device,
        "int8": _int8_settings()[runtime] if precision == "int8" else None,
        "versions": {**_library_versions(), **fmt.versions()},
    }


def _library_versions() -> dict[str, str]:
    import torchvision

    return {
        "edgeft": __version__,
        "edgeft_writers": _writers_digest(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
    }


@functools.cache
def _writers_digest() -> str:
    """A digest of the code that builds and writes the files (models, export, every format module):
    a changed writer makes new files even where edgeft's version number stays the same."""
    package = Path(__file__).parent
    sources = sorted([package / "models.py", package / "export.py", *(package / "formats").glob("*.py")])
    return hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()[:16]


def _parts(path: str, runtime: str) -> list[Path]:
    """Every file a timed row loads: a checkpoint, or every file of an exported artifact."""
    return [Path(path)] if runtime == "eager" else formats.by_runtime(runtime).files(Path(path))


def _keep_copy(path: str, runtime: str, folder: Path) -> str:
    """A copy of a timed file (every file of its artifact) in `folder`, kept with the report."""
    folder.mkdir(parents=True, exist_ok=True)
    for part in _parts(path, runtime):  # each copy appears whole, or not at all
        with open(part, "rb") as original, atomic_write(folder / part.name) as copy:
            shutil.copyfileobj(original, copy)
    return str(folder / Path(path).name)


_SEED = 0  # random weights are the same on every run, so their files can be reused


def _random_weights_checkpoint(arch: str, run: _Run, cache: FileCache) -> Path:
    """A checkpoint of `arch` with random (seeded) weights, 1000 classes and RGB input of the bench's size."""
    key = {"random_weights": arch, "seed": _SEED, "img_size": run.config.img_size, "versions": _library_versions()}
    return cache.file(key, lambda folder: _write_random_checkpoint(arch, run.config.img_size, folder / f"{arch}.pt"))


def _write_random_checkpoint(arch: str, img_size: int, path: Path) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(_SEED)
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
    return path


def _export_checkpoint(source: _Source, runtime: str, precision: str, run: _Run, folder: Path) -> Path:
    """The validated export of `source`'s checkpoint that `runtime` loads, written into `folder`."""
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
    return Path(result.files[0].path)


def _write_random_weights(checkpoint: str, runtime: str, precision: str, device: str, folder: Path) -> Path:
    """The file `runtime` loads for a random-weights checkpoint (only speed is measured), written
    by its format into `folder`; int8 with the format's first setting, calibrated on random images."""
    content = load_checkpoint(checkpoint)
    model = model_from_checkpoint(content)
    spec = default_preprocess(size=content["preprocess"]["size"], channels=content["in_chans"])
    fmt = formats.by_runtime(runtime)
    path = folder / f"{precision}{fmt.suffixes[0]}"
    rng = np.random.default_rng(0)

    def calibration(count: int):
        return (
            rng.standard_normal((min(8, count - i), spec.channels, spec.size, spec.size), dtype=np.float32)
            for i in range(0, count, 8)
        )

    config = ExportConfig(checkpoint="", format=fmt.name, precision=precision, calib_size=16, device=device)
    with tempfile.TemporaryDirectory(dir=folder) as workdir:  # the file appears whole, or not at all
        rung = fmt.int8_rungs(config)[0] if precision == "int8" else None
        request = formats.WriteRequest(model, spec, precision, device, config, Path(workdir), rung, calibration)
        fmt.write(request, Path(workdir) / path.name)
        fmt.replace(Path(workdir) / path.name, path)
    return path


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
def _file_cache(config: BenchConfig) -> Iterator[FileCache]:
    """Where the timed files are made: the cache (`edgeft.filecache`), or with caching off a
    temporary folder removed afterwards."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = None if not config.cache else Path(config.cache_dir) if config.cache_dir else default_cache_folder()
        yield FileCache(folder, Path(scratch))


def run_bench(config: BenchConfig, *, progress: bool = False) -> BenchReport:
    """Measure every row; rows that cannot run say why. Writes the report files to `config.out`
    (with `config.keep_files`, the files it timed too)."""
    run = _resolve(config)
    sources = _sources(config)
    plan = _plan(config, run.device)
    precisions = list(dict.fromkeys(precision for _, precision, reason in plan if reason is None))
    report = BenchReport(
        machine={**machine_info(run.device), "peak": _peaks(run.device, run.threads, precisions)},
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
    kept = Path(config.out) / f"bench-{stamp}-files"  # with keep_files: copies of the timed files
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with (
        Progress(*columns, console=Console(stderr=True), disable=not progress) as bar,
        _file_cache(config) as cache,
    ):
        update = functools.partial(bar.update, bar.add_task("bench", total=len(sources) * len(plan)))
        runnable = [(r, p) for r, p, reason in plan if reason is None]
        made = _make_files(sources, runnable, run, cache, update) if runnable else {}
        if hasattr(os, "sync"):
            os.sync()  # the files just written are flushed now, not by the kernel while a row is timed
        for source in sources:
            keep = kept / _folder_name(source.label) if config.keep_files else None
            art = _artifacts(source, made[source.label], keep) if runnable else None
            report.rows += _bench_source(source, plan, run, art, update)
        if config.keep_files:
            report.files["timed"] = str(kept)
        report.settings["cache"] = {
            "folder": str(cache.folder) if cache.folder else None,
            "reused": cache.hits,
            "made": cache.made,
        }
    add_speed_columns(report.rows, {p: v["g_per_s"] for p, v in report.machine["peak"]["per_precision"].items()})
    _write_reports(report, Path(config.out), stamp)
    return report


def _bench_source(source: _Source, plan, run: _Run, art: dict | None, update) -> list[BenchRow]:
    """The rows of one model, its files (`art`) timed in `run.rounds` rounds, each row once per
    round in a fresh process."""
    runnable = [(r, p) for r, p, reason in plan if reason is None]
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
    file_mb = sum(part.stat().st_size for part in _parts(file, key[0])) / 2**20  # an OpenVINO .xml with its .bin
    gflops = model_info(arch).gmacs * (art["size"] / 224) ** 2
    for row, result in zip(rows, measured, strict=True):
        for name, value in result.items():
            if name != "batch":
                setattr(row, name, value)
        row.file_mb = file_mb
        row.params_m = art["params_m"]
        row.gflops = gflops
        row.accuracy = art["accuracy"].get(key)
        row.file = os.path.relpath(file, config.out) if config.keep_files else None


def _peaks(device: str, threads: int, precisions: list[str]) -> dict:
    """Per precision of the rows, the fastest product (matrix product, convolution) the installed
    runtimes offer, each runtime's measured in a fresh process with the rows' threads; and the
    memory bandwidth."""
    gemms, runtimes = [], peak.gemm_runtimes(device, precisions)
    for runtime in runtimes:
        spec = {"measure": "gemms", "runtime": runtime, "precisions": precisions, "device": device, "threads": threads}
        measured = run_measurement(spec, timeout=120)
        if isinstance(measured, str):
            log.warning("%s products not measured: %s", runtime, measured)
            measured = [{"runtime": runtime, "precision": p, "error": measured} for p in precisions]
        gemms += measured
    bandwidth = run_measurement({"measure": "bandwidth", "threads": threads, "device": device}, timeout=60)
    if isinstance(bandwidth, str):
        log.warning("memory bandwidth not measured: %s", bandwidth)
        bandwidth = {"gb_per_s": None, "method": f"not measured: {bandwidth}"}
    return {
        "per_precision": peak.peaks_per_precision(gemms, precisions),
        "gemms": gemms,
        "method": peak.method(device, threads, runtimes),
        "memory_bandwidth": bandwidth,
    }


def add_speed_columns(rows: list[BenchRow], peaks: dict[str, float | None]) -> None:
    """Fill each measured row's speed-up against the fp32 row of its model (label), runtime and
    batch, and its achieved GFLOP/s (2 per multiply-add; int8: operations) against the peak of its
    own precision (none where that precision has none). Rows above the peak are kept as measured
    and warned about: the products measured miss a faster kernel."""
    fp32 = {(r.model, r.runtime, r.batch): r.p50_ms for r in rows if r.precision == "fp32" and r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        base = fp32.get((row.model, row.runtime, row.batch))
        row.vs_fp32 = None if base is None else base / row.p50_ms
        if row.gflops is not None:
            row.gflop_per_s = 2 * row.gflops * row.batch / (row.p50_ms / 1000)
            reference = peaks.get(row.precision)
            row.pct_of_peak = 100 * row.gflop_per_s / reference if reference else None
    for row in peak.over_peak(rows):
        log.warning(
            "%s %s %s batch %d runs at %.0f %% of the %s peak: a kernel of it beats every product measured",
            row.model,
            row.runtime,
            row.precision,
            row.batch,
            row.pct_of_peak,
            row.precision,
        )


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
    gpu = f"{m['gpu']} (driver {m['driver']}, CUDA {m.get('cuda')})" if m["gpu"] else "none"
    return (
        f"# edgeft bench\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, "
        f"CPU flags: {', '.join(m['cpu_features']) or 'none of note'}; GPU: {gpu}\n"
        f"- software: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"{', '.join(f'{k} {v}' for k, v in m['runtimes'].items() if isinstance(v, str))}; {m['os']}\n"
        f"- settings: device {s['device']}, {s['img_size']} px, {s['threads']} threads, {s['warmup']} warm-up runs, "
        f"up to {s['iterations']} timed runs or {s['budget_s']} s per row; each (model, runtime, precision) in a fresh "
        f"process (peak MB is that process's resident peak); load average at start "
        f"{'unknown' if m.get('load_average') is None else format(m['load_average'], '.1f')}\n"
        f"- int8 rows: {'; '.join(f'{runtime}: {label}' for runtime, label in s['int8'].items())}\n"
        f"- x fp32: the fp32 row's p50 (same model, runtime, batch) / this row's p50. GFLOP/s: 2 per "
        f"multiply-add (GMACs: torchvision's count at this image size) x batch / p50 (int8 rows: integer "
        f"operations, GOP/s)\n"
        + _peak_text(m["peak"], report.rows)
        + ("- file: the file each row timed, kept, relative to this report's folder\n" if s["keep_files"] else "")
        + _quick_and_cache_lines(s)
        + "\n"
        + markdown_table(report.rows)
        + _bounds_text(report.rows, m["peak"]["memory_bandwidth"]["gb_per_s"])
    )


def _peak_text(measured: dict, rows: list[BenchRow]) -> str:
    """The report's lines on the peaks: how they were measured, every product, the bandwidth, and
    the rows above a peak (never clamped)."""
    bandwidth = measured["memory_bandwidth"]
    text = (
        "- % peak: against the peak of the row's own precision, as measured (never clamped): the fastest "
        f"product that the installed runtimes offer, {measured['method']}; each product measured, fastest "
        "first:\n"
        + "".join(f"  - {line}\n" for line in peak.peak_lines(measured))
        + f"- memory bandwidth: {_fmt(bandwidth['gb_per_s'], '.1f')} GB/s ({bandwidth['method']})\n"
    )
    over = peak.over_peak(rows)
    if over:
        names = ", ".join(f"{r.model} {r.runtime} {r.precision} batch {r.batch} ({r.pct_of_peak:.0f} %)" for r in over)
        text += (
            f"- **above {peak.OVER_PEAK_PCT:.0f} % of peak**: {names}: a kernel of these runtimes beats every "
            "product measured, so the products miss one and that precision's peak is understated\n"
        )
    return text


def _bounds_text(rows: list[BenchRow], bandwidth_gb_s: float | None) -> str:
    """The section on what bounds the batch-1 rows far below their peak (empty when none is)."""
    lines = peak.bound_lines(rows, bandwidth_gb_s)
    if not lines:
        return ""
    return (
        f"\n## What bounds batch 1\n\nBatch-1 rows below {peak.FAR_BELOW_PCT:.0f} % of their precision's peak. "
        "Weights read: parameters x bytes per weight of the precision, once per inference, / p50, against the "
        f"copy bandwidth (memory traffic at {100 * peak.MEMORY_BOUND_SHARE:.0f} % or more); the largest batch of "
        f"the same model, runtime and precision at {peak.OVERHEAD_GAIN}x batch 1's img/s or more: per-call "
        "overhead (batch-1 work too small to fill the cores); neither: its kernels.\n\n"
        + "".join(f"- {line}" for line in lines)
    )


def _quick_and_cache_lines(settings: dict) -> str:
    """What a quick bench leaves out, and how many files came from the cache."""
    lines = ""
    if settings.get("quick"):
        lines += (
            "- quick: one round of at most 10 runs (2 s) per row, so p50s are rougher than a full bench's; "
            "by default only resnet18 at batch 1 (a full bench: three backbones, batch 1 and 8, 3 rounds)\n"
        )
    cache = settings.get("cache") or {}
    if cache.get("folder"):
        lines += f"- files: {cache['made']} made, {cache['reused']} reused from the cache ({cache['folder']})\n"
    return lines
