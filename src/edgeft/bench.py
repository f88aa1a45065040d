"""`edgeft bench`: backbones x runtimes x precisions x batch sizes, each row timed in a fresh
process, written as a Markdown, JSON and PNG report."""

from __future__ import annotations

import datetime
import json
import logging
import os
import platform
import subprocess
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from edgeft.checkpoint import load_checkpoint, save_checkpoint
from edgeft.config import BenchConfig, ExportConfig
from edgeft.cpu import cpu_description
from edgeft.data import default_preprocess
from edgeft.devices import torch_device
from edgeft.errors import InputError
from edgeft.export import export, write_onnx, write_torchscript
from edgeft.models import get_model, list_models, model_from_checkpoint, model_info
from edgeft.plots import plot_benchmark
from edgeft.quantize import default_settings
from edgeft.timing import run_measurement
from edgeft.pte import require_executorch, write_pte

__all__ = ["BenchConfig", "BenchReport", "BenchRow", "machine_info", "run_bench"]

log = logging.getLogger(__name__)


@dataclass
class BenchRow:
    model: str
    runtime: str
    precision: str
    batch: int
    device: str
    status: str = "ok"  # ok, or why the row did not run
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
    vs_fp32: float | None = None  # speed-up: p50 of this runtime's fp32 row (same batch) / this p50
    gflop_per_s: float | None = None  # achieved: 2 x multiply-adds x batch / p50
    pct_of_peak: float | None = None  # gflop_per_s against the machine's measured fp32 matmul peak


@dataclass
class BenchReport:
    machine: dict
    settings: dict
    rows: list[BenchRow] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def machine_info(device: str) -> dict:
    """CPU model and cores, GPU and driver, library versions: what a reader needs to compare."""
    import onnxruntime
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
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": onnxruntime.get_available_providers(),
        "gpu": None,
        "driver": None,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10)  # fmt: skip
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            pass
        info["cuda"] = torch.version.cuda
    return info


def _plan(config: BenchConfig, device: str) -> list[tuple[str, str, str | None]]:
    """(runtime, precision, reason to skip or None) for each requested combination."""
    precisions = config.precisions or (("fp32", "fp16") if device == "cuda" else ("fp32", "int8"))
    plan = []
    for runtime in config.runtimes:
        for precision in precisions:
            reason = None
            if runtime == "executorch":
                reason = _executorch_unavailable(device)
            elif precision == "int8" and runtime not in ("onnxruntime", "executorch"):
                if config.precisions:  # asked for explicitly: say why not
                    reason = "int8 runs through onnxruntime and executorch only"
                else:
                    continue
            elif precision == "fp16" and device == "cpu" and runtime not in ("onnxruntime", "executorch"):
                reason = "fp16 PyTorch on CPU is not a deployment target; use --device cuda"
            plan.append((runtime, precision, reason))
    return plan


def _executorch_unavailable(device: str) -> str | None:
    """Why ExecuTorch rows cannot run here (it runs on the CPU, through XNNPACK), or None."""
    if device != "cpu":
        return "ExecuTorch runs on the CPU (XNNPACK); use --device cpu"
    try:
        require_executorch()
    except InputError as exc:
        return str(exc)
    return None


def _write_executorch(model, spec, path: Path, precision: str) -> str:
    """A .pte of random-weight `model` for timing (int8: calibrated on random images)."""
    calibration = np.random.default_rng(0).standard_normal((16, spec.channels, spec.size, spec.size), dtype=np.float32)
    write_pte(model, spec, path, precision=precision, calibration=calibration)
    return str(path)


