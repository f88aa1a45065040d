"""The peaks `% peak` divides by: a positive value per precision computed here, from each installed
runtime's products measured in fresh processes; and what bounds a batch-1 row far below its peak."""

from __future__ import annotations

import pytest

from edgeft import peak
from edgeft.bench import BenchRow
from edgeft.cpu import has_bf16
from edgeft.timing import run_measurement

from conftest import time_limit

_SMALL = {"n": 128, "convolutions": [[2, 16, 8]]}  # GemmShapes' fields, small: fast


def test_each_precision_computed_here_gets_a_positive_peak_from_its_fastest_product():
    precisions = ["fp32", "int8", *(["bf16"] if has_bf16() else [])]
    runtimes = peak.gemm_runtimes("cpu", precisions)
    assert runtimes[0] == "torch" and {"onnxruntime", "openvino"} <= set(runtimes)  # installed here
    measured = []
    for runtime in runtimes:
        spec = {"measure": "gemms", "runtime": runtime, "precisions": precisions, "device": "cpu", "threads": 1}
        result = run_measurement({**spec, "shapes": _SMALL}, timeout=time_limit(120))
        assert isinstance(result, list), result
        measured += result
    assert not [m for m in measured if "error" in m]
    assert all(m["g_per_s"] > 0 and m["runs"] >= peak.MIN_RUNS for m in measured)
    peaks = peak.peaks_per_precision(measured, [*precisions, "fp16"])
    for precision in precisions:
        best = peaks[precision]
        assert best["g_per_s"] == max(m["g_per_s"] for m in measured if m["precision"] == precision)
        assert best["gemm"] and best["runtime"] in runtimes and best["unit"] == peak.unit(precision)
    assert {m["gemm"] for m in measured if m["runtime"] == "onnxruntime" and m["precision"] == "int8"} == {
        "MatMulInteger u8 x s8",
        "QLinearMatMul u8 x s8",
        "QConv 3x3 16 ch 8x8 x2 u8 x s8",
    }  # the activation type of edgeft's int8 ONNX files on x86
    assert {m["gemm"] for m in measured if m["runtime"] == "openvino" and m["precision"] == "fp32"} == {
        "MatMul f32",
        "Conv 3x3 16 ch 8x8 x2 f32",
    }
    assert peaks["fp16"]["g_per_s"] is None and "no runtime here offers one" in peaks["fp16"]["why"]
    assert peak.unit("int8") == "GOP/s" and peak.unit("fp32") == "GFLOP/s"


def test_memory_bandwidth_is_measured_with_its_method():
    measured = run_measurement({"measure": "bandwidth", "threads": 2}, timeout=time_limit(60))
    assert measured["gb_per_s"] > 0 and "numpy copy of 256 MB in 2 threads" in measured["method"]


def _row(runtime: str, batch: int, p50_ms: float, pct: float, precision: str = "fp32", status: str = "ok"):
    return BenchRow(
        "m",
        runtime,
        precision,
        batch,
        "cpu",
        status=status,
        p50_ms=p50_ms,
        images_per_s=1000 * batch / p50_ms,
        params_m=25.0,
        pct_of_peak=pct,
    )


@pytest.mark.parametrize(
    ("batch_8_p50_ms", "bandwidth", "cause"),
    [
        (80.0, 100.0, "its kernels, not memory traffic or per-call overhead"),  # 1.0x; 100 MB at 10 GB/s: 10 %
        (20.0, 100.0, "per-call overhead"),  # batch 8 4x the img/s
        (80.0, 15.0, "memory traffic"),  # weights at 10 GB/s, 67 % of a 15 GB/s copy
        (20.0, 15.0, "memory traffic"),  # memory is named first: a larger batch reads the weights once for 8
        (80.0, None, "not told apart"),
    ],
)
def test_what_bounds_a_slow_batch_1_row_comes_from_bandwidth_and_batch_gain(batch_8_p50_ms, bandwidth, cause):
    row, batched = _row("onnxruntime", 1, 10.0, 20.0), _row("onnxruntime", 8, batch_8_p50_ms, 20.0)
    sentence = peak.what_bounds(row, batched, bandwidth)
    assert sentence.startswith(f"onnxruntime fp32 at 20 % of peak: {cause}")
    assert "weights read at 10.0 GB/s" in sentence  # 25 M fp32 weights = 100 MB per 10 ms
    assert f"batch 8 runs {80 / batch_8_p50_ms:.1f}x the img/s" in sentence


def test_int8_weights_are_one_byte_each():
    sentence = peak.what_bounds(_row("openvino", 1, 10.0, 20.0, precision="int8"), None, 100.0)
    assert "weights read at 2.5 GB/s, 2 % of the copy" in sentence and "not told apart" in sentence


def test_only_batch_1_rows_far_below_their_peak_get_a_sentence():
    rows = [
        _row("onnxruntime", 1, 10.0, 20.0),
        _row("onnxruntime", 8, 20.0, 80.0),
        _row("openvino", 1, 10.0, 60.0),  # near its peak
        _row("executorch", 1, 10.0, 10.0, status="skipped: not installed"),
        _row("eager", 1, 10.0, None),  # no peak for its precision
    ]
    (line,) = peak.bound_lines(rows, 100.0)
    assert line.startswith("m:\n  - onnxruntime fp32 at 20 % of peak: per-call overhead")
    assert line.count("\n  - ") == 1
    assert peak.bound_lines(rows[1:], 100.0) == []
