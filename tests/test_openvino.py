"""OpenVINO IR: an .xml + .bin pair that OpenVINO's own API opens as is, whose precision means what
it says (f32 weights, the inference precision pinned by edgeft's runner, bf16 only where native),
carrying edgeft's metadata in its rt_info, refused when either file changes; int8 through NNCF."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeft import formats
from edgeft.artifact import content_digest, read_metadata
from edgeft.config import ExportConfig
from edgeft.cpu import has_bf16
from edgeft.data import default_preprocess
from edgeft.errors import InputError
from edgeft.formats import WriteRequest
from edgeft.formats.openvino import FORMAT

from conftest import env_without_modules, export_through_cli, one_line_error, run_edgeft

pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="the openvino extra is absent")

SPEC = default_preprocess(size=16, channels=3)
EXAMPLES = Path(__file__).parent.parent / "examples" / "digits"


def _tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 5),
    ).eval()


def _write(folder: Path, precision: str, model: nn.Module) -> Path:
    path = folder / f"tiny-{precision}.xml"
    config = ExportConfig(checkpoint="", format="openvino", precision=precision)
    FORMAT.write(WriteRequest(model, SPEC, precision, "cpu", config, folder), path)
    FORMAT.write_metadata(path, json.dumps({"arch": "tiny", "precision": precision}))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CNN, its fp32 IR, and a batch of inputs with the eager logits."""
    model = _tiny_cnn()
    path = _write(tmp_path_factory.mktemp("ov"), "fp32", model)
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16), dtype=np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    return model, path, x, reference


def _copy(path: Path, folder: Path) -> Path:
    for source in FORMAT.files(path):
        shutil.copy(source, folder / source.name)
    return folder / path.name


def test_fp32_stores_f32_weights_runs_in_f32_and_openvino_reads_it_as_is(tiny):
    import openvino as ov

    _, path, x, reference = tiny
    model = ov.Core().read_model(path)  # OpenVINO's own reader, on the file as written
    assert model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str) == "f32"
    constants = {
        op.get_output_element_type(0).get_type_name() for op in model.get_ops() if op.get_type_name() == "Constant"
    }
    assert "f16" not in constants and "f32" in constants
    runner = FORMAT.open(path, threads=1)
    assert runner.provider == "openvino:CPU (f32)" and runner.input_shape == (3, 16, 16) and runner.output_shape == (5,)
    for batch in (1, 5):
        np.testing.assert_allclose(runner.infer(x[:batch]), reference[:batch], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not has_bf16(), reason="this CPU has no native bf16")
def test_bf16_is_pinned_and_differs_from_f32_within_bf16_precision(tiny, tmp_path):
    model, _, x, reference = tiny
    runner = FORMAT.open(_write(tmp_path, "bf16", model))
    assert runner.provider == "openvino:CPU (bf16)"
    difference = np.abs(runner.infer(x) - reference)
    assert 0 < difference.max() <= 0.05 * max(1.0, np.abs(reference).max())  # bf16 keeps 8 bits of mantissa


def test_bf16_without_native_support_is_refused_in_one_line(monkeypatch):
    import edgeft.cpu

    monkeypatch.setattr(edgeft.cpu, "has_bf16", lambda: False)
    reason = FORMAT.unavailable("bf16", "cpu")
    assert reason and "native bf16" in reason and "\n" not in reason
    assert FORMAT.unavailable("fp32", "cpu") is None


def test_metadata_is_the_rt_info_entry_openvino_reads_and_keeps_the_digest(tiny, tmp_path):
    import openvino as ov

    path = _copy(tiny[1], tmp_path)
    before = content_digest(path)
    text = json.dumps({"note": 'quotes " & <tags>\nnew line\ttab ✓'}, ensure_ascii=False)
    FORMAT.write_metadata(path, text)
    assert FORMAT.read(path) == (text, before)
    assert ov.Core().read_model(path).get_rt_info("edgeft").astype(str) == text


def test_a_missing_or_foreign_bin_is_one_line(tiny, tmp_path):
    path = tiny[1]
    other = _write(tmp_path, "fp32", nn.Sequential(*list(_tiny_cnn())[:-1], nn.Linear(16, 5)))  # other weights
    (tmp_path / "copy").mkdir()
    copied = _copy(path, tmp_path / "copy")
    digest = FORMAT.read(copied)[1]
    shutil.copy(other.with_suffix(".bin"), copied.with_suffix(".bin"))
    assert FORMAT.read(copied)[1] != digest
    copied.with_suffix(".bin").unlink()
    with pytest.raises(InputError, match=r"its weights file tiny-fp32\.bin is missing"):
        FORMAT.read(copied)


def test_the_bin_given_for_the_xml_is_one_line_naming_the_xml(tiny):
    with pytest.raises(InputError, match=r"part of the OpenVINO file .*tiny-fp32\.xml; give that one"):
        formats.for_path(tiny[1].with_suffix(".bin"))


