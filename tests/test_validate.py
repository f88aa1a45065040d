"""The gate: an exported file run as `edgeft predict` runs it (its own metadata, its own runner)
against its checkpoint; files changed after export fail or are refused, and name why."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeft.artifact import content_digest, read_metadata, write_metadata
from edgeft.config import ExportConfig
from edgeft.errors import InputError
from edgeft.export import export
from edgeft.validate import FP32_LOGIT_RTOL, FP32_PROB_ATOL, validate_file

from conftest import TAMPERS, formats_here, one_line_error, run_edgeft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp32_files(digits_exports) -> dict[str, Path]:
    """Untouched fp32 files of every format of the digits checkpoint, in exported/ beside its runs/."""
    return {name: Path(f.path) for name, f in digits_exports.items()}


def _copy(path: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / f"{name}{path.suffix}"
    shutil.copy(path, target)
    return target


def _edit_metadata(path: Path, edit) -> None:
    metadata = read_metadata(path)
    edit(metadata)
    write_metadata(path, metadata)


@pytest.mark.parametrize("fmt", formats_here())
def test_untouched_files_pass_the_sharper_fp32_gate(fp32_files, digits_checkpoint, fmt):
    result = validate_file(fp32_files[fmt.name], reference=digits_checkpoint)
    assert result.passed, result.reason
    assert result.top1_agreement == 1.0 and result.top5_agreement == 1.0
    assert result.max_rel_logit_diff <= FP32_LOGIT_RTOL and result.max_prob_diff <= FP32_PROB_ATOL
    assert result.n_images == 359 and result.notes == []


EDITS = {
    "mean": lambda m: m["preprocess"].update(mean=[0.3]),
    "std": lambda m: m["preprocess"].update(std=[0.5]),
    "resize": lambda m: m["preprocess"].update(resize=m["preprocess"]["resize"] + 4),
    "interpolation": lambda m: m["preprocess"].update(interpolation="nearest"),
    "channels": lambda m: m["preprocess"].update(channels=3, mean=[0.45] * 3, std=[0.22] * 3),
    "class list": lambda m: m.update(classes=m["classes"][::-1]),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_metadata_changed_after_export_fails_and_names_the_field(fp32_files, digits_checkpoint, tmp_path, field):
    path = _copy(fp32_files["onnx"], tmp_path, field)
    _edit_metadata(path, EDITS[field])
    result = validate_file(path, reference=digits_checkpoint)
    assert not result.passed and field in result.reason


def _tampered(fmt, unsealed, original: Path, tamper: str, folder: Path) -> Path:
    """The model of `original` with its weights changed (TAMPERS), written by the format's own writer,
    carrying the metadata of `original` (its digest included): weights changed after export."""
    path = folder / f"tampered{fmt.suffixes[0]}"
    for source, target in zip(fmt.files(unsealed(fmt, tamper)), fmt.files(path)):
        shutil.copy(source, target)
    fmt.write_metadata(path, fmt.read(original)[0])
    return path


@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("fmt", formats_here())
def test_weights_changed_after_export_are_refused_as_modified(
    fmt, fp32_files, unsealed, digits_checkpoint, tmp_path, tamper
):
    path = _tampered(fmt, unsealed, fp32_files[fmt.name], tamper, tmp_path)
    with pytest.raises(InputError, match="modified after export"):
        validate_file(path, reference=digits_checkpoint)


@pytest.mark.parametrize("tamper", list(TAMPERS))
@pytest.mark.parametrize("fmt", formats_here())
def test_weights_changed_with_a_forged_digest_fail_the_fp32_gate(
    fmt, fp32_files, unsealed, digits_checkpoint, tmp_path, tamper
):
    path = _tampered(fmt, unsealed, fp32_files[fmt.name], tamper, tmp_path)
    metadata = read_metadata(path, verify=False)
    write_metadata(path, {**metadata, "content_sha256": content_digest(path)})
    result = validate_file(path, reference=digits_checkpoint)
    assert not result.passed and ("logits differ" in result.reason or "probabilities differ" in result.reason)


def test_cli_names_the_mismatch_and_exits_1(fp32_files, digits_checkpoint, tmp_path):
    (tmp_path / "exported").mkdir()
    path = _copy(fp32_files["onnx"], tmp_path / "exported", "renamed-classes")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / digits_checkpoint.parent.name).symlink_to(digits_checkpoint.parent)
    _edit_metadata(path, EDITS["class list"])
    proc = run_edgeft(["validate", str(path)], cwd=path.parent)  # the checkpoint is found beside exported/
    assert proc.returncode == 1, proc.stderr
    assert "class list" in one_line_error(proc.stderr)


def test_validate_says_when_the_reference_is_another_checkpoint(fp32_files, digits_checkpoint, tmp_path):
    other = tmp_path / "other.pt"
    other.write_bytes(digits_checkpoint.read_bytes())  # a copy: the same sha256 ...
    assert validate_file(fp32_files["onnx"], reference=other).notes == []
    import torch

    content = torch.load(digits_checkpoint, weights_only=True)
    content["note"] = "retrained"
    torch.save(content, other)  # ... and a different file
    result = validate_file(fp32_files["onnx"], reference=other)
    assert result.passed and "not the checkpoint this file was exported from" in result.notes[0]


def test_shipped_metadata_has_no_path_of_this_machine(fp32_files, digits_checkpoint, tmp_path):
    for path in fp32_files.values():
        proc = run_edgeft(["info", str(path), "--json"], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        text = proc.stdout
        assert str(Path.home()) not in text and str(digits_checkpoint.parent.parent) not in text
        assert json.loads(text)["source_checkpoint"] == {
            "file": "best.pt",
            "run": "r18",
            "sha256": json.loads(text)["source_checkpoint"]["sha256"],
        }
        shown = run_edgeft(["info", str(path)], cwd=tmp_path).stdout
        assert json.loads(text)["content_sha256"][:20] in shown.replace("\n", "").replace("│", "").replace(" ", "")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["export", "validate"])
def test_unusable_cuda_is_one_line_and_exit_2(fp32_files, digits_checkpoint, tmp_path, command):
    target = str(digits_checkpoint) if command == "export" else str(fp32_files["onnx"])
    proc = run_edgeft([command, target, "--device", "cuda"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "CUDA is not usable" in one_line_error(proc.stderr)


def test_folder_data_runs_the_files_through_both_and_leaves_out_undecodable_ones(tmp_path):
    from edgeft.train import TrainConfig, train

    from conftest import make_image_folder

    data = tmp_path / "shapes"
    make_image_folder(data / "train", {"a": 12, "b": 12, "c": 12})
    make_image_folder(data / "val", {"a": 4, "b": 4, "c": 4}, seed=1)
    best = train(
        TrainConfig(data=str(data), img_size=16, epochs=1, out=str(tmp_path / "runs"), name="shapes")
    ).best_checkpoint
    result = export(ExportConfig(checkpoint=best, out=str(tmp_path / "exported")))
    validation = result.files[0].validation
    assert validation.passed and validation.n_images == 12 and validation.dataset == "shapes"
    broken = data / "val" / "a" / "000.png"
    broken.write_bytes(broken.read_bytes()[:60])  # the header survives, the pixels do not
    again = validate_file(result.files[0].path, reference=best)
    assert again.passed and again.n_images == 11
    assert "1 validation file(s) could not be decoded" in again.notes[0]
