"""Exported files: metadata schema, content digest, and the refusals that protect them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

from edgeft.artifact import content_digest, parse_metadata, read_metadata, write_metadata
from edgeft.errors import InputError

from conftest import one_line_error, run_edgeft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def files(digits_exports) -> dict[str, Path]:
    return {name: Path(f.path) for name, f in digits_exports.items()}


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "executorch"])
def test_digest_ignores_the_metadata_and_sees_the_model(files, tmp_path, fmt):
    path = tmp_path / files[fmt].name
    shutil.copy(files[fmt], path)
    before = content_digest(path)
    assert read_metadata(path)["content_sha256"] == before
    write_metadata(path, {**read_metadata(path), "note": "rewritten"})
    assert content_digest(path) == before and read_metadata(path)["note"] == "rewritten"
    if fmt == "onnx":
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])  # still a valid model
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        model.graph.initializer[0].raw_data = bytes(len(model.graph.initializer[0].raw_data))
        onnx.save(model, str(path))
        assert content_digest(path) != before


def _with_metadata(source: Path, tmp_path: Path, text: str) -> Path:
    model = onnx.load(str(source))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, {"edgeft": text})
    path = tmp_path / "broken.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "a list, not an object"),
        ('{"arch": "resnet18"}', "lacks or mistypes"),
    ],
)
def test_broken_metadata_is_one_line_and_exit_2(files, tmp_path, text, message):
    path = _with_metadata(files["onnx"], tmp_path, text)
    with pytest.raises(InputError, match=message):
        read_metadata(path)
    for command in (["info", str(path)], ["validate", str(path)], ["predict", "--model", str(path), str(path)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2 and message in one_line_error(proc.stderr)


def test_class_list_shorter_than_the_outputs_is_refused(files, tmp_path):
    metadata = read_metadata(files["onnx"])
    metadata.update(classes=metadata["classes"][:9], num_classes=9)
    path = _with_metadata(files["onnx"], tmp_path, json.dumps(metadata))
    image = Path(__file__).parent.parent / "examples" / "digits" / "3.png"
    proc = run_edgeft(["predict", "--model", str(path), str(image)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "gives [10] outputs but its metadata says [9]" in one_line_error(proc.stderr)


def test_parse_metadata_checks_the_class_count(files):
    metadata = read_metadata(files["onnx"])
    assert parse_metadata(json.dumps(metadata), "x") == metadata
    with pytest.raises(InputError, match="10 class names, got 1"):
        parse_metadata(json.dumps({**metadata, "classes": ["a"]}), "x")


def test_info_on_a_checkpoint_says_what_it_is(digits_checkpoint, tmp_path):
    proc = run_edgeft(["info", str(digits_checkpoint)], cwd=tmp_path)
    assert proc.returncode == 2
    assert "checkpoint" in one_line_error(proc.stderr) and "edgeft export" in proc.stderr


def test_junk_in_the_metadata_field_is_one_line(files, tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(files["onnx"].read_bytes() + bytes([0x75, 0xFF, 0xFF, 0xFF, 0xFF]))  # field 14, a 32-bit value
    for command in (["info", str(path)], ["predict", "--model", str(path), str(path)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2 and "not a readable ONNX file" in one_line_error(proc.stderr)


def test_a_damaged_torchscript_archive_is_refused(files, tmp_path):
    import zipfile

    path = tmp_path / "damaged.ts"
    data = bytearray(files["torchscript"].read_bytes())
    with zipfile.ZipFile(files["torchscript"]) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)  # the largest weights, stored
    data[entry.header_offset + 30 + len(entry.filename) + 64 + entry.file_size // 2] ^= 0xFF  # inside its data
    path.write_bytes(bytes(data))
    with pytest.raises(InputError, match="damaged or modified after export|modified after export"):
        read_metadata(path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mean": ["a"]}, "finite numbers"),
        ({"std": [0.0]}, "std must be positive"),
        ({"size": 16.5}, "must be integers"),
    ],
)
def test_unusable_preprocessing_in_metadata_is_refused(files, tmp_path, change, message):
    metadata = read_metadata(files["onnx"])
    metadata["preprocess"].update(change)
    path = _with_metadata(files["onnx"], tmp_path, json.dumps(metadata))
    with pytest.raises(InputError, match=message):
        read_metadata(path)


def _rebuilt_archive(source: Path, path: Path, entries: list[tuple[str, bytes]]) -> Path:
    """A TorchScript archive holding exactly `entries` (name, data), in that order."""
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            archive.writestr(name, data)
    return path


def _weights_entries(source: Path) -> tuple[list[tuple[str, bytes]], str]:
    """The archive's entries, and the name of its largest weights entry."""
    import zipfile

    with zipfile.ZipFile(source) as archive:
        entries = [(info.filename, archive.read(info)) for info in archive.infolist()]
    largest = max((name for name, _ in entries if "/constants/" in name), key=lambda n: len(dict(entries)[n]))
    return entries, largest


@pytest.mark.parametrize(
    "trick", ["original under another folder", "duplicate name, tampered first", "name differing in case"]
)
def test_a_torchscript_archive_the_loader_reads_differently_from_the_digest_is_refused(files, tmp_path, trick):
    entries, weights = _weights_entries(files["torchscript"])
    original = dict(entries)[weights]
    tampered = [(n, bytes(b ^ 0x80 for b in d[:4]) + d[4:] if n == weights else d) for n, d in entries]
    prefix, rest = weights.split("/", 1)
    extra = {
        "original under another folder": (f"zz{prefix}/{rest}", original),
        "duplicate name, tampered first": (weights, original),
        "name differing in case": (f"{prefix}/{rest.upper()}", original),
    }[trick]
    path = _rebuilt_archive(files["torchscript"], tmp_path / "tampered.ts", [*tampered, extra])
    with pytest.raises(InputError, match="one top-level folder|duplicate entries"):
        read_metadata(path)
    proc = run_edgeft(["info", str(path)], cwd=tmp_path)
    assert proc.returncode == 2 and "(verified)" not in proc.stdout
    one_line_error(proc.stderr)


