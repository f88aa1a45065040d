"""LiteRT (.tflite): one flatbuffer that the stock `ai_edge_litert` interpreter loads as is, carrying
edgeft's metadata in its metadata table, refused when a byte of the model changes; fp32 pinned to
torch, fp16 weights, int8 with litert-torch's PT2E quantizer and int8 I/O the runner handles."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from edgeft.artifact import read_metadata
from edgeft.config import ExportConfig
from edgeft.data import default_preprocess
from edgeft.errors import InputError
from edgeft.formats import WriteRequest
from edgeft.formats.litert import FORMAT

from conftest import env_without_modules, export_through_cli, one_line_error, run_edgeft

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("litert_torch") is None, reason="the litert-export extra is absent"
)

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


def _calibration(count: int):
    rng = np.random.default_rng(0)
    return (rng.standard_normal((4, 3, 16, 16), dtype=np.float32) for _ in range(0, count, 4))


def _write(folder: Path, precision: str, model: nn.Module, rung: int = 0) -> Path:
    path = folder / f"tiny-{precision}-{rung}.tflite"
    config = ExportConfig(checkpoint="", format="litert", precision=precision, calib_size=32)
    chosen = FORMAT.int8_rungs(config)[rung] if precision == "int8" else None
    FORMAT.write(WriteRequest(model, SPEC, precision, "cpu", config, folder, chosen, _calibration), path)
    FORMAT.write_metadata(path, json.dumps({"arch": "tiny", "precision": precision}))
    return path


def _stock(path: Path):
    """The stock interpreter on the file as is, tensors allocated."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=str(path), num_threads=1)
    interpreter.allocate_tensors()
    return interpreter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny CNN, its fp32 .tflite, and a batch of inputs with the eager logits."""
    model = _tiny_cnn()
    path = _write(tmp_path_factory.mktemp("litert"), "fp32", model)
    x = np.random.default_rng(1).standard_normal((5, 3, 16, 16), dtype=np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    return model, path, x, reference


def test_fp32_agrees_with_torch_and_the_stock_interpreter_runs_the_file_as_is(tiny):
    _, path, x, reference = tiny
    runner = FORMAT.open(path, threads=1)
    assert runner.provider == "litert:xnnpack" and runner.input_shape == (3, 16, 16) and runner.output_shape == (5,)
    for batch in (1, 5):
        np.testing.assert_allclose(runner.infer(x[:batch]), reference[:batch], rtol=1e-4, atol=1e-5)
    interpreter = _stock(path)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    assert source["dtype"] == np.float32 and list(source["shape"]) == [1, 3, 16, 16]
    interpreter.set_tensor(source["index"], x[:1])
    interpreter.invoke()
    np.testing.assert_allclose(interpreter.get_tensor(target["index"]), reference[:1], rtol=1e-4, atol=1e-5)


def test_fp16_stores_fp16_weights_behind_float_io(tiny, tmp_path):
    model, _, x, reference = tiny
    path = _write(tmp_path, "fp16", model)
    interpreter = _stock(path)
    kinds = {np.dtype(t["dtype"]).name for t in interpreter.get_tensor_details()}
    assert "float16" in kinds and interpreter.get_input_details()[0]["dtype"] == np.float32
    difference = np.abs(FORMAT.open(path).infer(x) - reference)
    assert 0 < difference.max() <= 1e-2 * max(1.0, np.abs(reference).max())  # fp16 weights: not bit-exact


def test_int8_takes_int8_in_the_runner_quantizes_and_the_dynamic_rung_keeps_float_io(tiny, tmp_path):
    model, _, x, reference = tiny
    for rung, io in ((0, np.int8), (1, np.float32)):
        path = _write(tmp_path, "int8", model, rung)
        interpreter = _stock(path)
        assert interpreter.get_input_details()[0]["dtype"] == io
        assert interpreter.get_output_details()[0]["dtype"] == io
        weights = [t for t in interpreter.get_tensor_details() if len(t["shape"]) == 4 and t["shape"][0] == 16]
        assert weights and all(np.dtype(t["dtype"]) == np.int8 for t in weights)  # int8 convolution weights
        logits = FORMAT.open(path).infer(x)
        assert logits.dtype == np.float32
        assert np.abs(logits - reference).max() <= 0.1 * np.abs(reference).max()  # int8 of a random model


class _GroupedBlock(nn.Module):
    """A ResNeXt-like residual block: a grouped 3x3 convolution of 4 channels per group, an addition."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))

    def forward(self, x):
        x = self.stem(x)
        return self.head(torch.relu(self.grouped(x) + x))


