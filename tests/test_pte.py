"""ExecuTorch programs: lowered files that run like the eager model through ExecuTorch's own
runtime, at any batch size, carrying edgeft metadata that can change without changing the digest."""

from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch
from torch import nn

from edgeft.data import default_preprocess
from edgeft.errors import InputError
from edgeft.pte import (
    EXTRA_HINT,
    MAX_BATCH,
    load_pte_runner,
    pte_content_digest,
    read_pte_metadata,
    require_executorch,
    write_pte,
    write_pte_metadata,
)

needs_executorch = pytest.mark.skipif(
    importlib.util.find_spec("executorch") is None, reason="the executorch extra is not installed"
)

SPEC = default_preprocess(size=16, channels=3)


def _tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2, groups=2),
        nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()  # fmt: skip


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
    monkeypatch.setitem(sys.modules, "executorch", None)  # how Python marks a package as not importable
    with pytest.raises(InputError, match=EXTRA_HINT.replace("[", r"\[").replace("]", r"\]")):
        require_executorch()


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_fp32_runs_like_eager_at_any_batch_size(tiny):
    model, path, _ = tiny
    run, provider = load_pte_runner(path)
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
    run, _ = load_pte_runner(copy)  # ExecuTorch's runtime still loads it
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


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_fp16_keeps_float32_io(tmp_path):
    model = _tiny_cnn()
    path = tmp_path / "tiny-fp16.pte"
    write_pte(model, SPEC, path, precision="fp16")
    run, _ = load_pte_runner(path)
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    out = run(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _eager(model, x), atol=2e-2, rtol=2e-2)


@pytest.fixture(scope="module")
def digits(digits_checkpoint):
    """The digits resnet18, its preprocessing and up to 200 of its validation images."""
    from edgeft.checkpoint import load_checkpoint
    from edgeft.data import iterate_batches, load_checkpoint_data
    from edgeft.models import model_from_checkpoint
    from edgeft.preprocess import Preprocess

    checkpoint = load_checkpoint(digits_checkpoint)
    bundle = load_checkpoint_data(checkpoint)
    spec = Preprocess.from_dict(checkpoint["preprocess"])
    batches = iterate_batches(bundle.val, batch_size=100, preprocess=spec, device=torch.device("cpu"))
    x = np.concatenate([b[0].numpy() for _, b in zip(range(2), batches)])
    train = iterate_batches(bundle.train, batch_size=64, preprocess=spec, device=torch.device("cpu"), shuffle=True)
    calibration = [b[0].numpy() for _, b in zip(range(2), train)]
    return model_from_checkpoint(checkpoint).eval(), spec, x, calibration


@pytest.mark.slow  # lowers a model (seconds each)
@needs_executorch
def test_digits_resnet18_fp32_and_int8(digits, tmp_path):
    model, spec, x, calibration = digits
    expected = _eager(model, x)
    fp32 = tmp_path / "r18.pte"
    summary = write_pte(model, spec, fp32, precision="fp32")
    assert summary["outside_by_op"].keys() <= {"aten_view_copy_default"}  # every convolution in XNNPACK
    run, _ = load_pte_runner(fp32)
    for batch in (1, 8):
        np.testing.assert_allclose(run(x[:batch]), expected[:batch], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(run(x), expected, atol=1e-4, rtol=1e-4)
    int8 = tmp_path / "r18-int8.pte"
    write_pte(model, spec, int8, precision="int8", calibration=iter(calibration))  # streamed batches
    assert int8.stat().st_size < fp32.stat().st_size / 3
    run, _ = load_pte_runner(int8)
    agreement = (run(x).argmax(1) == expected.argmax(1)).mean()
    assert agreement >= 0.95, agreement
    np.testing.assert_array_equal(run(x[:1]).argmax(1), run(x[:8])[:1].argmax(1))