def _artifacts(model_name: str, checkpoint: str | None, config: BenchConfig, device: str, folder: Path, needed) -> dict:
    """The files each (runtime, precision) loads, their sizes, and accuracies with a checkpoint."""
    files: dict[tuple[str, str], str] = {}
    accuracy: dict[tuple[str, str], float] = {}
    if checkpoint is None:
        checkpoint = str(folder / f"{model_name}.pt")
        model = get_model(model_name, num_classes=1000, in_chans=3)
        spec = default_preprocess(size=config.img_size, channels=3)
        save_checkpoint(checkpoint, {"arch": model_name, "num_classes": 1000, "in_chans": 3, "classes": [str(i) for i in range(1000)],
                                     "preprocess": spec.to_dict(), "state_dict": model.state_dict()})  # fmt: skip
    content = load_checkpoint(checkpoint)
    model = model_from_checkpoint(content)
    spec = default_preprocess(size=content["preprocess"]["size"], channels=content["in_chans"])
    for runtime, precision in needed:
        key = (runtime, precision)
        if runtime == "eager":
            files[key] = checkpoint
            continue
        if runtime == "executorch" and not config.checkpoints:
            files[key] = _write_executorch(model, spec, folder / f"{model_name}-{precision}.pte", precision)
            continue
        fmt = {"onnxruntime": "onnx", "executorch": "executorch"}.get(runtime, "torchscript")
        if config.checkpoints:  # a real export, with its validation
            result = export(ExportConfig(checkpoint=checkpoint, format=fmt, precision=precision, out=str(folder), data=config.data,
                                         name=f"{model_name}-{runtime}-{precision}", device=device, force=True))  # fmt: skip
            files[key] = result.files[0].path
            accuracy[key] = result.files[0].validation.exported_acc
            accuracy[("eager", "fp32")] = result.files[0].validation.reference_acc
            continue
        path = folder / f"{model_name}-{precision}{'.onnx' if fmt == 'onnx' else '.ts'}"
        if fmt == "onnx":
            _write_random_weights_onnx(model, spec, path, precision)
        else:
            write_torchscript(model, spec, path, precision=precision, device=device)
        files[key] = str(path)
    return {"files": files, "accuracy": accuracy, "size": spec.size, "channels": content["in_chans"],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}  # fmt: skip


def _write_random_weights_onnx(model, spec, path: Path, precision: str) -> None:
    """The ONNX file of a row without a checkpoint; int8 with this CPU's default settings,
    calibrated on random images (the weights are random too: only speed is measured)."""
    rng = np.random.default_rng(0)
    batches = (rng.standard_normal((8, spec.channels, spec.size, spec.size), dtype=np.float32) for _ in range(2))
    write_onnx(model, spec, path, opset=18, precision=precision, calibration=batches,
               settings=replace(default_settings(), calibration_size=16))  # fmt: skip


def run_bench(config: BenchConfig, *, progress: bool = False) -> BenchReport:
    """Measure every row; rows that cannot run say why. Writes the report files to `config.out`."""
    if config.quick:
        warmup, iterations, budget = 1, min(config.iterations, 10), min(config.budget_s, 2.0)
    else:
        warmup, iterations, budget = config.warmup, config.iterations, config.budget_s
    device = torch_device(config.device).type  # CUDA that is not usable here: InputError
    threads = config.threads or os.cpu_count() or 1
    sources = [(load_checkpoint(c)["arch"], c) for c in config.checkpoints] or [(m, None) for m in config.models]
    for name, _ in sources:
        if name not in list_models():
            get_model(name, num_classes=2)  # the unknown-model error, with the list
    plan = _plan(config, device)
    report = BenchReport(
        machine={**machine_info(device), "matmul_peak": _matmul_peak(device, threads)},
        settings={**asdict(config), "device": device, "threads": threads, "warmup": warmup, "iterations": iterations,
                  "budget_s": budget, "int8": default_settings().label()},  # fmt: skip
    )
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar, tempfile.TemporaryDirectory() as tmp:
        task = bar.add_task("bench", total=len(sources) * len(plan))
        for model_name, checkpoint in sources:
            runnable = [(r, p) for r, p, reason in plan if reason is None]
            bar.update(task, description=f"{model_name}: exporting")
            art = _artifacts(model_name, checkpoint, config, device, Path(tmp), runnable) if runnable else None
            info = model_info(model_name)
            for runtime, precision, reason in plan:
                bar.update(task, description=f"{model_name} {runtime} {precision}")
                rows = [BenchRow(model_name, runtime, precision, b, device) for b in config.batch_sizes]
                if reason is None:
                    measured = run_measurement({"runtime": runtime, "precision": precision, "device": device, "threads": threads,
                                         "file": art["files"][(runtime, precision)], "batches": list(config.batch_sizes),
                                         "size": art["size"], "channels": art["channels"], "warmup": warmup,
                                         "iterations": iterations, "budget_s": budget},
                                        timeout=120 + budget * 4 * len(config.batch_sizes))  # fmt: skip
                    reason = measured if isinstance(measured, str) else None
                for i, row in enumerate(rows):
                    if reason is not None:
                        row.status = f"skipped: {reason}"
                        continue
                    for key, value in measured[i].items():
                        if key != "batch":
                            setattr(row, key, value)
                    row.file_mb = Path(art["files"][(runtime, precision)]).stat().st_size / 2**20
                    row.params_m = art["params_m"]
                    row.gflops = info.gflops * (art["size"] / 224) ** 2
                    row.accuracy = art["accuracy"].get((runtime, precision))
                if reason is not None:
                    log.warning("%s %s %s: %s", model_name, runtime, precision, reason)
                report.rows += rows
                bar.advance(task)
    add_speed_columns(report.rows, report.machine["matmul_peak"]["gflop_per_s"])
    _write_reports(report, Path(config.out))
    return report