def test_int8_widens_grouped_convolutions_exactly_and_keeps_additions_int8(tmp_path, monkeypatch):
    import edgeft.formats.litert as litert

    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    wide = _write(tmp_path, "int8", _GroupedBlock().eval())
    (tmp_path / "narrow").mkdir()
    monkeypatch.setattr(litert, "GROUP_WIDTH", 0)  # the groups as they were
    narrow = _write(tmp_path / "narrow", "int8", _GroupedBlock().eval())
    filters = {}
    for name, path in (("wide", wide), ("narrow", narrow)):
        interpreter = _stock(path)
        ops = [op["op_name"] for op in interpreter._get_ops_details()]
        assert "ADD" in ops and "DEQUANTIZE" not in ops and "QUANTIZE" not in ops  # the addition runs in int8
        shapes = [tuple(t["shape"]) for t in interpreter.get_tensor_details() if len(t["shape"]) == 4]
        filters[name] = sorted(s for s in shapes if s[0] == 16 and s[1:3] == (3, 3))  # [out, kh, kw, in/group]
    assert filters == {"wide": [(16, 3, 3, 3), (16, 3, 3, 16)], "narrow": [(16, 3, 3, 3), (16, 3, 3, 4)]}
    np.testing.assert_array_equal(FORMAT.open(wide).infer(x), FORMAT.open(narrow).infer(x))  # the same function


