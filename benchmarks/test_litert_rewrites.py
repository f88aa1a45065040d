"""LiteRT's whole-graph XNNPACK rewrites (`edgeft.formats.litert_xnnpack`) on every backbone edgeft
builds: litert-torch's file as converted against the rewritten one, fp32 and int8.

Each backbone with random weights at 64 px, converted by edgeft's LiteRT writer (int8: its first
static setting, calibrated on 16 random images), before and after `delegable`; both files run by the
stock interpreter on the same 4 random images. Claims: the rewritten file is never in more XNNPACK
parts than the converted one, and in one where the converted file's extra parts came from what the
rewrites cover (every ResNet, ResNeXt, Wide ResNet and DenseNet); fp32 outputs bit-identical; int8
outputs identical where no average pool was rewritten; top-1 the same everywhere.

Run: python -m pytest benchmarks/test_litert_rewrites.py --benchmark-only
It writes benchmarks/results/litert-rewrites-cpu.json. EDGEFT_BENCH_MODELS=resnet18,densenet121
limits the backbones.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgeft.models import list_models

pytest.importorskip("litert_torch")

SUMMARY = Path(__file__).parent / "results" / "litert-rewrites-cpu.json"
BACKBONES = tuple(os.environ.get("EDGEFT_BENCH_MODELS", ",".join(list_models())).split(","))
SIZE = 64
COVERED = ("resnet", "resnext", "wide_resnet", "densenet")  # their extra parts are what the rewrites cover


@pytest.fixture(scope="module")
def summary(machine, saved_summary):
    def summarize(results: dict) -> dict:
        setup = f"random weights, {SIZE} px, 4 random images, the stock interpreter; int8 on 16 random images"
        return {**results, "machine": machine, "setup": setup}

    yield from saved_summary(SUMMARY, summarize, merge=True)


def _run(content: bytes, x: np.ndarray) -> tuple[int, np.ndarray, float]:
    """(XNNPACK parts, float32 outputs, the output tensor's scale: 0 for float) of the flatbuffer."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content, num_threads=os.cpu_count())
    interpreter.allocate_tensors()
    parts = sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for image in x:
        if source["dtype"] == np.int8:
            scale, zero = source["quantization"]
            image = np.clip(np.rint(image / scale + zero), -128, 127).astype(np.int8)
        interpreter.set_tensor(source["index"], image[None])
        interpreter.invoke()
        outputs.append(interpreter.get_tensor(target["index"])[0].astype(np.float32))
    return parts, np.stack(outputs), target["quantization"][0]


def _converted(arch: str, precision: str, folder: Path) -> bytes:
    """litert-torch's flatbuffer of the backbone, as edgeft's writer converts it, before the rewrites."""
    import torch

    from edgeft.config import ExportConfig
    from edgeft.data import default_preprocess
    from edgeft.formats import WriteRequest
    from edgeft.formats.litert import FORMAT, _convert
    from edgeft.models import get_model

    torch.manual_seed(0)
    model = get_model(arch, num_classes=10).eval()
    config = ExportConfig(checkpoint="", format="litert", precision=precision, calib_size=16)
    rung = FORMAT.int8_rungs(config)[0] if precision == "int8" else None
    rng = np.random.default_rng(0)

    def calibration(count: int):
        return (rng.standard_normal((8, 3, SIZE, SIZE), dtype=np.float32) for _ in range(0, count, 8))

    spec = default_preprocess(size=SIZE, channels=3)
    flatbuffer, _ = _convert(WriteRequest(model, spec, precision, "cpu", config, folder, rung, calibration))
    return flatbuffer


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize("arch", BACKBONES)
def test_rewrites_keep_the_function_and_join_the_parts(benchmark, tmp_path, summary, arch, precision):
    from edgeft.formats.litert_xnnpack import delegable

    converted = _converted(arch, precision, tmp_path)
    rewritten, changed = benchmark.pedantic(delegable, (converted,), rounds=1, iterations=1)
    x = np.random.default_rng(1).standard_normal((4, 3, SIZE, SIZE), dtype=np.float32)
    (parts_before, before, scale), (parts_after, after, _) = _run(converted, x), _run(rewritten, x)
    difference = float(np.abs(before - after).max())
    summary[f"{arch} {precision}"] = result = {
        "xnnpack_parts": [parts_before, parts_after],
        "rewritten": {kind: count for kind, count in changed.items() if count},
        "max_output_difference": difference,
        "in_output_steps": difference / scale if scale else None,
        "top1_same": bool((before.argmax(1) == after.argmax(1)).all()),
    }
    assert parts_after <= parts_before and result["top1_same"], result
    if arch.startswith(COVERED):
        assert parts_after == 1, result
    if precision == "fp32" or not changed["average_pools"]:
        assert difference == 0.0, result
