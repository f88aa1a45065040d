"""`edgeft export --precision auto` against an independent timing of the file it kept.

resnet18 trained on the embedded digits (2 epochs from scratch), at the size edgeft picks from
the data and at 64 px, exported with `edgeft export --precision auto`. The kept file is then
timed by a plain onnxruntime loop in a fresh process (default session options, batch 1), and
that p50 is compared with the one the decision table recorded for the kept candidate. The
command's own output must show the candidates table and no per-layer quantizer lines.

Run: python -m pytest benchmarks/test_precision_auto.py --benchmark-only \
         --benchmark-json benchmarks/results/precision_auto-cpu.pytest-benchmark.json
It writes benchmarks/results/precision_auto-cpu.json (the decision tables, both timings, machine
and CPU flags).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.artifact import read_metadata
from edgeft.cpu import cpu_description
from edgeft.train import TrainConfig, train

from conftest import independent_onnxruntime_p50

SUMMARY = Path(__file__).parent / "results" / "precision_auto-cpu.json"
EDGEFT = str(Path(sys.executable).with_name("edgeft"))
AGREEMENT = 0.15  # the decision table's p50 against the independent one, relative


@pytest.fixture(scope="module")
def results(machine, saved_summary):
    def summarize(runs: dict) -> dict:
        return {"machine": {**machine, **cpu_description()}, "agreement_bound": AGREEMENT, "runs": runs}

    yield from saved_summary(SUMMARY, summarize)


@pytest.mark.parametrize("img_size", [None, 64], ids=["size-from-data", "64px"])
def test_auto_keeps_a_file_whose_timing_holds(benchmark, tmp_path, results, img_size):
    config = TrainConfig(
        epochs=2, out=str(tmp_path / "runs"), name="r18", **({"img_size": img_size} if img_size else {})
    )
    checkpoint = train(config).best_checkpoint
    argv = [EDGEFT, "export", checkpoint, "--precision", "auto", "--out", str(tmp_path / "exported")]
    proc = benchmark.pedantic(lambda: subprocess.run(argv, capture_output=True, text=True), rounds=1, iterations=1)
    assert proc.returncode == 0, proc.stderr
    console = proc.stdout + proc.stderr
    assert "candidate" in console and "passed" in console and "Axis" not in console
    (kept,) = (tmp_path / "exported").glob("*.onnx")
    decision = read_metadata(kept)["precision_auto"]
    chosen = next(c for c in decision["candidates"] if c["chosen"])
    independent = [independent_onnxruntime_p50(kept) for _ in range(3)]
    median = sorted(independent)[1]
    results[f"resnet18 digits {read_metadata(kept)['preprocess']['size']} px"] = {
        "kept": kept.name,
        "decision": decision,
        "independent_p50_ms": independent,
        "relative_difference": chosen["p50_ms"] / median - 1,
        "console": console.splitlines()[-12:],
    }
    assert chosen["passed"]
    fp32 = next(c for c in decision["candidates"] if c["candidate"] == "fp32")
    assert chosen["p50_ms"] <= fp32["p50_ms"]  # never kept slower than fp32
    assert abs(chosen["p50_ms"] / median - 1) <= AGREEMENT, (chosen["p50_ms"], independent)