class _DenseBlock(nn.Module):
    """DenseNet's shape in small: a padded max pool after a ReLU, layers (batch norm, ReLU, convolution)
    each reading the concatenation of every earlier map (up to 6 inputs), a 2x2 average pool, and a
    concatenation of all 7 maps in reverse (no earlier one to build on)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2, padding=1))
        widths = [8 + 4 * i for i in range(6)]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(w), nn.ReLU(), nn.Conv2d(w, 4, 3, padding=1)) for w in widths
        )
        for norm in (layer[0] for layer in self.layers):  # a trained network's statistics, not the identity
            norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.bias.data.uniform_(-1, 1)
        self.pool = nn.AvgPool2d(2, 2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.head(self.pool(torch.cat(features[::-1], 1)))


def _graph(path: Path) -> tuple[list[str], list[int]]:
    """The stock interpreter's operator names on the file, and each concatenation's input count."""
    ops = _stock(path)._get_ops_details()
    return [op["op_name"] for op in ops], [len(op["inputs"]) for op in ops if op["op_name"] == "CONCATENATION"]


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_xnnpack_takes_the_whole_graph_of_a_dense_block_and_computes_the_same(tmp_path, monkeypatch, precision):
    import edgeft.formats.litert as litert

    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16), dtype=np.float32)
    rewritten = _write(tmp_path, precision, _DenseBlock().eval())
    (tmp_path / "as-converted").mkdir()
    monkeypatch.setattr(litert, "delegable", lambda flatbuffer: (flatbuffer, {}))
    converted = _write(tmp_path / "as-converted", precision, _DenseBlock().eval())
    ops, inputs = _graph(converted)
    assert ops.count("DELEGATE") > 1 and max(inputs) > 5 and "PADV2" in ops  # as litert-torch writes it
    ops, inputs = _graph(rewritten)
    assert ops.count("DELEGATE") == 1 and max(inputs) <= 5 and "PADV2" not in ops
    ours, theirs = FORMAT.open(rewritten).infer(x), FORMAT.open(converted).infer(x)
    if precision == "fp32":
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    else:  # the average as a convolution may round an exact half the other way
        scale = _stock(rewritten).get_output_details()[0]["quantization"][0]
        assert np.abs(ours - theirs).max() <= 2 * scale


def test_a_padded_max_pool_over_negative_values_keeps_its_lowest_value_padding(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.MaxPool2d(3, 2, padding=1), nn.Flatten(), nn.Linear(4 * 7 * 7, 5))
    path = _write(tmp_path, "fp32", model.eval())
    x = np.random.default_rng(1).standard_normal((2, 3, 16, 16), dtype=np.float32)
    with torch.inference_mode():
        reference = model(torch.from_numpy(x)).numpy()
    assert "PADV2" in _graph(path)[0]  # padding with zero would raise windows of negative values
    np.testing.assert_allclose(FORMAT.open(path).infer(x), reference, rtol=1e-4, atol=1e-5)


def test_metadata_is_the_last_entry_of_the_metadata_table_and_keeps_the_digest(tiny, tmp_path):
    from ai_edge_litert import schema_py_generated as schema

    path = tmp_path / "copy.tflite"
    shutil.copy(tiny[1], path)
    _, before = FORMAT.read(path)
    for text in (json.dumps({"note": 'quotes " & <tags>\nnew line ✓' * 50}, ensure_ascii=False), "{}"):
        FORMAT.write_metadata(path, text)
        assert FORMAT.read(path) == (text, before)
        data = path.read_bytes()
        model = schema.Model.GetRootAs(data, 0)
        entries = {model.Metadata(i).Name(): model.Metadata(i).Buffer() for i in range(model.MetadataLength())}
        assert b"min_runtime_version" in entries  # the converter's own entries are kept
        assert bytes(model.Buffers(entries[b"edgeft"]).DataAsNumpy()).decode() == text
        assert data.endswith(text.encode())
        _stock(path).invoke()


def test_a_changed_weight_or_trailing_bytes_or_another_file_are_refused(tiny, tmp_path):
    path = tmp_path / "copy.tflite"
    data = bytearray(tiny[1].read_bytes())
    _, digest = FORMAT.read(tiny[1])
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert FORMAT.read(path)[1] != digest
    path.write_bytes(tiny[1].read_bytes() + b"\x00" * 8)
    with pytest.raises(InputError, match="not at the end of the file"):
        FORMAT.read(path)
    for content in (b"", b"\x00" * 64, b"PK\x03\x04 not a model", tiny[1].read_bytes()[: len(data) // 3]):
        path.write_bytes(content)
        with pytest.raises(InputError, match="LiteRT"):
            FORMAT.read(path)


def test_a_tflite_not_written_by_edgeft_is_one_line(tmp_path):
    import litert_torch

    path = tmp_path / "plain.tflite"
    litert_torch.convert(_tiny_cnn(), (torch.zeros(1, 3, 16, 16),)).export(str(path))
    with pytest.raises(InputError, match="no edgeft metadata entry"):
        FORMAT.read(path)
    proc = run_edgeft(["info", str(path)], cwd=tmp_path)
    assert proc.returncode == 2 and "not exported by edgeft" in one_line_error(proc.stderr)


def test_without_the_extras_export_and_predict_are_one_line_naming_them(tiny, tmp_path):
    checkpoint = tmp_path / "runs" / "r18" / "best.pt"  # refused before the checkpoint is read
    without_converter = env_without_modules(tmp_path, "litert_torch")
    proc = run_edgeft(["export", str(checkpoint), "--format", "litert"], cwd=tmp_path, env=without_converter)
    assert proc.returncode == 2 and 'pip install "edgeft[litert-export]"' in one_line_error(proc.stderr)
    without_runtime = env_without_modules(tmp_path, "ai_edge_litert")
    proc = run_edgeft(["predict", "--model", str(tiny[1]), str(EXAMPLES)], cwd=tmp_path, env=without_runtime)
    assert proc.returncode == 2 and 'pip install "edgeft[litert]"' in one_line_error(proc.stderr)
    proc = run_edgeft(["export", str(checkpoint), "--format", "litert", "--device", "cuda"], cwd=tmp_path)
    assert proc.returncode == 2 and "LiteRT runs on the CPU" in one_line_error(proc.stderr)


# --- end to end, through the CLI ------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_file(digits_checkpoint, tmp_path_factory) -> tuple:
    return export_through_cli(digits_checkpoint, tmp_path_factory.mktemp("litert-int8"), "litert", "int8")


@pytest.mark.slow
def test_int8_passes_its_gate_and_describes_itself(int8_file, digits_checkpoint):
    path, proc = int8_file
    assert proc.returncode == 0, proc.stderr
    assert "int8 attempts" in proc.stdout and "per-channel" in proc.stdout
    metadata = read_metadata(path)
    assert metadata["validation"]["passed"] and metadata["quantization"]["label"] == "pt2e per-channel"
    assert metadata["litert"]["io"] == {"input": "int8", "output": "int8"} and metadata["versions"]["litert_torch"]
    assert metadata["litert"]["xnnpack"] == {"rewritten": {"max_pool_paddings": 1}, "partitions": 1}  # resnet18's stem
    fp32_size = sum(p.numel() for p in torch.load(digits_checkpoint, weights_only=False)["state_dict"].values()) * 4
    assert path.stat().st_size < 0.35 * fp32_size


@pytest.mark.slow
def test_predict_without_torch_agrees_with_onnx_and_the_stock_interpreter(int8_file, digits_checkpoint, tmp_path):
    from edgeft.export import export

    path, _ = int8_file
    onnx_file = export(ExportConfig(checkpoint=str(digits_checkpoint), out=str(tmp_path), validate=False)).files[0].path
    images = sorted(str(p) for p in EXAMPLES.glob("*.png"))
    answers = {}
    for model, env in ((path, env_without_modules(tmp_path, "torch")), (onnx_file, None)):
        proc = run_edgeft(["predict", *images, "--model", str(model), "--json"], cwd=tmp_path, env=env)
        assert proc.returncode == 0, proc.stderr
        answers[str(model)] = [json.loads(line)["top_k"][0]["label"] for line in proc.stdout.splitlines()]
    litert, onnx = answers.values()
    assert len(litert) == len(images) and sum(a == b for a, b in zip(litert, onnx)) >= len(images) - 1  # int8 vs fp32
    assert _stock_top1(path, images) == litert
    validated = run_edgeft(["validate", str(path), "--reference", str(digits_checkpoint), "--json"], cwd=path.parent)
    assert validated.returncode == 0 and json.loads(validated.stdout)["passed"] is True


def _stock_top1(path: Path, images: list[str]) -> list[str]:
    """Each image's top-1 class from the stock interpreter fed as a device app feeds an int8 file:
    the file's preprocessing, quantized with the input tensor's scale and zero point."""
    from edgeft.preprocess import Preprocess, preprocess_image

    metadata = read_metadata(path)
    spec, interpreter = Preprocess.from_dict(metadata["preprocess"]), _stock(path)
    (source,), (target,) = interpreter.get_input_details(), interpreter.get_output_details()
    scale, zero = source["quantization"]
    labels = []
    for image in images:
        x = preprocess_image(image, spec)[None]
        interpreter.set_tensor(source["index"], np.clip(np.round(x / scale) + zero, -128, 127).astype(np.int8))
        interpreter.invoke()
        labels.append(metadata["classes"][int(np.argmax(interpreter.get_tensor(target["index"])))])
    return labels


@pytest.mark.slow
def test_a_gate_that_fails_climbs_the_ladder_and_keeps_nothing(digits_checkpoint, tmp_path):
    args = ["export", str(digits_checkpoint), "--format", "litert", "--precision", "int8", "--out", str(tmp_path)]
    proc = run_edgeft([*args, "--max-acc-drop", "-100"], cwd=tmp_path)
    assert proc.returncode == 1 and "per-channel" in proc.stdout and "dynamic" in proc.stdout  # (table cells wrap)
    assert not list(tmp_path.glob("*.tflite"))
    proc = run_edgeft([*args, "--max-acc-drop", "-100", "--no-fallback"], cwd=tmp_path)
    assert proc.returncode == 1 and "dynamic" not in proc.stdout
