"""The int8 fallback ladder and `--precision auto` on the tiny digits checkpoint: every attempt
gated, timed and reported; the kept file is the fastest that passed, never slower than fp32."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeft.artifact import read_metadata
from edgeft.candidates import Attempt, attempts_table, choose_fastest
from edgeft.config import ExportConfig
from edgeft.errors import InputError
from edgeft.export import export
from edgeft.formats.onnx import quant_settings
from edgeft.predict import Predictor

from conftest import env_without_modules, run_edgeft


def attempt(name: str, p50: float | None, passed: bool = True) -> Attempt:
    return Attempt(name, name.split()[0], 0.9, 0.1, passed, "" if passed else "accuracy dropped", p50_ms=p50)


def test_fastest_passing_candidate_is_chosen():
    fp32, int8_failed, int8 = attempt("fp32", 10.0), attempt("int8 a", 3.0, passed=False), attempt("int8 b", 6.0)
    assert choose_fastest([fp32, int8_failed, int8]) is int8 and int8.chosen and not fp32.chosen
    slow_int8 = attempt("int8 c", 12.0)
    assert choose_fastest([attempt("fp32", 10.0), slow_int8]).candidate == "fp32"  # int8 never kept when slower
    assert choose_fastest([attempt("int8 d", 1.0, passed=False)]) is None


def test_force_keeps_the_candidate_that_lost_least_when_none_passed():
    fp32, int8 = attempt("fp32", 10.0, passed=False), attempt("int8 a", 3.0, passed=False)
    fp32.drop, int8.drop = 0.5, 4.0
    assert choose_fastest([fp32, int8], force=True) is fp32 and fp32.chosen and not int8.chosen


def test_decision_table_names_each_candidate():
    head, *rows = attempts_table([attempt("fp32", 10.0), attempt("int8 a", 3.0, passed=False)])
    assert head[:4] == ["candidate", "accuracy", "drop", "p50 ms"] and head[-1] == "result"
    assert rows[0][:4] == ["fp32", "90.00 %", "0.10", "10.00"] and rows[1][-1] == "failed: accuracy dropped"


def test_decision_table_says_why_each_candidate_was_not_kept():
    kept, slower, failed = attempt("int8 a", 4.0), attempt("fp32", 10.0), attempt("int8 b", 2.0, passed=False)
    unbuilt = Attempt("bf16", "bf16", None, None, False, "OpenVINO bf16 needs a CPU with native bf16")
    kept.format, slower.format, failed.format, unbuilt.format = "onnx", "onnx", "openvino", "openvino"
    choose_fastest([kept, slower, failed])
    head, *rows = attempts_table([kept, slower, failed, unbuilt])
    assert head[0] == "format" and [row[0] for row in rows] == ["onnx", "onnx", "openvino", "openvino"]
    assert [row[-1] for row in rows] == [
        "kept",
        "2.50x slower",
        "failed: accuracy dropped",
        "not built: OpenVINO bf16 needs a CPU with native bf16",
    ]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"candidate_formats": "onnx"}, "--formats chooses the candidates of --format auto"),
        ({"format": "auto", "candidate_formats": "onnx,tflite2"}, "--formats must be one of"),
        ({"format": "auto", "candidate_formats": " , "}, "--formats: give one or more of"),
    ],
)
def test_candidate_formats_are_checked_before_any_work(options, message):
    with pytest.raises(InputError, match=message):
        ExportConfig(checkpoint="x.pt", **options)


def test_format_auto_means_precision_auto_unless_one_is_asked_for():
    assert ExportConfig(checkpoint="x.pt", format="auto").precision == "auto"
    assert ExportConfig(checkpoint="x.pt", format="auto", precision="int8").precision == "int8"
    assert ExportConfig(checkpoint="x.pt").precision == "fp32"
    assert ExportConfig(checkpoint="x.pt", format="auto", candidate_formats="openvino,onnx,onnx").candidate_formats == (
        "openvino,onnx"
    )


@pytest.mark.parametrize(
    "options, message",
    [
        ({"format": "all", "precision": "auto"}, "keeps one file"),
        ({"format": "auto", "validate": False}, "gates the candidates"),
    ],
)
def test_choices_that_cannot_be_made_are_refused(options, message):
    with pytest.raises(InputError, match=message):
        export(ExportConfig(checkpoint="x.pt", **options))


def test_quant_options_override_the_cpu_defaults(tmp_path):
    config = ExportConfig(
        checkpoint="x.pt", calib_method="entropy", activation_type="int8", reduce_range=False, calib_size=64
    )
    settings = quant_settings(config)
    assert (settings.calibrate_method, settings.activation_type, settings.reduce_range, settings.calibration_size) == (
        "entropy",
        "int8",
        False,
        64,
    )
    with pytest.raises(InputError, match="--calib-method"):
        ExportConfig(checkpoint="x.pt", calib_method="kl")
    with pytest.raises(InputError, match="--precision auto"):
        export(ExportConfig(checkpoint="x.pt", precision="auto", format="torchscript"))


@pytest.mark.slow
def test_ladder_tries_every_setting_then_fails_with_its_attempts(digits_checkpoint, tmp_path):
    config = ExportConfig(
        checkpoint=str(digits_checkpoint), precision="int8", out=str(tmp_path), max_acc_drop=-1, calib_size=16
    )
    (f,) = export(config).files
    assert not f.kept and not Path(f.path).exists() and not list(tmp_path.glob(".*"))  # nothing left behind
    assert len(f.attempts) == 4 and len({a.candidate for a in f.attempts}) == 4
    assert [a.candidate.split()[-1] for a in f.attempts][-1] == "float:first_conv+classifier"
    assert all(not a.passed and a.accuracy is not None and a.p50_ms > 0 and a.p50_batch_ms > 0 for a in f.attempts)


@pytest.mark.slow
def test_int8_that_passes_stops_the_ladder(digits_checkpoint, tmp_path):
    config = ExportConfig(
        checkpoint=str(digits_checkpoint), precision="int8", out=str(tmp_path), max_acc_drop=100, calib_size=16
    )
    (f,) = export(config).files
    assert f.kept and len(f.attempts) == 1 and f.attempts[0].passed
    quantization = read_metadata(f.path)["quantization"]
    assert quantization["calibration_size"] == 16 and "quantized" in quantization["summary"]


@pytest.mark.slow
def test_auto_keeps_the_fastest_passing_file_with_its_table(digits_checkpoint, tmp_path):
    (f,) = export(
        ExportConfig(checkpoint=str(digits_checkpoint), precision="auto", out=str(tmp_path), calib_size=32)
    ).files
    assert f.kept and Path(f.path).exists()
    by_name = {a.precision: a for a in f.attempts}
    assert {"fp32", "int8"} <= set(by_name) and sum(a.chosen for a in f.attempts) == 1
    chosen = next(a for a in f.attempts if a.chosen)
    assert chosen.passed and f.precision == chosen.precision
    assert chosen.p50_ms <= by_name["fp32"].p50_ms  # never slower than fp32
    assert Path(f.path).name == ("r18.onnx" if chosen.precision == "fp32" else f"r18-{chosen.precision}.onnx")
    metadata = read_metadata(f.path)
    assert metadata["precision"] == chosen.precision and metadata["validation"]["passed"]
    assert metadata["precision_auto"]["chosen"] == chosen.candidate
    assert [c["candidate"] for c in metadata["precision_auto"]["candidates"]] == [a.candidate for a in f.attempts]
    assert Predictor(f.path).metadata["precision"] == chosen.precision  # the kept file runs as predict runs it
    assert not list(tmp_path.glob(".*"))


@pytest.mark.slow
def test_cli_auto_prints_the_candidates(digits_checkpoint, tmp_path):
    proc = run_edgeft(
        ["export", str(digits_checkpoint), "--precision", "auto", "--calib-size", "32", "--out", str(tmp_path)],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert "candidates" in proc.stdout and "fp32" in proc.stdout and "int8 qdq" in proc.stdout and "kept" in proc.stdout
    assert "out-of-range" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_auto_with_no_passing_candidate_keeps_nothing_and_reports_all(digits_checkpoint, tmp_path):
    config = ExportConfig(
        checkpoint=str(digits_checkpoint),
        precision="auto",
        out=str(tmp_path),
        max_acc_drop=-1,
        calib_size=16,
        fallback=False,
    )
    (f,) = export(config).files
    assert not f.kept and not f.validation.passed and [a.candidate.split()[0] for a in f.attempts] == ["fp32", "int8"]
    assert not any(a.chosen for a in f.attempts) and not list(tmp_path.iterdir())


@pytest.mark.slow
def test_auto_with_force_keeps_a_file_marked_failed_when_no_candidate_passes(digits_checkpoint, tmp_path):
    config = ExportConfig(
        checkpoint=str(digits_checkpoint),
        precision="auto",
        out=str(tmp_path),
        max_acc_drop=-1,
        calib_size=16,
        fallback=False,
        force=True,
    )
    (f,) = export(config).files
    assert f.kept and Path(f.path).is_file() and not f.validation.passed
    metadata = read_metadata(f.path)
    assert metadata["validation"]["passed"] is False
    assert [c["candidate"] for c in metadata["precision_auto"]["candidates"] if c["chosen"]] == [
        metadata["precision_auto"]["chosen"]
    ]


@pytest.mark.slow
def test_format_auto_compares_runtimes_and_keeps_the_fastest_that_passed(digits_checkpoint, tmp_path):
    """Candidates of several runtimes gated and timed side by side; a format whose extra is missing
    is a row with its reason, not a failed export; the kept file carries the table and `info` shows it."""
    env = env_without_modules(tmp_path, "executorch")
    args = ["--format", "auto", "--formats", "onnx,openvino,executorch", "--calib-size", "32", "--out", "out"]
    proc = run_edgeft(["export", str(digits_checkpoint), *args], cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    (kept,) = [p for p in (tmp_path / "out").iterdir() if p.suffix in (".onnx", ".xml")]
    candidates = [Attempt(**row) for row in read_metadata(kept)["precision_auto"]["candidates"]]
    assert {c.format for c in candidates} == {"onnx", "openvino", "executorch"}
    unbuilt = [c for c in candidates if c.format == "executorch"]
    assert unbuilt and all(not c.passed and "edgeft[executorch]" in c.reason for c in unbuilt)
    finalists = [c for c in candidates if c.passed and c.p50_ms is not None]
    (chosen,) = [c for c in candidates if c.chosen]
    assert chosen.p50_ms == min(c.p50_ms for c in finalists) and len(finalists) >= 4
    assert Predictor(kept).metadata["precision"] == chosen.precision and kept.suffix == (
        ".onnx" if chosen.format == "onnx" else ".xml"
    )
    info = run_edgeft(["info", str(kept)], cwd=tmp_path, env=env)
    assert info.returncode == 0 and "not built" in info.stdout and "kept" in info.stdout