def test_a_zip_bomb_inside_a_torchscript_file_is_refused_before_it_is_inflated(files, tmp_path):
    import zipfile

    path = tmp_path / "bomb.ts"
    shutil.copy(files["torchscript"], path)
    prefix = zipfile.ZipFile(path).namelist()[0].split("/", 1)[0]
    with zipfile.ZipFile(path, "a", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(f"{prefix}/constants/bomb", bytes(3 * path.stat().st_size + 2**25))
    with pytest.raises(InputError, match="inflate to more than a model of its size holds"):
        read_metadata(path)


def test_no_debug_tables_and_the_metadata_rewrite_keeps_the_archive_loadable(files, tmp_path):
    import zipfile

    import torch

    names = zipfile.ZipFile(files["torchscript"]).namelist()
    assert not [n for n in names if n.endswith(".debug_pkl")] and any(n.endswith("extra/edgeft.json") for n in names)
    extra = {"edgeft.json": ""}
    module = torch.jit.load(str(files["torchscript"]), _extra_files=extra)
    assert json.loads(extra["edgeft.json"]) == read_metadata(files["torchscript"])
    assert module(torch.zeros(1, 1, 16, 16)).shape == (1, 10)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "executorch"])
@pytest.mark.parametrize(
    "text",
    ["[" * 100_000 + "]" * 100_000, '{"a": ' * 50 + "1" + "}" * 50, '{"format": NaN}'],
    ids=["100000 deep", "50 deep", "NaN"],
)
def test_deeply_nested_or_non_finite_metadata_is_one_line(files, tmp_path, fmt, text):
    path = tmp_path / files[fmt].name
    shutil.copy(files[fmt], path)
    if fmt == "onnx":
        path = _with_metadata(files["onnx"], tmp_path, text)
    elif fmt == "executorch":
        from edgeft.formats.executorch import write_pte_metadata

        write_pte_metadata(path, text)
    else:
        from edgeft.formats.torchscript import rewrite_archive

        rewrite_archive(path, metadata=text.encode())
    with pytest.raises(InputError, match="not valid JSON"):
        read_metadata(path)
    for command in (["info", str(path)], ["predict", "--model", str(path), str(path)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2 and "not valid JSON" in one_line_error(proc.stderr)


def test_predict_without_model_skips_a_newest_file_with_nested_metadata(files, tmp_path):
    import os
    import time

    exported = tmp_path / "exported"
    exported.mkdir()
    good = exported / "good.onnx"
    shutil.copy(files["onnx"], good)
    nested = _with_metadata(files["onnx"], tmp_path, "[" * 100_000 + "]" * 100_000)
    shutil.move(nested, exported / "newest.onnx")
    os.utime(good, (time.time() - 60, time.time() - 60))
    image = Path(__file__).parent.parent / "examples" / "digits" / "3.png"
    proc = run_edgeft(["predict", str(image), "--json"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "good.onnx" in proc.stderr and json.loads(proc.stdout.splitlines()[0])["top_k"]


def test_only_bytes_that_look_like_torch_save_are_called_a_checkpoint(tmp_path):
    from edgeft.artifact import artifact_format

    (tmp_path / "noise.pt").write_bytes(bytes(range(7, 200)))
    torch_save = tmp_path / "weights.pt"
    torch_save.write_bytes(b"PK\x03\x04 rest of a zip")
    (tmp_path / "legacy.pth").write_bytes(b"\x80\x02 a pickle")
    with pytest.raises(InputError) as info:
        artifact_format(tmp_path / "noise.pt")
    assert "not an exported model" in str(info.value) and "PyTorch" not in str(info.value)
    for path in (torch_save, tmp_path / "legacy.pth"):
        with pytest.raises(InputError, match="a PyTorch checkpoint or weights file"):
            artifact_format(path)


def _metadata(**change) -> str:
    values = {
        "format": "edgeft.export/2",
        "arch": "resnet18",
        "num_classes": 2,
        "classes": ["a", "b"],
        "preprocess": {"size": 8, "resize": 8, "mean": [0.5], "std": [0.25], "channels": 1},
        "precision": "fp32",
        "input": {},
        "output": {},
        "content_sha256": "0" * 64,
        "source_checkpoint": {"sha256": "1" * 64},
    }
    return json.dumps({**values, **change})


@pytest.mark.parametrize("change", [{"num_classes": True}, {"num_classes": False}, {"num_classes": 2.0}])
def test_a_bool_is_not_a_class_count(change):
    assert parse_metadata(_metadata(), "m.onnx")["num_classes"] == 2
    with pytest.raises(InputError, match="m.onnx: its edgeft metadata lacks or mistypes num_classes"):
        parse_metadata(_metadata(**change), "m.onnx")


def test_metadata_preprocessing_that_gives_no_finite_input_is_refused():
    bad = {"size": 8, "resize": 8, "mean": [1e39], "std": [0.25], "channels": 1}  # predictions were NaN
    with pytest.raises(InputError, match="m.onnx: preprocess: mean and std must fit float32"):
        parse_metadata(_metadata(preprocess=bad), "m.onnx")
