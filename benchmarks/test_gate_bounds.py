"""Where the gate's bounds come from: the three mission backbones, each trained on real data (the
embedded digits at 64 px, 2 epochs from scratch), exported to ONNX fp32 / fp16 / int8 (the x86
default int8 settings, with 7-bit and with 8-bit weights, no fallback ladder) and TorchScript
fp32, each through the gate. Untouched files must pass; the fp32 files show how far below the fp32
bounds (1e-3 relative logit, 1e-4 probability) an honest export stays, and the int8 files that the
default int8 settings pass the int8 gate on real data.

Run: python -m pytest benchmarks/test_gate_bounds.py --benchmark-only \
         --benchmark-json benchmarks/results/gate_bounds-cpu.pytest-benchmark.json
It writes benchmarks/results/gate_bounds-cpu.json (every file's gate result, machine, CPU flags).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgeft.checkpoint import load_checkpoint
from edgeft.config import ExportConfig
from edgeft.cpu import cpu_description, has_vnni
from edgeft.data import iterate_batches, load_checkpoint_data
from edgeft.export import export
from edgeft.models import model_from_checkpoint
from edgeft.train import TrainConfig, train
from edgeft.validate import gate_for

SUMMARY = Path(__file__).parent / "results" / "gate_bounds-cpu.json"
BACKBONES = ("resnet18", "resnext50_32x4d", "densenet121")
EXPORTS = (("onnx", "fp32"), ("torchscript", "fp32"), ("onnx", "fp16"), ("onnx", "int8"))
# int8 with each x86 default: 7-bit weights (CPUs without VNNI) and 8-bit weights (VNNI). The file
# of this CPU's default must pass its gate. On a CPU without VNNI, the 8-bit file's products are
# summed in saturating int16 pairs (measured, not gated) and also exactly, as VNNI sums them (gated).
REDUCE_RANGE = (True, False)
KEPT = (
    "reference_acc",
    "exported_acc",
    "acc_drop",
    "top1_agreement",
    "top5_agreement",
    "max_rel_logit_diff",
    "max_prob_diff",
    "mean_prob_diff",
    "n_images",
    "passed",
    "reason",
    "provider",
)


@pytest.fixture(scope="module")
def results(machine, saved_summary):
    def summarize(files: dict) -> dict:
        return {
            "machine": {**machine, **cpu_description()},
            "training": "digits at 64 px, 2 epochs from scratch, default recipe, seed 0",
            "files": files,
            "command": "python -m pytest benchmarks/test_gate_bounds.py --benchmark-only "
            "--benchmark-json benchmarks/results/gate_bounds-cpu.pytest-benchmark.json",
        }

    yield from saved_summary(SUMMARY, summarize)


@pytest.mark.parametrize("arch", BACKBONES)
def test_gate_on_real_data(benchmark, tmp_path, results, arch):
    best = train(TrainConfig(model=arch, img_size=64, epochs=2, out=str(tmp_path / "runs"), name=arch)).best_checkpoint

    def export_all():
        files = []
        for fmt, precision in EXPORTS:
            for reduce_range in REDUCE_RANGE if precision == "int8" else (None,):
                config = ExportConfig(
                    checkpoint=best,
                    format=fmt,
                    precision=precision,
                    out=str(tmp_path / "exported"),
                    force=True,
                    fallback=False,
                    reduce_range=reduce_range,
                )
                files += [(reduce_range, f) for f in export(config).files]
        return files

    files = benchmark.pedantic(export_all, rounds=1, iterations=1)
    gated, exact = [], None
    for reduce_range, f in files:
        weights = {True: " 7-bit weights", False: " 8-bit weights"}.get(reduce_range, "")
        results[f"{arch} {f.format} {f.precision}{weights}"] = {key: getattr(f.validation, key) for key in KEPT}
        if reduce_range is None or reduce_range != has_vnni():  # this CPU's own settings
            gated.append(f)
        elif not has_vnni():
            exact = results[f"{arch} onnx int8 8-bit weights, exact integer sums (VNNI)"] = _exact_sums(f.path, best)
    assert all(f.validation.passed for f in gated), [(f.path, f.validation.reason) for f in gated]
    assert exact is None or exact["passed"], exact


def _exact_sums(path: str, checkpoint_path: str) -> dict:
    """The int8 file's accuracy with its integer products summed exactly, as VNNI's int32 dot
    products do: with graph optimizations off, onnxruntime runs each DequantizeLinear -> Conv ->
    QuantizeLinear in float instead of AVX2's u8 x s8 kernel, whose int16 pair sums 8-bit weights
    can saturate. Judged by the int8 gate."""
    checkpoint = load_checkpoint(checkpoint_path)
    bundle, model = load_checkpoint_data(checkpoint), model_from_checkpoint(checkpoint).eval()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    counts = np.zeros(3, dtype=int)  # reference correct, file correct, agreeing
    with torch.inference_mode():
        for x, y in iterate_batches(
            bundle.val, batch_size=64, preprocess=bundle.preprocess, device=torch.device("cpu")
        ):
            ref, out = model(x).argmax(1).numpy(), session.run(None, {"input": x.numpy()})[0].argmax(1)
            counts += [(ref == y.numpy()).sum(), (out == y.numpy()).sum(), (out == ref).sum()]
    n = len(bundle.val)
    drop = 100 * (counts[0] - counts[1]) / n
    return {
        "reference_acc": counts[0] / n,
        "exported_acc": counts[1] / n,
        "acc_drop": drop,
        "top1_agreement": counts[2] / n,
        "n_images": n,
        "passed": bool(drop <= gate_for("int8")[0]),
    }