@pytest.mark.parametrize(
    "text",
    ["<html><body>hello</body></html>", "", "\x00\x01 not xml"],
    ids=["html", "empty", "binary"],
)
def test_an_xml_that_is_not_an_ir_is_one_line(tmp_path, text):
    path = tmp_path / "page.xml"
    path.write_text(text)
    with pytest.raises(InputError, match="not an OpenVINO IR"):
        FORMAT.read(path)


def test_a_second_edgeft_entry_is_refused(tiny, tmp_path):
    path = _copy(tiny[1], tmp_path)
    xml = path.read_text()
    path.write_text(xml.replace("<rt_info>", '<rt_info>\n\t\t<edgeft value="{}" />', 1))
    with pytest.raises(InputError, match="more than one edgeft entry"):
        FORMAT.read(path)


def test_without_the_extra_export_is_one_line_naming_it(tmp_path):
    checkpoint = tmp_path / "runs" / "r18" / "best.pt"  # refused before the checkpoint is read
    env = env_without_modules(tmp_path, "openvino", "nncf")
    proc = run_edgeft(["export", str(checkpoint), "--format", "openvino"], cwd=tmp_path, env=env)
    assert proc.returncode == 2 and 'pip install "edgeft[openvino]"' in one_line_error(proc.stderr)
    proc = run_edgeft(["export", str(checkpoint), "--format", "openvino", "--device", "cuda"], cwd=tmp_path)
    assert proc.returncode == 2 and "OpenVINO runs on the CPU" in one_line_error(proc.stderr)


# --- end to end, through the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_ir(digits_checkpoint, tmp_path_factory) -> tuple:
    return export_through_cli(digits_checkpoint, tmp_path_factory.mktemp("ov-int8"), "openvino", "int8")


@pytest.mark.slow
def test_int8_passes_its_gate_through_nncf_and_describes_itself(int8_ir, digits_checkpoint):
    import openvino as ov

    path, proc = int8_ir
    assert proc.returncode == 0, proc.stderr
    assert "int8 attempts" in proc.stdout and "performance" in proc.stdout
    metadata = read_metadata(path)
    assert metadata["validation"]["passed"] and metadata["quantization"]["preset"] == "performance"
    assert metadata["openvino"]["inference_precision"] == "f32" and metadata["versions"]["nncf"]
    kinds = {op.get_type_name() for op in ov.Core().read_model(path).get_ops()}
    assert "FakeQuantize" in kinds
    fp32_size = sum(p.numel() for p in torch.load(digits_checkpoint, weights_only=False)["state_dict"].values()) * 4
    assert path.with_suffix(".bin").stat().st_size < 0.35 * fp32_size


@pytest.mark.slow
def test_predict_with_torch_unimportable_agrees_with_onnx_and_validate_passes(int8_ir, digits_checkpoint, tmp_path):
    from edgeft.export import export

    path, _ = int8_ir
    onnx_file = export(ExportConfig(checkpoint=str(digits_checkpoint), out=str(tmp_path), validate=False)).files[0].path
    images = sorted(str(p) for p in EXAMPLES.glob("*.png"))
    without_torch = env_without_modules(tmp_path, "torch")
    answers = {}
    for model, env in ((path, without_torch), (onnx_file, None)):
        proc = run_edgeft(["predict", *images, "--model", str(model), "--json"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        answers[str(model)] = [json.loads(line)["top_k"][0]["label"] for line in proc.stdout.splitlines()]
    ir, onnx = answers.values()
    assert len(ir) == len(images) and sum(a == b for a, b in zip(ir, onnx)) >= len(images) - 1  # int8 vs fp32
    validated = run_edgeft(["validate", str(path), "--reference", str(digits_checkpoint), "--json"], cwd=path.parent)
    assert validated.returncode == 0 and json.loads(validated.stdout)["passed"] is True


@pytest.mark.slow
def test_a_gate_that_fails_climbs_the_ladder_and_keeps_nothing(digits_checkpoint, tmp_path):
    args = ["export", str(digits_checkpoint), "--format", "openvino", "--precision", "int8", "--out", str(tmp_path)]
    proc = run_edgeft([*args, "--max-acc-drop", "-100"], cwd=tmp_path)
    assert proc.returncode == 1 and "performance" in proc.stdout and "mixed" in proc.stdout
    assert not list(tmp_path.glob("*.xml")) and not list(tmp_path.glob("*.bin"))
    proc = run_edgeft([*args, "--max-acc-drop", "-100", "--no-fallback"], cwd=tmp_path)
    assert proc.returncode == 1 and "mixed" not in proc.stdout


def test_bench_counts_the_weights_beside_the_graph_in_the_file_size(tmp_path):
    from edgeft.bench import run_bench
    from edgeft.config import BenchConfig

    config = BenchConfig(
        models=("resnet18",),
        runtimes=("onnxruntime", "openvino"),
        precisions=("fp32",),
        batch_sizes=(1,),
        img_size=32,
        device="cpu",
        quick=True,
        out=str(tmp_path),
        cache=False,
    )
    rows = {r.runtime: r for r in run_bench(config).rows}
    assert rows["openvino"].status == "ok", rows["openvino"].status
    assert rows["openvino"].file_mb == pytest.approx(rows["onnxruntime"].file_mb, rel=0.1)  # the same f32 weights