def _matmul_peak(device: str, threads: int) -> dict:
    """This machine's fp32 matmul throughput, measured once per report in a fresh process."""
    spec = {"measure": "matmul_peak", "device": device, "threads": threads}
    measured = run_measurement(spec, timeout=120)
    if isinstance(measured, str):
        log.warning("matmul peak not measured: %s", measured)
        return {"gflop_per_s": None, "method": f"not measured: {measured}"}
    return measured


def add_speed_columns(rows: list[BenchRow], peak_gflop_per_s: float | None) -> None:
    """Fill each measured row's speed-up against the fp32 row of its model, runtime and batch,
    and its achieved GFLOP/s (2 FLOP per multiply-add) against the matmul peak."""
    fp32 = {(r.model, r.runtime, r.batch): r.p50_ms for r in rows if r.precision == "fp32" and r.status == "ok"}
    for row in rows:
        if row.status != "ok":
            continue
        base = fp32.get((row.model, row.runtime, row.batch))
        row.vs_fp32 = None if base is None else base / row.p50_ms
        if row.gflops is not None:
            row.gflop_per_s = 2 * row.gflops * row.batch / (row.p50_ms / 1000)
            row.pct_of_peak = None if not peak_gflop_per_s else 100 * row.gflop_per_s / peak_gflop_per_s


def _write_reports(report: BenchReport, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = out / f"bench-{stamp}"
    report.files = {"md": f"{base}.md", "json": f"{base}.json", "png": f"{base}.png"}
    Path(report.files["json"]).write_text(json.dumps({"machine": report.machine, "settings": report.settings,
                                                      "rows": [asdict(r) for r in report.rows]}, indent=2) + "\n")  # fmt: skip
    Path(report.files["md"]).write_text(markdown_report(report))
    plot_benchmark([asdict(r) for r in report.rows], report.files["png"])


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def markdown_table(rows: list[BenchRow]) -> str:
    """The results as one Markdown table (rows that did not run say why)."""
    head = ("| model | runtime | precision | batch | p50 ms | x fp32 | p90 ms | p99 ms | mean ms | img/s | GFLOP/s "
            "| % peak | load s | first ms | peak MB | file MB | params M | GMACs | accuracy | provider |")  # fmt: skip
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.model} | {r.runtime} | {r.precision} | {r.batch} | {r.status} |" + " |" * 15)
            continue
        cells = [r.model, r.runtime, r.precision, str(r.batch), _fmt(r.p50_ms, ".2f"), _fmt(r.vs_fp32, ".2f"), _fmt(r.p90_ms, ".2f"),
                 _fmt(r.p99_ms, ".2f"), _fmt(r.mean_ms, ".2f"), _fmt(r.images_per_s, ".1f"), _fmt(r.gflop_per_s, ".1f"),
                 _fmt(r.pct_of_peak, ".0f"), _fmt(r.load_s, ".2f"),
                 _fmt(r.first_ms, ".1f"), _fmt(r.peak_rss_mb, ".0f"), _fmt(r.file_mb, ".1f"), _fmt(r.params_m, ".1f"),
                 _fmt(r.gflops, ".2f"), _fmt(None if r.accuracy is None else 100 * r.accuracy, ".2f"), r.provider]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def markdown_report(report: BenchReport) -> str:
    m, s = report.machine, report.settings
    peak = m["matmul_peak"]
    gpu = f"{m['gpu']} (driver {m['driver']}, CUDA {m.get('cuda')})" if m["gpu"] else "none"
    return (
        f"# edgeft bench\n\n"
        f"- machine: {m['cpu']}, {m['cores']} cores, CPU flags: {', '.join(m['cpu_features']) or 'none of note'}; GPU: {gpu}\n"
        f"- software: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, "
        f"onnxruntime {m['onnxruntime']}; {m['os']}\n"
        f"- settings: device {s['device']}, {s['img_size']} px, {s['threads']} threads, {s['warmup']} warm-up runs, "
        f"up to {s['iterations']} timed runs or {s['budget_s']} s per row; each (model, runtime, precision) in a fresh "
        f"process (peak MB is that process's resident peak)\n"
        f"- int8 rows: onnxruntime static quantization, {s['int8']}; executorch: PT2E with the XNNPACK quantizer\n"
        f"- x fp32: the fp32 row's p50 (same model, runtime, batch) / this row's p50. GFLOP/s: 2 FLOP per "
        f"multiply-add (GMACs: torchvision's count at this image size) x batch / p50; % peak: against "
        f"{_fmt(peak['gflop_per_s'], '.1f')} GFLOP/s measured as {peak['method']}\n\n" + markdown_table(report.rows)
    )
