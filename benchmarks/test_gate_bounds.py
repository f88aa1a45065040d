"""Where the gate's bounds come from: the three mission backbones, each trained on real data
(the embedded digits at 64 px, 2 epochs from scratch), exported to ONNX fp32 / fp16 / int8 (the
default int8 settings, no fallback ladder) and TorchScript fp32, each through the gate. Untouched files must pass; the fp32 files show how far
below the fp32 bounds (1e-3 relative logit, 1e-4 probability) an honest export stays, and the
int8 files that the default int8 settings pass the int8 gate on real data.

Run: python -m pytest benchmarks/test_gate_bounds.py --benchmark-only \
         --benchmark-json benchmarks/results/gate_bounds-cpu.pytest-benchmark.json
It writes benchmarks/results/gate_bounds-cpu.json (every file's gate result, machine, CPU flags).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeft.config import ExportConfig
from edgeft.cpu import cpu_description
from edgeft.export import export
from edgeft.train import TrainConfig, train

SUMMARY = Path(__file__).parent / "results" / "gate_bounds-cpu.json"
BACKBONES = ("resnet18", "resnext50_32x4d", "densenet121")
EXPORTS = (("onnx", "fp32"), ("torchscript", "fp32"), ("onnx", "fp16"), ("onnx", "int8"))
KEPT = ("reference_acc", "exported_acc", "acc_drop", "top1_agreement", "top5_agreement", "max_rel_logit_diff",
        "max_prob_diff", "mean_prob_diff", "n_images", "passed", "reason", "provider")  # fmt: skip


@pytest.fixture(scope="module")
def results(machine, saved_summary):
    def summarize(files: dict) -> dict:
        return {
            "machine": {**machine, **cpu_description()},
            "training": "digits at 64 px, 2 epochs from scratch, default recipe, seed 0",
            "files": files,
            "command": "python -m pytest benchmarks/test_gate_bounds.py --benchmark-only "
                       "--benchmark-json benchmarks/results/gate_bounds-cpu.pytest-benchmark.json",
        }  # fmt: skip

    yield from saved_summary(SUMMARY, summarize)


@pytest.mark.parametrize("arch", BACKBONES)
def test_gate_on_real_data(benchmark, tmp_path, results, arch):
    best = train(TrainConfig(model=arch, img_size=64, epochs=2, out=str(tmp_path / "runs"), name=arch)).best_checkpoint

    def export_all():
        files = []
        for fmt, precision in EXPORTS:
            config = ExportConfig(checkpoint=best, format=fmt, precision=precision, out=str(tmp_path / "exported"),
                                  force=True, fallback=False)  # fmt: skip
            files += export(config).files
        return files

    files = benchmark.pedantic(export_all, rounds=1, iterations=1)
    for f in files:
        results[f"{arch} {f.format} {f.precision}"] = {key: getattr(f.validation, key) for key in KEPT}
    assert all(f.validation.passed for f in files), [(f.path, f.validation.reason) for f in files]
