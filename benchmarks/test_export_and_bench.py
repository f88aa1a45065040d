"""Wall times behind the README's export and bench claims, and `edgeft bench` checked against an
independent measurement, on this machine.

- export: the whole `edgeft export runs/<r18>/best.pt` process (fp32 ONNX + validation on digits).
- bench agreement: resnet18 at 224 px, batch 1: the eager / onnxruntime p50 latency ratio from
  `edgeft bench` against the same ratio from a plain timing loop in this process (same threads).
- bench wall: `edgeft bench --quick` and the full default `edgeft bench` as whole processes, each with an
  empty file cache of its own.

Run: python -m pytest benchmarks/test_export_and_bench.py --benchmark-only \
         --benchmark-json benchmarks/results/export_bench-cpu.pytest-benchmark.json
It writes benchmarks/results/export_bench-cpu.json and keeps the full bench report it ran as
benchmarks/results/bench-default-cpu.md/.json/.png. EDGEFT_BENCH_FULL=0 skips the full run.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import P50_SCRIPT

RESULTS = Path(__file__).parent / "results"
SUMMARY = RESULTS / "export_bench-cpu.json"
EDGEFT = str(Path(sys.executable).with_name("edgeft"))


@pytest.fixture(scope="module")
def summary(machine, saved_summary):
    """Results of the tests that ran, merged into the saved summary (a single test can be re-run)."""
    yield from saved_summary(SUMMARY, lambda results: {**results, "machine": machine}, merge=True)


def _timed(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def _empty_cache_env(tmp_path: Path) -> dict[str, str]:
    """The environment with edgeft's file cache in a new folder, so a bench wall time includes making its files."""
    return {**os.environ, "EDGEFT_CACHE": str(tmp_path / "cache")}


def test_export_resnet18_digits_wall(benchmark, tmp_path, summary):
    from edgeft.train import TrainConfig, train

    checkpoint = train(TrainConfig(epochs=2, out=str(tmp_path / "runs"), name="r18")).best_checkpoint
    walls = []
    benchmark.pedantic(lambda: walls.append(_timed([EDGEFT, "export", checkpoint], tmp_path)), rounds=3, iterations=1)
    summary["export_resnet18_digits_fp32_onnx_with_validation_wall_s"] = {
        "median": statistics.median(walls),
        "rounds": walls,
    }


# A plain script, in a fresh process like each bench row: torchvision's resnet18, torch.onnx, a timing loop.
INDEPENDENT = (
    P50_SCRIPT
    + r"""
import json, os, statistics, sys, time
import numpy as np, onnxruntime as ort, torch, torchvision
threads = os.cpu_count()
torch.set_num_threads(threads)
model = torchvision.models.resnet18().eval()
x = np.random.default_rng(1).standard_normal((1, 3, 224, 224), dtype=np.float32)
torch.onnx.export(model, (torch.from_numpy(x),), sys.argv[1], input_names=["input"], dynamo=True, external_data=False)
with torch.inference_mode():
    eager = p50(lambda: model(torch.from_numpy(x)))
options = ort.SessionOptions(); options.intra_op_num_threads = threads
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
onnx = p50(lambda: session.run(None, {"input": x}))
print(json.dumps({"eager_p50_ms": eager, "onnxruntime_p50_ms": onnx, "ratio": eager / onnx}))
"""
)


def _independent_ratio(folder: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", INDEPENDENT, str(folder / "independent.onnx")],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_bench_agrees_with_an_independent_measurement(benchmark, tmp_path, summary):
    def bench_ratio() -> dict:
        subprocess.run(
            [
                EDGEFT,
                "bench",
                "--models",
                "resnet18",
                "--runtimes",
                "eager,onnxruntime",
                "--precisions",
                "fp32",
                "--batch-sizes",
                "1",
                "--out",
                str(tmp_path),
            ],
            check=True,
            capture_output=True,
        )
        rows = json.loads(sorted(tmp_path.glob("bench-*.json"))[-1].read_text())["rows"]
        p50 = {r["runtime"]: r["p50_ms"] for r in rows}
        return {
            "eager_p50_ms": p50["eager"],
            "onnxruntime_p50_ms": p50["onnxruntime"],
            "ratio": p50["eager"] / p50["onnxruntime"],
        }

    pairs = []
    benchmark.pedantic(
        lambda: pairs.append({"edgeft_bench": bench_ratio(), "independent": _independent_ratio(tmp_path)}),
        rounds=2,
        iterations=1,
    )
    disagreement = [abs(p["edgeft_bench"]["ratio"] / p["independent"]["ratio"] - 1) for p in pairs]
    summary["bench_eager_to_onnxruntime_ratio_resnet18_b1"] = {"pairs": pairs, "relative_disagreement": disagreement}
    benchmark.extra_info["relative_disagreement"] = disagreement


def test_bench_quick_wall(benchmark, tmp_path, summary):
    walls = []
    benchmark.pedantic(
        lambda: walls.append(
            _timed([EDGEFT, "bench", "--quick", "--out", str(tmp_path)], tmp_path, _empty_cache_env(tmp_path))
        ),
        rounds=1,
        iterations=1,
    )
    summary["bench_quick_wall_s"] = walls[0]


@pytest.mark.skipif(os.environ.get("EDGEFT_BENCH_FULL") == "0", reason="EDGEFT_BENCH_FULL=0")
def test_bench_default_wall(benchmark, tmp_path, summary):
    walls = []
    benchmark.pedantic(
        lambda: walls.append(_timed([EDGEFT, "bench", "--out", str(tmp_path)], tmp_path, _empty_cache_env(tmp_path))),
        rounds=1,
        iterations=1,
    )
    summary["bench_default_wall_s"] = walls[0]
    for report in tmp_path.glob("bench-*"):
        shutil.copy(report, RESULTS / f"bench-default-cpu{report.suffix}")
