"""edgeft.formats.onnx_int8: settings that follow the CPU, the fallback ladder, streaming calibration, a
quiet quantizer, and int8 files that agree with their float source."""

from __future__ import annotations

import dataclasses
import logging
import threading
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from edgeft.errors import InputError
from edgeft.formats.onnx_int8 import (
    QuantSettings,
    batchnorms_as_depthwise_convs,
    default_settings,
    fallback_ladder,
    quantize_onnx,
)

AVX2 = {"avx2": True, "fma": True}
VNNI = {**AVX2, "avx512f": True, "avx512bw": True, "avx512_vnni": True}


class DenseBlockNet(nn.Module):
    """A stem conv, a densenet-style block (a BatchNorm after a concatenation, with no conv before
    it to fold into) and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)
        self.mix = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.cat([x, self.branch(x)], 1)
        x = self.mix(torch.relu(self.norm(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def fp32_file(tmp_path_factory):
    torch.manual_seed(0)
    model = DenseBlockNet().eval()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("fp32") / "net.onnx"
    program = torch.onnx.export(
        model,
        (torch.randn(2, 3, 16, 16),),
        input_names=["input"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        dynamo=True,
        verbose=False,
    )
    program.save(str(path), external_data=False)
    return path


def batches(count: int, size: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield rng.standard_normal((size, 3, 16, 16), dtype=np.float32)


def run(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_defaults_follow_the_cpu():
    assert default_settings(features=VNNI, machine_is_x86=True) == QuantSettings(
        activation_type="uint8", reduce_range=False
    )
    without_vnni = default_settings(features=AVX2, machine_is_x86=True)
    assert without_vnni.activation_type == "uint8" and without_vnni.weight_type == "int8" and without_vnni.reduce_range
    assert default_settings(features={}, machine_is_x86=False).activation_type == "int8"  # ARM kernels
    assert all(s.format == "qdq" and s.per_channel for s in (without_vnni, default_settings()))


def test_settings_refuse_unknown_values():
    with pytest.raises(InputError, match="calibration method"):
        QuantSettings(calibrate_method="kl")
    with pytest.raises(InputError, match="activation type"):
        QuantSettings(activation_type="int4")
    with pytest.raises(InputError, match="at least 1"):
        QuantSettings(calibration_size=0)


def test_fallback_ladder_adds_images_then_another_method_then_float_ends():
    start = QuantSettings(calibration_size=100)
    more, method, ends = fallback_ladder(start)
    assert more == dataclasses.replace(start, calibration_size=400)
    assert method == dataclasses.replace(more, calibrate_method="percentile")
    assert ends == dataclasses.replace(method, keep_float=("first_conv", "classifier"))
    assert fallback_ladder(QuantSettings(calibrate_method="percentile"))[1].calibrate_method == "minmax"
    assert len({s.label() for s in (start, more, method, ends)}) == 4  # each attempt is told apart in tables


def test_int8_file_agrees_with_its_source_and_reads_few_batches(fp32_file, tmp_path):
    read = []

    def counted():
        for batch in batches(100):
            read.append(len(batch))
            yield batch

    out = tmp_path / "int8.onnx"
    summary = quantize_onnx(fp32_file, out, calibration=counted(), settings=QuantSettings(calibration_size=10))
    assert summary.calibration_images == 10 and len(read) == 3  # streamed: stops after the batches it needs
    assert (summary.quantized, summary.left_float, summary.batchnorms_as_convs) == (5, 0, 1)  # 4 + the batch norm
    assert "5 of 5 conv/gemm/matmul nodes quantized (1 of them batch norms)" in summary.line()
    zero_points = [i for i in onnx.load(str(out)).graph.initializer if i.name.endswith("zero_point")]
    assert {onnx.TensorProto.UINT8, onnx.TensorProto.INT8} <= {
        z.data_type for z in zero_points
    }  # u8 activations, s8 weights
    x = next(batches(1, size=8, seed=1))
    reference, quantized = run(fp32_file, x), run(out, x)
    assert np.corrcoef(reference.ravel(), quantized.ravel())[0, 1] > 0.98
    assert out.stat().st_size < fp32_file.stat().st_size


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_histogram_calibration_streams_too(fp32_file, tmp_path, method):
    settings = QuantSettings(calibrate_method=method, calibration_size=8)
    summary = quantize_onnx(fp32_file, tmp_path / "int8.onnx", calibration=batches(5), settings=settings)
    assert summary.calibration_images == 8
    x = next(batches(1, seed=2))
    assert np.corrcoef(run(fp32_file, x).ravel(), run(tmp_path / "int8.onnx", x).ravel())[0, 1] > 0.95


def test_first_conv_and_classifier_can_stay_float(fp32_file, tmp_path):
    settings = QuantSettings(calibration_size=4, keep_float=("first_conv", "classifier"))
    summary = quantize_onnx(fp32_file, tmp_path / "int8.onnx", calibration=batches(1), settings=settings)
    assert (summary.quantized, summary.left_float) == (3, 2)


def test_batch_norm_after_a_concatenation_becomes_an_exact_depthwise_conv(fp32_file, tmp_path):
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = tmp_path / "prepared.onnx"
    quant_pre_process(str(fp32_file), str(prepared))
    assert batchnorms_as_depthwise_convs(prepared) == 1
    graph = onnx.load(str(prepared)).graph
    assert "BatchNormalization" not in {n.op_type for n in graph.node}
    assert not any(init.name.startswith("norm.") for init in graph.initializer)  # its statistics are gone
    x = next(batches(1, size=8, seed=3))
    np.testing.assert_allclose(run(prepared, x), run(fp32_file, x), rtol=1e-5, atol=1e-5)
    assert batchnorms_as_depthwise_convs(prepared) == 0  # nothing left to rewrite


def test_int8_graph_has_no_float_batch_norm(fp32_file, tmp_path):
    out = tmp_path / "int8.onnx"
    quantize_onnx(fp32_file, out, calibration=batches(1), settings=QuantSettings(calibration_size=4))
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")  # the graph onnxruntime runs
    ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert "BatchNormalization" not in ops and "Conv" not in ops and "QLinearConv" in ops
    quantize_onnx(
        fp32_file, out, calibration=batches(1), settings=QuantSettings(calibration_size=4, batchnorms_as_convs=False)
    )
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(out)).graph.node}  # asked for: left in float


def test_quantizer_says_one_line(fp32_file, tmp_path, capfd, caplog):
    logging.getLogger().setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO):
            quantize_onnx(
                fp32_file,
                tmp_path / "int8.onnx",
                calibration=batches(2),
                settings=QuantSettings(calibrate_method="entropy", calibration_size=8),
            )
    finally:
        logging.getLogger().setLevel(logging.WARNING)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    records = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.name for r in records] == ["edgeft.formats.onnx_int8"], [r.getMessage() for r in records]
    assert "conv/gemm/matmul nodes quantized" in records[0].getMessage()


def test_other_threads_keep_their_prints_and_warnings_while_quantizing(fp32_file, tmp_path, capsys):
    def speak():
        print("another thread")
        warnings.warn("another thread's warning", UserWarning, stacklevel=1)

    def calibration():  # another thread speaks while each batch is read, inside quantize_onnx
        for batch in batches(2):
            thread = threading.Thread(target=speak)
            thread.start()
            thread.join()
            yield batch

    with pytest.warns(UserWarning, match="another thread's warning"):
        quantize_onnx(
            fp32_file,
            tmp_path / "int8.onnx",
            calibration=calibration(),
            settings=QuantSettings(calibrate_method="entropy", calibration_size=8),
        )
    assert capsys.readouterr().out == "another thread\n" * 2  # and none of the calibrator's prints


def test_no_calibration_images_is_an_input_error(fp32_file, tmp_path):
    with pytest.raises(InputError, match="calibration"):
        quantize_onnx(fp32_file, tmp_path / "int8.onnx", calibration=iter(()), settings=QuantSettings())
