"""LiteRT, side by side: edgeft's int8 .tflite against onnxruntime fp32 and ExecuTorch int8 (both
int8 files on XNNPACK) on the three mission backbones (random weights, 224 px, batch 1), the
gates on real data, and `edgeft bench`'s LiteRT rows against a plain ai-edge-litert loop.

- Speed: one `edgeft bench --runtimes onnxruntime,litert,executorch --precisions fp32,int8
  --batch-sizes 1 --keep-files` run over the backbones (each row in fresh processes, rounds taking
  turns). Each kept LiteRT file is timed again by a plain ai-edge-litert script (the stock
  interpreter on all cores, an int8 input quantized once, set_tensor / invoke / get_tensor) in 3
  fresh processes. For int8, a one-round `edgeft bench` row of the same file and the plain loop take
  turns for 3 rounds: edgeft's int8 p50 within 15 % of the plain loop's. onnxruntime fp32 / LiteRT
  int8 >= 2.6 on a VNNI CPU. ExecuTorch int8 is recorded beside it from the same run.
- Gates: each backbone trained on the embedded digits at 64 px (2 epochs from scratch), exported
  to LiteRT fp32 and int8 through `edgeft export`: every file must pass.

Run: python -m pytest benchmarks/test_litert.py --benchmark-only \
         --benchmark-json benchmarks/results/litert-cpu.pytest-benchmark.json
It writes benchmarks/results/litert-cpu.json (machine with CPU flags, versions, load average).
EDGEFT_BENCH_MODELS=resnet18 limits the backbones (a quick check of the suite itself).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from edgeft.cpu import cpu_description, has_vnni

from conftest import plain_p50

pytest.importorskip("litert_torch")

SUMMARY = Path(__file__).parent / "results" / "litert-cpu.json"
BACKBONES = tuple(os.environ.get("EDGEFT_BENCH_MODELS", "resnet18,resnext50_32x4d,densenet121").split(","))
GOAL = 2.6  # onnxruntime fp32 / LiteRT int8, batch 1, on a VNNI CPU, every backbone
AGREEMENT = 0.15
EDGEFT = str(Path(sys.executable).with_name("edgeft"))


@pytest.fixture(scope="module")
def summary(machine, saved_summary):
    import ai_edge_litert
    import litert_torch
    import onnxruntime

    def summarize(results: dict) -> dict:
        return {
            **results,
            "machine": {
                **machine,
                **cpu_description(),
                "vnni": has_vnni(),
                "ai_edge_litert": ai_edge_litert.__version__,
                "litert_torch": litert_torch.__version__,
                "onnxruntime": onnxruntime.__version__,
            },
            "setup": "random weights, 224 px, batch 1, all cores; `edgeft bench` rows (3 rounds of fresh processes); "
            "the plain loop: 3 fresh processes of 30 runs after 3 warm-ups, their median p50; bench over plain (int8): "
            "a one-round `edgeft bench` LiteRT int8 row and the plain loop on the same file taking turns, 3 rounds",
            "goals_on_vnni": {"onnxruntime_fp32_over_litert_int8": GOAL, "bench_vs_plain_loop_at_most": AGREEMENT},
            "command": "python -m pytest benchmarks/test_litert.py --benchmark-only "
            "--benchmark-json benchmarks/results/litert-cpu.pytest-benchmark.json",
        }

    yield from saved_summary(SUMMARY, summarize, merge=True)


def _plain_p50(path: Path) -> float:
    """The median of 3 fresh processes' p50 of the plain ai-edge-litert loop on the file."""
    return statistics.median(plain_p50("litert", path) for _ in range(3))


