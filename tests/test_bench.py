"""edgeft bench: rows measured in fresh processes, reports written, unavailable rows explained,
speed-ups and GFLOP/s against a measured peak, a console table that fits 80 columns, a table and
baseline per checkpoint, the timed files kept on request, a CUDA device's index kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from edgeft.bench import (
    BenchReport,
    BenchRow,
    _plan,
    _sources,
    add_speed_columns,
    combine_rounds,
    markdown_report,
    markdown_table,
    run_bench,
)
from edgeft.config import BenchConfig
from edgeft.errors import InputError

from conftest import run_edgeft


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("reports")
    config = BenchConfig(
        models=("resnet18",),
        runtimes=("eager", "torchscript", "onnxruntime"),
        batch_sizes=(1, 3),
        img_size=32,
        device="cpu",
        quick=True,
        out=str(out),
        keep_files=True,
    )
    return run_bench(config)


@pytest.mark.slow
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
    for batch in (1, 3):
        fp32, int8 = rows[("onnxruntime", "fp32", batch)], rows[("onnxruntime", "int8", batch)]
        assert fp32.vs_fp32 == 1 and int8.vs_fp32 == pytest.approx(fp32.p50_ms / int8.p50_ms)
        assert int8.gflop_per_s == pytest.approx(2 * int8.gflops * batch / (int8.p50_ms / 1000))
        int8_peak = report.machine["peak"]["per_precision"]["int8"]["g_per_s"]
        assert int8.pct_of_peak == pytest.approx(100 * int8.gflop_per_s / int8_peak)  # int8 rows: the int8 peak


@pytest.mark.slow
def test_report_files_hold_the_rows_and_the_machine(report):
    from edgeft.cpu import cpu_features

    data = json.loads(open(report.files["json"]).read())
    assert data["machine"]["cores"] >= 1 and data["machine"]["torch"] and "cpu" in data["machine"]
    assert data["machine"]["cpu_features"] == [name for name, on in cpu_features().items() if on]
    peak = data["machine"]["peak"]
    assert set(peak["per_precision"]) == {"fp32", "int8"}  # the precisions of the rows
    assert all(p["g_per_s"] > 0 and p["gemm"] for p in peak["per_precision"].values())
    assert "2048 x 2048 x 2048 matrix products" in peak["method"]
    assert {m["runtime"] for m in peak["gemms"]} >= {"torch", "onnxruntime"} and peak["memory_bandwidth"][
        "gb_per_s"
    ] > 0
    assert data["settings"]["int8"]["onnxruntime"].startswith("qdq u8s8 pc")  # the CPU-aware defaults of onnx_int8
    assert data["settings"]["iterations"] == 10 and data["settings"]["warmup"] == 1
    assert len(data["rows"]) == len(report.rows)
    markdown = open(report.files["md"]).read()
    assert markdown_table(report.rows) in markdown and "warm-up" in markdown
    assert peak["method"] in markdown and peak["memory_bandwidth"]["method"] in markdown and "x fp32" in markdown
    with Image.open(report.files["png"]) as png:
        assert png.size[0] > 400


@pytest.mark.slow
def test_kept_files_are_the_files_each_row_timed(report):
    import onnx

    folder = Path(report.files["md"]).parent
    ok = [r for r in report.rows if r.status == "ok"]
    for row in ok:
        assert row.file.startswith(Path(report.files["md"]).stem + "-files/"), row.file
        assert (folder / row.file).stat().st_size / 2**20 == pytest.approx(row.file_mb)
    assert len({r.file for r in ok}) == 4  # eager, torchscript, onnxruntime fp32 and int8: a file each
    rows = {(r.runtime, r.precision): r for r in ok}

    def operators(row: BenchRow) -> set[str]:
        return {node.op_type for node in onnx.load(str(folder / row.file)).graph.node}

    assert "DequantizeLinear" in operators(rows[("onnxruntime", "int8")])
    assert "DequantizeLinear" not in operators(rows[("onnxruntime", "fp32")])
    assert [r["file"] for r in json.loads(Path(report.files["json"]).read_text())["rows"]] == [
        r.file for r in report.rows
    ]
    assert f"| {rows[('onnxruntime', 'int8')].file} |" in Path(report.files["md"]).read_text()


@pytest.mark.slow
def test_console_table_fits_80_columns(report):
    from rich.console import Console

    from edgeft.cli.bench import print_report

    console = Console(width=80, record=True)
    print_report(report, console)
    text = console.export_text()
    assert max(map(len, text.splitlines())) <= 80 and "…" not in text
    assert "onnxruntime  int8" in text and "x fp32" in text
    threads = report.settings["threads"]
    assert f"cpu, {threads} threads, 1 round(s) taking turns, load average" in text


def test_speed_columns_compare_with_the_same_runtime_and_batch_and_the_same_precisions_peak():
    rows = [
        BenchRow("m", "onnxruntime", "fp32", 1, "cpu", p50_ms=10.0, gflops=1.0),
        BenchRow("m", "onnxruntime", "int8", 1, "cpu", p50_ms=4.0, gflops=1.0),
        BenchRow("m", "eager", "fp16", 1, "cpu", p50_ms=5.0, gflops=1.0),
        BenchRow("m", "onnxruntime", "int8", 8, "cpu", p50_ms=20.0, gflops=1.0),
        BenchRow("m", "openvino", "bf16", 1, "cpu", p50_ms=8.0, gflops=1.0),
    ]
    add_speed_columns(rows, {"fp32": 400.0, "int8": 1000.0, "bf16": None})
    assert [r.vs_fp32 for r in rows] == [1.0, 2.5, None, None, None]  # no fp32 row to compare with: none
    assert rows[0].gflop_per_s == pytest.approx(200.0) and rows[0].pct_of_peak == pytest.approx(50.0)  # fp32 peak
    assert rows[1].gflop_per_s == pytest.approx(500.0) and rows[1].pct_of_peak == pytest.approx(50.0)  # int8 peak
    assert rows[3].gflop_per_s == pytest.approx(800.0) and rows[3].pct_of_peak == pytest.approx(80.0)
    assert rows[2].pct_of_peak is None and rows[4].pct_of_peak is None  # no fp16 peak; bf16 not measured


def test_a_row_above_its_peak_is_kept_as_measured_warned_about_and_named_in_the_report(caplog):
    rows = [
        BenchRow("m", "openvino", "int8", 1, "cpu", p50_ms=1.0, gflops=1.0, params_m=1.0, images_per_s=1000.0),
        BenchRow("m", "onnxruntime", "int8", 1, "cpu", p50_ms=2.0, gflops=1.0, params_m=1.0, images_per_s=500.0),
    ]
    with caplog.at_level("WARNING", logger="edgeft.bench"):
        add_speed_columns(rows, {"int8": 1800.0})
    assert rows[0].pct_of_peak == pytest.approx(2000 / 18)  # 111 %: not clamped
    assert "m openvino int8 batch 1 runs at 111 % of the int8 peak" in caplog.text and "onnxruntime" not in caplog.text
    markdown = markdown_report(_report(rows, {"int8": 1800.0}))
    assert "**above 105 % of peak**: m openvino int8 batch 1 (111 %)" in markdown
    assert "| 111 |" in markdown and "onnxruntime int8 batch 1 (56 %)" not in markdown


def test_the_report_gives_each_precisions_peak_with_every_product_and_what_bounds_slow_rows():
    rows = [
        BenchRow("m", "onnxruntime", "fp32", 1, "cpu", p50_ms=10.0, gflops=1.0, params_m=10.0, images_per_s=100.0),
        BenchRow("m", "onnxruntime", "fp32", 8, "cpu", p50_ms=40.0, gflops=1.0, params_m=10.0, images_per_s=200.0),
    ]
    add_speed_columns(rows, {"fp32": 1000.0})
    markdown = markdown_report(_report(rows, {"fp32": 1000.0}))
    assert "- fp32: **1000.0 GFLOP/s** (onnxruntime MatMul fp32 1000.0, torch matmul fp32 900.0)" in markdown
    assert "- memory bandwidth: 20.0 GB/s (a copy)" in markdown and "above 105" not in markdown
    assert "## What bounds batch 1" in markdown
    assert "- m:\n  - onnxruntime fp32 at 20 % of peak: per-call overhead (batch 8 runs 2.0x" in markdown


def _report(rows: list[BenchRow], peaks: dict[str, float]) -> BenchReport:
    """A report of `rows` with a constructed machine: `peaks` per precision, measured by onnxruntime
    (torch 10 % slower), and a 20 GB/s bandwidth."""
    gemms = [
        {"runtime": runtime, "precision": precision, "gemm": f"{name} {precision}", "g_per_s": value}
        for precision, peak in peaks.items()
        for runtime, name, value in (("onnxruntime", "MatMul", peak), ("torch", "matmul", 0.9 * peak))
    ]
    fastest = {g["precision"]: {**g, "unit": "GFLOP/s"} for g in gemms if g["runtime"] == "onnxruntime"}
    peak = {
        "per_precision": fastest,
        "gemms": gemms,
        "method": "2048 x 2048 x 2048 products",
        "memory_bandwidth": {"gb_per_s": 20.0, "method": "a copy"},
    }
    machine = dict(cpu="a CPU", cores=2, cpu_features=[], gpu=None, driver=None, python="3", torch="2", os="an OS")
    machine.update(torchvision="0", runtimes={}, peak=peak)
    settings = {"device": "cpu", "img_size": 224, "threads": 2, "warmup": 1, "iterations": 10, "budget_s": 2.0}
    return BenchReport(machine, {**settings, "int8": {}, "keep_files": False}, rows)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"batch_sizes": (1, 0)}, "--batch-sizes"),
        ({"batch_sizes": ()}, "--batch-sizes"),
        ({"threads": -1}, "--threads"),
        ({"runtimes": ("tensorrt",)}, "--runtimes: unknown 'tensorrt'"),
        ({"precisions": ("int4",)}, "--precisions"),
        ({"device": "gpu"}, "--device"),
        ({"iterations": 0}, "--iterations"),
        ({"budget_s": 0}, "--budget-s"),
    ],
)
def test_config_refuses_bad_values(values, message):
    with pytest.raises(InputError, match=message):
        BenchConfig(**values)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args", [["--threads", "-1"], ["--batch-sizes", "1,x"], ["--runtimes", "tensorrt"], ["--models", "resnet9000"]]
)
def test_bad_options_are_one_line_and_exit_2(args, tmp_path):
    proc = run_edgeft(["bench", *args, "--quick", "--out", str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and proc.stderr.startswith("edgeft: error:")
    assert not list(tmp_path.glob("bench-*"))


@pytest.mark.slow
def test_accuracy_column_from_a_checkpoint(digits_checkpoint, tmp_path):
    config = BenchConfig(
        runtimes=("eager", "onnxruntime"),
        precisions=("fp32",),
        batch_sizes=(2,),
        device="cpu",
        quick=True,
        checkpoints=(str(digits_checkpoint),),
        out=str(tmp_path),
    )
    rows = {r.runtime: r for r in run_bench(config).rows}
    assert rows["eager"].accuracy is not None and rows["eager"].accuracy > 0.5
    assert rows["onnxruntime"].accuracy == pytest.approx(rows["eager"].accuracy)  # fp32 export keeps accuracy


@pytest.mark.slow
def test_checkpoints_of_one_architecture_get_a_table_and_baseline_each(digits_checkpoint, tmp_path):
    from rich.console import Console

    from edgeft.cli.bench import print_report

    checkpoints = (str(digits_checkpoint), str(digits_checkpoint.with_name("last.pt")))
    config = BenchConfig(
        runtimes=("onnxruntime",),
        precisions=("fp32", "int8"),
        batch_sizes=(1,),
        device="cpu",
        quick=True,
        checkpoints=checkpoints,
        out=str(tmp_path),
    )
    report = run_bench(config)
    run = digits_checkpoint.parent.name
    labels = [f"resnet18 ({run}/best.pt)", f"resnet18 ({run}/last.pt)"]
    assert list(dict.fromkeys(r.model for r in report.rows)) == labels
    assert {r.arch for r in report.rows} == {"resnet18"} and all(r.gflops > 0 for r in report.rows)
    for label in labels:
        fp32, int8 = (next(r for r in report.rows if r.model == label and r.precision == p) for p in ("fp32", "int8"))
        assert fp32.status == int8.status == "ok"
        assert fp32.vs_fp32 == 1 and int8.vs_fp32 == pytest.approx(fp32.p50_ms / int8.p50_ms)
    console = Console(width=80, record=True)
    print_report(report, console)
    titles = [line.strip() for line in console.export_text().splitlines()]
    assert all(titles.count(label) == 1 for label in labels)
    markdown = Path(report.files["md"]).read_text()
    assert all(markdown.count(f"| {label} | onnxruntime |") == 2 for label in labels)
    assert all(r.file is None for r in report.rows) and list(tmp_path.glob("bench-*-files")) == []  # nothing kept


@pytest.mark.slow
def test_labels_of_checkpoints_with_the_same_run_and_file_are_their_paths(digits_checkpoint, tmp_path):
    copies = [tmp_path / where / "runs" / "twin" / "best.pt" for where in ("a", "b")]
    for copy in copies:
        copy.parent.mkdir(parents=True)
        shutil.copy(digits_checkpoint, copy)
    config = BenchConfig(checkpoints=(str(copies[0]), str(digits_checkpoint), str(copies[1]), str(copies[0])))
    labels = [source.label for source in _sources(config)]  # the same file twice: timed once
    mine = f"resnet18 ({digits_checkpoint.parent.name}/best.pt)"
    assert labels == [f"resnet18 ({copies[0].resolve()})", mine, f"resnet18 ({copies[1].resolve()})"]


def test_a_cuda_device_with_an_index_plans_cuda_rows():
    config = BenchConfig(runtimes=("eager", "onnxruntime", "executorch"), device="cuda:1")
    on_cuda = "ExecuTorch runs on the CPU (XNNPACK); use --device cpu"
    assert _plan(config, "cuda:1") == [
        ("eager", "fp32", None),
        ("eager", "fp16", None),
        ("onnxruntime", "fp32", None),
        ("onnxruntime", "fp16", None),
        ("executorch", "fp32", on_cuda),
        ("executorch", "fp16", on_cuda),
    ]


@pytest.mark.slow
def test_unusable_cuda_is_one_line_and_exit_2(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_edgeft(
        ["bench", "--models", "resnet18", "--device", "cuda", "--img-size", "32", "--quick", "--out", str(tmp_path)],
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "edgeft: error: --device cuda: CUDA is not usable here; use --device cpu or auto"
    assert not list(tmp_path.glob("bench-*"))


@pytest.mark.slow  # lowers resnet18 twice
def test_executorch_rows_fp32_and_int8(tmp_path):
    pytest.importorskip("executorch.runtime")
    config = BenchConfig(
        models=("resnet18",),
        runtimes=("onnxruntime", "executorch"),
        precisions=("fp32", "int8"),
        batch_sizes=(1, 3),
        img_size=32,
        device="cpu",
        quick=True,
        out=str(tmp_path),
    )
    rows = {(r.runtime, r.precision, r.batch): r for r in run_bench(config).rows}
    for precision in ("fp32", "int8"):
        for batch in (1, 3):
            row = rows[("executorch", precision, batch)]
            assert row.status == "ok", row.status
            assert row.provider == "executorch:xnnpack" and 0 < row.p50_ms <= row.p99_ms and row.load_s > 0
    fp32, int8 = rows[("executorch", "fp32", 1)], rows[("executorch", "int8", 1)]
    assert int8.file_mb < 0.3 * fp32.file_mb
    assert fp32.file_mb == pytest.approx(rows[("onnxruntime", "fp32", 1)].file_mb, rel=0.1)  # the same weights


def _round(p50: float, runs: int, mean: float) -> list[dict]:
    return [
        {
            "batch": 1,
            "p50_ms": p50,
            "p90_ms": p50 + 1,
            "p99_ms": p50 + 2,
            "first_ms": 3 * p50,
            "load_s": 0.1,
            "mean_ms": mean,
            "iterations": runs,
            "images_per_s": 1000 / mean,
            "peak_rss_mb": 100 + p50,
            "provider": "cpu",
        }
    ]


def test_rounds_combine_to_their_median_so_one_slow_process_does_not_move_the_row():
    (row,) = combine_rounds([_round(10.0, 20, 10.0), _round(30.0, 20, 30.0), _round(11.0, 10, 11.0)])
    assert row["p50_ms"] == 11.0 and row["p90_ms"] == 12.0 and row["first_ms"] == 33.0
    assert row["iterations"] == 50 and row["mean_ms"] == pytest.approx((200 + 600 + 110) / 50)
    assert row["images_per_s"] == pytest.approx(1000 / row["mean_ms"]) and row["peak_rss_mb"] == 130.0


@pytest.mark.slow
def test_rounds_time_each_row_in_several_processes(tmp_path):
    config = BenchConfig(
        models=("resnet18",),
        runtimes=("onnxruntime",),
        precisions=("fp32",),
        batch_sizes=(1,),
        img_size=32,
        device="cpu",
        iterations=4,
        rounds=2,
        warmup=1,
        out=str(tmp_path),
    )
    (row,) = run_bench(config).rows
    assert row.status == "ok" and row.iterations == 4  # 2 rounds of 2: --iterations counts all rounds
    assert json.loads(next(tmp_path.glob("bench-*.json")).read_text())["settings"]["rounds"] == 2
    with pytest.raises(InputError, match="--rounds"):
        BenchConfig(rounds=0)
