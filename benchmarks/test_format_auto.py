"""`edgeft export --format auto` across runtimes: the file it keeps against independent timings.

Each backbone trained on the embedded digits at 224 px (1 epoch from scratch: the gates run on the
real validation images), then exported with `edgeft export --format auto` (every installed edge
runtime, every precision this CPU computes). Each candidate that passed its gate is written again
on its own (`edgeft export --format F --precision P`, the same settings and ladder), and every
file is timed by its runtime's plain loop (nothing from edgeft; `conftest.PLAIN_LOOPS`), batch 1,
each in a fresh process, the files taking turns for 3 rounds; a file's p50 is the median of its
rounds'. Goals on a VNNI CPU: the kept file within 10 % of the fastest candidate; onnxruntime fp32
/ the kept file >= 3.4 (resnet18), 2.9 (resnext50_32x4d), 2.4 (densenet121).

Run: python -m pytest benchmarks/test_format_auto.py --benchmark-only \
         --benchmark-json benchmarks/results/format_auto-cpu.pytest-benchmark.json
It writes benchmarks/results/format_auto-cpu.json (the decision tables, every independent timing,
machine with CPU flags and versions, load average). EDGEFT_BENCH_MODELS=resnet18 limits the
backbones.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.cpu import cpu_description, has_vnni

from conftest import plain_p50

SUMMARY = Path(__file__).parent / "results" / "format_auto-cpu.json"
BACKBONES = tuple(os.environ.get("EDGEFT_BENCH_MODELS", "resnet18,resnext50_32x4d,densenet121").split(","))
GOALS = {"resnet18": 3.4, "resnext50_32x4d": 2.9, "densenet121": 2.4}  # onnxruntime fp32 / kept, VNNI
WITHIN = 0.10  # the kept file's independent p50 over the fastest candidate's, at most 1 + this
ROUNDS = 3
EDGEFT = str(Path(sys.executable).with_name("edgeft"))


@pytest.fixture(scope="module")
def summary(machine, saved_summary):
    from edgeft.bench import machine_info

    def summarize(results: dict) -> dict:
        runtimes = machine_info("cpu")["runtimes"]
        return {
            **results,
            "machine": {**machine, **cpu_description(), "vnni": has_vnni(), "runtimes": runtimes},
            "setup": "digits at 224 px, 1 epoch from scratch; `edgeft export --format auto`; each passing candidate "
            f"re-exported alone and timed by its runtime's plain loop, batch 1, {ROUNDS} rounds of fresh processes "
            "taking turns (30 runs after 3 warm-ups each); p50: the median of the rounds'",
            "goals_on_vnni": {"onnxruntime_fp32_over_kept": GOALS, "kept_over_fastest_at_most": 1 + WITHIN},
            "command": "python -m pytest benchmarks/test_format_auto.py --benchmark-only "
            "--benchmark-json benchmarks/results/format_auto-cpu.pytest-benchmark.json",
        }

    yield from saved_summary(SUMMARY, summarize, merge=True)


def _export(checkpoint: str, out: Path, *options: str) -> Path:
    """`edgeft export` into its own folder; the file it kept (an OpenVINO file: its .xml)."""
    subprocess.run([EDGEFT, "export", checkpoint, "--out", str(out), *options], check=True, capture_output=True)
    (kept,) = [p for p in out.iterdir() if p.suffix != ".bin"]
    return kept


def _interleaved_p50s(files: dict[str, tuple[str, Path]]) -> dict[str, float]:
    """Each file's plain-loop p50, the files taking turns for ROUNDS rounds of fresh processes."""
    runs: dict[str, list[float]] = {name: [] for name in files}
    for _ in range(ROUNDS):
        for name, (fmt, path) in files.items():
            extra = ['{"recorded": true}'] if fmt == "openvino" else []  # the precision the file pins
            runs[name].append(plain_p50(fmt, path, *extra))
    return {name: statistics.median(values) for name, values in runs.items()}


@pytest.mark.parametrize("arch", BACKBONES)
def test_auto_keeps_the_fastest_candidate(benchmark, tmp_path, summary, arch):
    from edgeft import formats
    from edgeft.artifact import read_metadata
    from edgeft.train import TrainConfig, train

    best = train(TrainConfig(model=arch, img_size=224, epochs=1, out=str(tmp_path / "runs"), name=arch)).best_checkpoint
    load_start = os.getloadavg()[0]
    kept = benchmark.pedantic(lambda: _export(best, tmp_path / "auto", "--format", "auto"), rounds=1, iterations=1)
    decision = read_metadata(kept)["precision_auto"]
    finalists = [row for row in decision["candidates"] if row["passed"] and row["p50_ms"] is not None]
    files = {"kept": (formats.for_path(kept).name, kept)}
    for row in finalists:
        name = f"{row['format']} {row['precision']}"
        folder = tmp_path / name.replace(" ", "-")
        files[name] = (row["format"], _export(best, folder, "--format", row["format"], "--precision", row["precision"]))
    if "onnx fp32" not in files:  # the baseline of the goal, whether or not it was a finalist
        files["onnx fp32"] = ("onnx", _export(best, tmp_path / "onnx-fp32", "--format", "onnx"))
    p50 = _interleaved_p50s(files)
    fastest = min((name for name in p50 if name != "kept"), key=p50.get)
    result = summary[arch] = {
        "decision": decision,
        "independent_p50_ms": p50,
        "fastest_candidate": fastest,
        "kept_over_fastest": p50["kept"] / p50[fastest],
        "onnxruntime_fp32_over_kept": p50["onnx fp32"] / p50["kept"],
        "load_average": [load_start, os.getloadavg()[0]],
    }
    benchmark.extra_info.update(result)
    assert len({row["format"] for row in decision["candidates"]}) >= 3, decision
    assert result["kept_over_fastest"] <= 1 + WITHIN, result
    if has_vnni():
        assert result["onnxruntime_fp32_over_kept"] >= GOALS[arch], result
