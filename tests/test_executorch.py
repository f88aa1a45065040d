"""ExecuTorch programs: lowered files that run like the eager model through ExecuTorch's own
runtime, at any batch size, carrying edgeft metadata that can change without changing the digest."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeft.artifact import read_metadata
from edgeft.data import default_preprocess
from edgeft.errors import InputError
from edgeft.formats.executorch import (
    FORMAT,
    MAX_BATCH,
    load_pte_runner,
    pte_content_digest,
    read_pte_metadata,
    write_pte,
    write_pte_metadata,
)

from conftest import offline_env, one_line_error, run_edgeft, time_limit

EXTRA_HINT = 'pip install "edgeft[executorch]"'

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None, reason="the executorch extra is not installed"
)

SPEC = default_preprocess(size=16, channels=3)


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()


def _eager(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CNN and its fp32 .pte, with metadata."""
    path = tmp_path_factory.mktemp("pte") / "tiny.pte"
    model = _tiny_cnn()
    summary = write_pte(model, SPEC, path, precision="fp32")
    write_pte_metadata(path, json.dumps({"arch": "tiny", "delegation": summary}))
    return model, path, summary


def test_missing_executorch_is_an_input_error_naming_the_extra(monkeypatch):
    for name in ("executorch", "executorch.exir"):  # how Python marks a package as not importable,
        monkeypatch.setitem(sys.modules, name, None)  # also after an earlier test imported it
    assert EXTRA_HINT in FORMAT.missing(write=True)


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_fp32_runs_like_eager_at_any_batch_size(tiny):
    model, path, _ = tiny
    run, provider, _ = load_pte_runner(path)
    assert provider == "executorch:xnnpack"
    rng = np.random.default_rng(0)
    for batch in (1, 8, MAX_BATCH + 5):  # above the program's maximum: run in slices
        x = rng.standard_normal((batch, 3, 16, 16), dtype=np.float32)
        out = run(x)
        assert out.shape == (batch, 4) and out.dtype == np.float32
        np.testing.assert_allclose(out, _eager(model, x), atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_delegation_summary_counts_what_runs_outside_xnnpack(tiny):
    _, _, summary = tiny
    assert summary["backend"] == "XnnpackBackend" and summary["delegated_subgraphs"] >= 1
    assert summary["delegated_ops"] >= 4  # both convolutions, the linear layer, the activations
    assert summary["outside_ops"] == sum(summary["outside_by_op"].values())
    assert not any("convolution" in name for name in summary["outside_by_op"])


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_metadata_round_trip_keeps_the_digest(tiny, tmp_path):
    _, path, _ = tiny
    copy = tmp_path / "copy.pte"
    copy.write_bytes(path.read_bytes())
    digest = pte_content_digest(copy)
    assert json.loads(read_pte_metadata(copy))["arch"] == "tiny"
    write_pte_metadata(copy, json.dumps({"arch": "tiny", "note": "rewritten é" * 100}))
    assert json.loads(read_pte_metadata(copy))["note"].startswith("rewritten é")
    write_pte_metadata(copy, "{}")  # shorter than before: the file shrinks back
    assert read_pte_metadata(copy) == "{}"
    assert pte_content_digest(copy) == digest
    assert copy.stat().st_size == path.stat().st_size - len(read_pte_metadata(path).encode()) + 2
    run, _, _ = load_pte_runner(copy)  # ExecuTorch's runtime still loads it
    assert run(np.zeros((1, 3, 16, 16), np.float32)).shape == (1, 4)


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_digest_changes_with_the_program(tiny, tmp_path):
    _, path, _ = tiny
    changed = _tiny_cnn()
    with torch.no_grad():
        changed[-1].bias[0] += 0.3
    other = tmp_path / "other.pte"
    write_pte(changed, SPEC, other, precision="fp32")
    write_pte_metadata(other, read_pte_metadata(path))
    assert pte_content_digest(other) != pte_content_digest(path)
    flipped = tmp_path / "flipped.pte"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    assert pte_content_digest(flipped) != pte_content_digest(path)


@needs_executorch
def test_refuses_files_that_are_not_programs(tmp_path):
    fake = tmp_path / "fake.pte"
    fake.write_bytes(b"not a program at all, not even close")
    for call in (read_pte_metadata, pte_content_digest, load_pte_runner):
        with pytest.raises(InputError, match="not an ExecuTorch program"):
            call(fake)
    with pytest.raises(InputError, match="does not exist"):
        read_pte_metadata(tmp_path / "missing.pte")


@needs_executorch
def test_the_runtime_keeps_its_native_log_off_stderr(tmp_path, capfd):
    """ExecuTorch's native code writes to file descriptor 2 when its thread pool starts or is
    resized and when a program fails to load."""
    cut = tmp_path / "cut.pte"  # a program header that promises 7,568 bytes, and nothing after it
    sizes = b"".join(n.to_bytes(8, "little") for n in (0x948, 0x980, 0x1410))  # program, segment base, segments
    cut.write_bytes(b"\x3c\x00\x00\x00ET12eh00\x20\x00\x00\x00" + sizes + bytes(24))
    for threads in (1, 2):
        with pytest.raises(InputError, match="ExecuTorch cannot load it"):
            load_pte_runner(cut, threads=threads)
    assert capfd.readouterr().err == ""


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_fp16_keeps_float32_io(tmp_path):
    model = _tiny_cnn()
    path = tmp_path / "tiny-fp16.pte"
    write_pte(model, SPEC, path, precision="fp16")
    run, _, _ = load_pte_runner(path)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    out = run(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _eager(model, x), atol=2e-2, rtol=2e-2)


EXAMPLES = Path(__file__).parent.parent / "examples" / "digits"


@pytest.fixture(scope="module")
def int8_pte(digits_checkpoint, tmp_path_factory) -> Path:
    """`edgeft export --format executorch --precision int8` of the digits resnet18, as a user runs it."""
    out = tmp_path_factory.mktemp("exported")
    proc = run_edgeft(
        ["export", str(digits_checkpoint), "--format", "executorch", "--precision", "int8", "--out", str(out)],
        cwd=out,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr
    assert "outside XNNPACK" in proc.stdout and "Warning" not in proc.stderr
    return next(out.glob("*.pte"))


@pytest.mark.slow
@needs_executorch
def test_int8_export_passes_its_gate_and_describes_itself(int8_pte, digits_checkpoint):
    metadata = read_metadata(int8_pte)
    assert metadata["precision"] == "int8" and metadata["validation"]["passed"]
    assert metadata["validation"]["provider"] == "executorch:xnnpack"
    assert metadata["content_sha256"] == pte_content_digest(int8_pte)
    assert set(metadata["delegation"]["outside_by_op"]) <= {"aten_view_copy_default"}  # every convolution in XNNPACK
    assert metadata["versions"]["executorch"] and int8_pte.stat().st_size < 12 * 2**20  # int8 resnet18: ~11 MB
    info = run_edgeft(["info", str(int8_pte)], cwd=int8_pte.parent)
    assert info.returncode == 0 and "outside XNNPACK" in info.stdout and "verified" in info.stdout
    checked = run_edgeft(
        ["validate", str(int8_pte), "--reference", str(digits_checkpoint), "--json"], cwd=int8_pte.parent
    )
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["passed"] is True


@pytest.mark.slow
@needs_executorch
def test_predict_runs_a_pte_and_says_it_imports_torch(int8_pte):
    proc = run_edgeft(["predict", str(EXAMPLES / "3.png"), "--model", str(int8_pte), "--json"], cwd=int8_pte.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top_k"][0]["label"] == "3"
    assert "imports torch" in proc.stderr and "executorch:xnnpack" in proc.stderr


@pytest.mark.slow
@needs_executorch
def test_a_modified_pte_is_refused(int8_pte, tmp_path):
    tampered = tmp_path / "tampered.pte"
    data = bytearray(int8_pte.read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit of the program (weights or graph)
    tampered.write_bytes(bytes(data))
    for command in (["validate", str(tampered)], ["predict", str(EXAMPLES / "3.png"), "--model", str(tampered)]):
        proc = run_edgeft(command, cwd=tmp_path)
        assert proc.returncode == 2 and "modified after export" in one_line_error(proc.stderr)


def _without_executorch(tmp_path: Path) -> dict:
    """An environment where `executorch` resolves to an empty package, as if the extra were not installed."""
    shadow = tmp_path / "shadow"
    (shadow / "executorch").mkdir(parents=True)
    (shadow / "executorch" / "__init__.py").write_text("")
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    return offline_env(tmp_path / ".torch_home", PYTHONPATH=path)


def test_export_without_the_extra_is_one_line_naming_it(tmp_path):
    checkpoint = tmp_path / "runs" / "r18" / "best.pt"  # refused before the checkpoint is read
    proc = run_edgeft(
        ["export", str(checkpoint), "--format", "executorch", "--out", str(tmp_path)],
        cwd=tmp_path,
        env=_without_executorch(tmp_path),
    )
    assert proc.returncode == 2
    assert EXTRA_HINT in one_line_error(proc.stderr)
    assert not list(tmp_path.glob("*.pte"))


@pytest.mark.slow
def test_help_and_onnx_predict_never_import_executorch(digits_checkpoint, tmp_path):
    from edgeft.config import ExportConfig
    from edgeft.export import export

    onnx_file = export(
        ExportConfig(checkpoint=str(digits_checkpoint), format="onnx", out=str(tmp_path), validate=False)
    )
    script = (
        "import sys\n"
        "from edgeft.cli import main\n"
        "for argv in (['edgeft', '--help'], ['edgeft', 'predict', sys.argv[1], '--model', sys.argv[2], '--json']):\n"
        "    sys.argv = argv\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('executorch', 'torch', 'torchao')))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(EXAMPLES / "3.png"), onnx_file.files[0].path],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=time_limit(120),
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "[]"