def _bench_and_plain_int8(arch: str, path: Path, out: Path) -> tuple[float, float]:
    """edgeft's LiteRT int8 row (one `edgeft bench` round, its file from the cache) and the plain
    loop on the same file, taking turns in fresh processes for 3 rounds: the median p50 of each.
    Taking turns keeps a machine that slows down for a minute from reading as runner overhead."""
    argv = [EDGEFT, "bench", "--models", arch, "--runtimes", "litert", "--precisions", "int8"]
    argv += ["--batch-sizes", "1", "--rounds", "1", "--out"]
    bench, plain = [], []
    for turn in range(3):
        subprocess.run([*argv, str(out / f"{arch}-{turn}")], check=True, capture_output=True)
        (row,) = json.loads(next((out / f"{arch}-{turn}").glob("bench-*.json")).read_text())["rows"]
        bench.append(row["p50_ms"])
        plain.append(plain_p50("litert", path))
    return statistics.median(bench), statistics.median(plain)


def test_litert_int8_against_onnxruntime_fp32_executorch_int8_and_a_plain_loop(benchmark, tmp_path, summary):
    argv = [EDGEFT, "bench", "--models", ",".join(BACKBONES), "--runtimes", "onnxruntime,litert,executorch"]
    argv += ["--precisions", "fp32,int8", "--batch-sizes", "1", "--keep-files", "--out", str(tmp_path)]
    load_start = os.getloadavg()[0]
    benchmark.pedantic(lambda: subprocess.run(argv, check=True, capture_output=True), rounds=1, iterations=1)
    rows = json.loads(next(tmp_path.glob("bench-*.json")).read_text())["rows"]
    p50 = {(r["model"], r["runtime"], r["precision"]): r["p50_ms"] for r in rows if r["status"] == "ok"}
    files = {(r["model"], r["precision"]): tmp_path / r["file"] for r in rows if r["runtime"] == "litert" and r["file"]}
    for arch in BACKBONES:
        bench_int8, plain_int8 = _bench_and_plain_int8(arch, files[(arch, "int8")], tmp_path / "turns")
        summary[arch] = {
            "p50_ms": {f"{runtime} {precision}": ms for (name, runtime, precision), ms in p50.items() if name == arch},
            "plain_litert_p50_ms": {"fp32": _plain_p50(files[(arch, "fp32")]), "int8": plain_int8},
            "bench_taking_turns_with_plain_int8_p50_ms": bench_int8,
            "bench_over_plain_int8": bench_int8 / plain_int8,
            "onnxruntime_fp32_over_litert_int8": p50[(arch, "onnxruntime", "fp32")] / p50[(arch, "litert", "int8")],
            "executorch_int8_over_litert_int8": p50[(arch, "executorch", "int8")] / p50[(arch, "litert", "int8")],
            "load_average": [load_start, os.getloadavg()[0]],
        }
    benchmark.extra_info.update({arch: summary[arch] for arch in BACKBONES})
    for arch in BACKBONES:
        result = summary[arch]
        assert abs(result["bench_over_plain_int8"] - 1) <= AGREEMENT, result
        if has_vnni():
            assert result["onnxruntime_fp32_over_litert_int8"] >= GOAL, result


@pytest.mark.parametrize("arch", BACKBONES)
def test_litert_files_pass_their_gates_on_digits(benchmark, tmp_path, summary, arch):
    from edgeft.config import ExportConfig
    from edgeft.export import export
    from edgeft.train import TrainConfig, train

    best = train(TrainConfig(model=arch, img_size=64, epochs=2, out=str(tmp_path / "runs"), name=arch)).best_checkpoint

    def export_all():
        precisions = ("fp32", "int8")
        configs = (ExportConfig(checkpoint=best, format="litert", precision=p, out=str(tmp_path)) for p in precisions)
        return [f for config in configs for f in export(config).files]

    files = benchmark.pedantic(export_all, rounds=1, iterations=1)
    summary[f"{arch} gates"] = {
        f.precision: {
            **{k: getattr(f.validation, k) for k in ("passed", "acc_drop", "max_rel_logit_diff", "n_images")},
            "attempts": [a.candidate for a in f.attempts],
        }
        for f in files
    }
    assert all(f.kept and f.validation.passed for f in files), summary[f"{arch} gates"]
