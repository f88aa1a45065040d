"""edgeft bench: rows measured in fresh processes, reports written, unavailable rows explained."""

from __future__ import annotations

import json

import pytest
from conftest import run_edgeft
from PIL import Image

from edgeft.bench import markdown_table, run_bench
from edgeft.config import BenchConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    config = BenchConfig(models=("resnet18",), runtimes=("eager", "torchscript", "onnxruntime", "tensorrt"),
                         batch_sizes=(1, 3), img_size=32, device="cpu", quick=True, out=str(out))  # fmt: skip
    return run_bench(config)


def test_every_requested_row_is_measured_or_explained(report):
    rows = {(r.runtime, r.precision, r.batch): r for r in report.rows}
    measured = [("eager", "fp32"), ("torchscript", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")]
    for runtime, precision in measured:
        for batch in (1, 3):
            row = rows[(runtime, precision, batch)]
            assert row.status == "ok", row.status
            assert 0 < row.p50_ms <= row.p90_ms <= row.p99_ms
            assert row.images_per_s == pytest.approx(batch * 1000 / row.mean_ms)
            assert row.load_s > 0 and row.first_ms > 0 and row.peak_rss_mb > 0 and row.file_mb > 0
            assert row.iterations >= 5 and row.params_m == pytest.approx(11.69, abs=0.01)  # resnet18, 1000 classes
    assert rows[("onnxruntime", "fp32", 1)].provider == "CPUExecutionProvider"
    assert rows[("eager", "fp32", 1)].provider == "torch-cpu"
    assert rows[("onnxruntime", "int8", 1)].file_mb < 0.3 * rows[("onnxruntime", "fp32", 1)].file_mb
    # onnxruntime rows never load torch: their process is far smaller than an eager one
    assert rows[("onnxruntime", "fp32", 1)].peak_rss_mb < rows[("eager", "fp32", 1)].peak_rss_mb
    skipped = [r for r in report.rows if r.runtime == "tensorrt"]
    assert skipped and all(r.status.startswith("skipped: unknown runtime") for r in skipped)


def test_report_files_hold_the_rows_and_the_machine(report):
    data = json.loads(open(report.files["json"]).read())
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] and "cpu" in data["machine"]
    assert data["settings"]["iterations"] == 10 and data["settings"]["warmup"] == 1
    assert len(data["rows"]) == len(report.rows)
    markdown = open(report.files["md"]).read()
    assert markdown_table(report.rows) in markdown and "warm-up" in markdown
    with Image.open(report.files["png"]) as png:
        assert png.size[0] > 400


def test_accuracy_column_from_a_checkpoint(digits_checkpoint, tmp_path):
    config = BenchConfig(runtimes=("eager", "onnxruntime"), precisions=("fp32",), batch_sizes=(2,), device="cpu",
                         quick=True, checkpoints=(str(digits_checkpoint),), out=str(tmp_path))  # fmt: skip
    rows = {r.runtime: r for r in run_bench(config).rows}
    assert rows["eager"].accuracy is not None and rows["eager"].accuracy > 0.5
    assert rows["onnxruntime"].accuracy == pytest.approx(rows["eager"].accuracy)  # fp32 export keeps accuracy


def test_unavailable_device_is_explained_not_fatal(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_edgeft(["bench", "--models", "resnet18", "--device", "cuda", "--img-size", "32", "--quick",
                       "--out", str(tmp_path)], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


def test_executorch_rows_fp32_and_int8(tmp_path):
    pytest.importorskip("executorch.runtime")
    config = BenchConfig(models=("resnet18",), runtimes=("onnxruntime", "executorch"), precisions=("fp32", "int8"),
                         batch_sizes=(1, 3), img_size=32, device="cpu", quick=True, out=str(tmp_path))  # fmt: skip
    rows = {(r.runtime, r.precision, r.batch): r for r in run_bench(config).rows}
    for precision in ("fp32", "int8"):
        for batch in (1, 3):
            row = rows[("executorch", precision, batch)]
            assert row.status == "ok", row.status
            assert row.provider == "executorch:xnnpack" and 0 < row.p50_ms <= row.p99_ms and row.load_s > 0
    fp32, int8 = rows[("executorch", "fp32", 1)], rows[("executorch", "int8", 1)]
    assert int8.file_mb < 0.3 * fp32.file_mb
    assert fp32.file_mb == pytest.approx(rows[("onnxruntime", "fp32", 1)].file_mb, rel=0.1)  # the same weights
