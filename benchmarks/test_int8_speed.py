"""int8 against fp32 on onnxruntime's CPU provider, side by side: the three mission backbones
(random weights, 224 px, batch 1), each exported to fp32 ONNX by edgeft and quantized with
`edgeft.formats.onnx_int8.default_settings()` for this CPU; for comparison, the same settings with batch
norms that follow no convolution left in float (densenet121 has 62), and the earlier int8
settings (QDQ with int8 activations, per-channel int8 weights, batch norms in float). All files of a backbone are
timed in interleaved rounds in one process with the same thread count, so every contender
sees the same load; the headline is the ratio of p50 latencies, fp32 / int8.

`edgeft bench` is checked the way a user would check it: its onnxruntime fp32 and int8 rows for
the three backbones (batch 1, `--keep-files`), each kept file timed again by a plain onnxruntime
script in three fresh processes (their median); the two p50s must agree within 15 %, and int8
must be the faster row.

Run: python -m pytest benchmarks/test_int8_speed.py --benchmark-only \
         --benchmark-json benchmarks/results/int8_speed-cpu.pytest-benchmark.json
It writes benchmarks/results/int8_speed-cpu.json (p50 per contender, ratios, the int8 settings,
machine with CPU flags, onnxruntime version, load average). EDGEFT_BENCH_THREADS sets the
threads (default: all cores), EDGEFT_BENCH_ROUNDS the interleaved rounds (default 30).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from edgeft.cpu import cpu_description, has_vnni
from edgeft.formats.onnx_int8 import QuantSettings, default_settings, quantize_onnx

from conftest import independent_onnxruntime_p50

SUMMARY = Path(__file__).parent / "results" / "int8_speed-cpu.json"
BACKBONES = ("resnet18", "resnext50_32x4d", "densenet121")
GOALS = {"resnet18": 2.5, "resnext50_32x4d": 1.5, "densenet121": 1.5}  # fp32 / int8 p50, on a VNNI CPU
THREADS = int(os.environ.get("EDGEFT_BENCH_THREADS", os.cpu_count() or 1))
ROUNDS = int(os.environ.get("EDGEFT_BENCH_ROUNDS", 30))
EARLIER = QuantSettings(
    activation_type="int8", reduce_range=False, batchnorms_as_convs=False
)  # before CPU-aware defaults
CONTENDERS = (
    ("int8", default_settings()),
    ("int8 float-bn", replace(default_settings(), batchnorms_as_convs=False)),
    ("int8 earlier", EARLIER),
)
CALIBRATION = 32  # random images: the ranges do not change the speed


@pytest.fixture(scope="module")
def summary(machine, saved_summary):
    import onnxruntime

    def summarize(results: dict) -> dict:  # merged over the saved file: a single test can be re-run
        measured = {
            "models": {name: results[name] for name in BACKBONES if name in results},
            "bench_against_independent": results.get(BENCH_CHECK),
        }
        return {
            **{key: value for key, value in measured.items() if value},
            "machine": {**machine, **cpu_description(), "vnni": has_vnni(), "onnxruntime": onnxruntime.__version__},
            "setup": f"random weights, 224 px, batch 1, CPUExecutionProvider, {THREADS} intra-op threads, "
            f"{ROUNDS} interleaved rounds x 3 runs per contender; p50 over all runs",
            "int8_settings": {
                name: replace(settings, calibration_size=CALIBRATION).label() for name, settings in CONTENDERS
            },
            "goals_on_vnni": GOALS,
            "command": "python -m pytest benchmarks/test_int8_speed.py --benchmark-only "
            "--benchmark-json benchmarks/results/int8_speed-cpu.pytest-benchmark.json",
        }

    yield from saved_summary(SUMMARY, summarize, merge=True)


def _files(arch: str, folder: Path) -> dict[str, Path]:
    """fp32 ONNX by edgeft, and its int8 versions (calibrated on random images: only speed counts)."""
    import torch

    from edgeft.data import default_preprocess
    from edgeft.formats.onnx import write_onnx
    from edgeft.models import get_model

    torch.manual_seed(0)
    fp32 = folder / f"{arch}.onnx"
    write_onnx(
        get_model(arch, num_classes=1000, in_chans=3),
        default_preprocess(size=224, channels=3),
        fp32,
        opset=18,
        precision="fp32",
    )
    files = {"fp32": fp32}
    for name, settings in CONTENDERS:
        rng = np.random.default_rng(0)
        batches = (rng.standard_normal((8, 3, 224, 224), dtype=np.float32) for _ in range(CALIBRATION // 8))
        files[name] = folder / f"{arch}-{name.replace(' ', '-')}.onnx"
        quantize_onnx(fp32, files[name], calibration=batches, settings=replace(settings, calibration_size=CALIBRATION))
    return files


def _interleaved_p50(files: dict[str, Path]) -> dict[str, list[float]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "0"
    )  # an idle session's threads would spin on the cores the next one times on
    sessions = {
        name: ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]) for name, p in files.items()
    }
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
    for session in sessions.values():
        for _ in range(3):
            session.run(None, {"input": x})
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(ROUNDS):
        for name, session in sessions.items():
            for _ in range(3):
                start = time.perf_counter()
                session.run(None, {"input": x})
                times[name].append(1000 * (time.perf_counter() - start))
    return times


@pytest.mark.parametrize("arch", BACKBONES)
def test_int8_against_fp32(benchmark, tmp_path, summary, arch):
    files = _files(arch, tmp_path)
    load_start = os.getloadavg()[0]
    times = benchmark.pedantic(lambda: _interleaved_p50(files), rounds=1, iterations=1)
    p50 = {name: statistics.median(ms) for name, ms in times.items()}
    summary[arch] = {
        "p50_ms": p50,
        "fp32_over_int8": p50["fp32"] / p50["int8"],
        "fp32_over_int8_float_bn": p50["fp32"] / p50["int8 float-bn"],
        "fp32_over_int8_earlier": p50["fp32"] / p50["int8 earlier"],
        "goal_on_vnni": GOALS[arch],
        "file_mb": {name: path.stat().st_size / 2**20 for name, path in files.items()},
        "load_average": [load_start, os.getloadavg()[0]],
    }
    benchmark.extra_info.update(summary[arch])
    assert p50["int8"] < p50["fp32"], p50  # int8 pays on every CPU with AVX2 or better


AGREEMENT = 0.15  # edgeft bench's p50 against the independent one, relative
BENCH_CHECK = "edgeft bench against an independent timing"


def test_bench_int8_rows_agree_with_an_independent_timing(benchmark, tmp_path, summary):
    argv = [
        str(Path(sys.executable).with_name("edgeft")),
        "bench",
        "--runtimes",
        "onnxruntime",
        "--precisions",
        "fp32,int8",
        "--batch-sizes",
        "1",
        "--keep-files",
        "--out",
        str(tmp_path),
    ]
    benchmark.pedantic(lambda: subprocess.run(argv, check=True, capture_output=True), rounds=1, iterations=1)
    rows = json.loads(next(tmp_path.glob("bench-*.json")).read_text())["rows"]
    checked = {}
    for row in rows:  # the independent p50: the median of 3 fresh processes
        independent = statistics.median(independent_onnxruntime_p50(tmp_path / row["file"]) for _ in range(3))
        checked[f"{row['model']} {row['precision']}"] = {
            "bench_p50_ms": row["p50_ms"],
            "independent_p50_ms": independent,
            "relative_difference": row["p50_ms"] / independent - 1,
        }
    summary[BENCH_CHECK] = checked
    assert all(abs(e["relative_difference"]) <= AGREEMENT for e in checked.values()), checked
    assert all(checked[f"{m} int8"]["bench_p50_ms"] < checked[f"{m} fp32"]["bench_p50_ms"] for m in BACKBONES), checked
