"""OpenVINO IR (.xml + .bin), run by OpenVINO's CPU plugin: fp32, bf16 (where the CPU computes it
natively) and int8 (NNCF post-training quantization), with the inference precision pinned.

Layout: OpenVINO's own, `<stem>.xml` (the graph) with `<stem>.bin` (the weights) beside it, as
`openvino.Core().read_model("<stem>.xml")` and `benchmark_app -m <stem>.xml` take it. `--out` is the
folder, `--name` the stem; `predict --model` and `validate` take the `.xml`.

Precision: OpenVINO's CPU plugin runs f32 models in bf16 by default on CPUs with native bf16
(`INFERENCE_PRECISION_HINT`), and `save_model` stores weights as fp16 unless told otherwise. edgeft
stores f32 weights and records the inference precision the file was gated with in its `rt_info`
(`runtime_options/INFERENCE_PRECISION_HINT`: f32 for fp32 and int8, bf16 for bf16); edgeft's
runner always passes it to `compile_model`. OpenVINO 2026.4 does not apply that entry by itself:
with its own tools pass it (`benchmark_app -infer_precision f32`, or the compile option).

The edgeft metadata is the top-level `rt_info` entry `edgeft` (`model.get_rt_info("edgeft")`).
The content digest is the sha256 of the `.xml` without that entry, then of the `.bin`: a changed
graph or weights file, or a `.bin` of another export, is refused.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import InputError
from edgeft.formats.base import Format, Gemm, GemmShapes, Rung, Runner, WriteRequest, quiet_native_output

__all__ = ["FORMAT", "NncfRung", "OpenVinoFormat"]

log = logging.getLogger(__name__)

METADATA_KEY = "edgeft"
_HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # int8: what is not quantized runs in f32
_METADATA = re.compile(rb'[ \t]*<edgeft value="[^"<]*" />\r?\n?')
_MAX_XML = 256 * 2**20


@dataclass(frozen=True)
class NncfRung(Rung):
    """One NNCF post-training quantization setting (`nncf.quantize`)."""

    preset: str = "performance"  # performance: symmetric activations; mixed: asymmetric
    fast_bias_correction: bool = True

    def label(self) -> str:
        return f"nncf {self.preset}" + ("" if self.fast_bias_correction else " + bias")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "preset": self.preset, "fast_bias_correction": self.fast_bias_correction}


class OpenVinoFormat(Format):
    name, title, suffixes, runtime = "openvino", "OpenVINO", (".xml",), "openvino"
    precisions = ("fp32", "bf16", "int8")
    options = frozenset({"fallback"})
    extra, needs, needs_to_write = "openvino", ("openvino",), ("nncf",)
    gemm_precisions = ("fp32", "bf16", "int8")
    torch_free, rank = True, 30

    def unavailable(self, precision: str, device: str, *, write: bool = True) -> str | None:
        from edgeft.cpu import has_bf16

        if device.startswith("cuda"):
            return "OpenVINO runs on the CPU here; use --device cpu (an Intel GPU or NPU: see the README)"
        if precision == "bf16" and precision in self.precisions and not has_bf16():
            return "this CPU has no native bf16 (AVX-512 BF16 or AMX); use fp32 or int8"
        return super().unavailable(precision, device, write=write)

    def int8_rungs(self, config) -> list:
        first = NncfRung(calibration_size=config.calib_size)
        if config.fallback is False:
            return [first]
        return [first, NncfRung(calibration_size=config.calib_size, preset="mixed", fast_bias_correction=False)]

    def details(self) -> dict:
        import openvino as ov

        return {"devices": ov.Core().available_devices}

    def gemms(self, precision: str, shapes: GemmShapes, threads: int) -> list[Gemm]:
        """MatMul and Convolution, pinned to `precision` as edgeft's files are; int8 as NNCF writes
        it: FakeQuantize on the (unsigned, as after a ReLU) activations, int8 weights converted and
        scaled per output channel."""
        from edgeft.cpu import has_bf16

        if precision == "bf16" and not has_bf16():
            return []
        n, label = shapes.n, "u8 x s8" if precision == "int8" else _HINTS[precision]
        products = [_product(f"MatMul {label}", (n, n), (n, n), precision, shapes.matmul_operations(), threads)]
        for batch, channels, side in shapes.convolutions:
            name, operations = shapes.conv_label(batch, channels, side), shapes.conv_operations(batch, channels, side)
            shape = (batch, channels, side, side)
            products.append(
                _product(f"{name} {label}", shape, (channels, channels, 3, 3), precision, operations, threads)
            )
        return products

    def files(self, path: Path) -> list[Path]:
        return [path.with_suffix(".bin"), path]  # the graph last: it names the artifact

    def write(self, request: WriteRequest, path: Path) -> dict:
        import openvino as ov

        with quiet_native_output():
            model = _convert(request)
            quantization = None
            if request.precision == "int8":
                model, quantization = _quantize(model, request)
            model.set_rt_info("", METADATA_KEY)
            model.set_rt_info(_HINTS[request.precision], ["runtime_options", "INFERENCE_PRECISION_HINT"])
            ov.save_model(model, str(path), compress_to_fp16=False)
        extra = {"openvino": {"inference_precision": _HINTS[request.precision], "weights": "f32"}}
        return {**extra, "quantization": quantization} if quantization else extra

    def read(self, path: Path) -> tuple[str | None, str]:
        graph, text = _split(path)
        weights = path.with_suffix(".bin")
        if not weights.is_file():
            raise InputError(
                f"{path}: its weights file {weights.name} is missing (an OpenVINO IR is a .xml and its .bin)"
            )
        digest = hashlib.sha256(len(graph).to_bytes(8, "little") + graph)
        with weights.open("rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return text, digest.hexdigest()

    def write_metadata(self, path: Path, text: str) -> None:
        xml = path.read_bytes()
        entry = f"<edgeft value={_quote(text)} />".encode()
        matches = list(_METADATA.finditer(xml))
        if len(matches) != 1:
            raise InputError(f"{path}: not an OpenVINO IR written by edgeft (no single edgeft entry in its rt_info)")
        start, end = matches[0].span()
        indent = matches[0].group(0)[: matches[0].group(0).index(b"<")]
        path.write_bytes(xml[:start] + indent + entry + b"\n" + xml[end:])

    def open(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runner:
        reason = self.unavailable("fp32", device, write=False)
        if reason:
            raise InputError(f"{path}: {reason}")
        _split(path)  # an OpenVINO IR, or a one-line error
        return _runner(path, threads)


FORMAT = OpenVinoFormat()


def _convert(request: WriteRequest):
    """The float32 model as an OpenVINO model with a dynamic batch (float32 NCHW in, logits out)."""
    import openvino as ov
    import torch

    spec = request.spec
    example = torch.zeros(1, spec.channels, spec.size, spec.size)
    log.info("converting to OpenVINO IR")
    with torch.no_grad():
        return ov.convert_model(request.model.float().eval(), example_input=example, input=[(-1, *example.shape[1:])])


def _quantize(model, request: WriteRequest):
    """NNCF post-training quantization of `model` with the rung's setting, on the calibration images
    one at a time (NNCF's statistics and bias correction expect batch 1), streamed on every pass."""
    import nncf

    rung = request.rung
    images = _Images(request.calibration, rung.calibration_size)
    log.info("int8: NNCF %s on up to %d calibration images", rung.label(), rung.calibration_size)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(images),
        preset=nncf.QuantizationPreset(rung.preset),
        subset_size=rung.calibration_size,
        fast_bias_correction=rung.fast_bias_correction,
    )
    if not images.seen:
        raise InputError("int8 OpenVINO export: the calibration data is empty")
    return quantized, {**rung.to_dict(), "calibration_images": images.seen}


class _Images:
    """The calibration images as NNCF iterates them: one (1, C, H, W) array at a time, read again
    on each pass, never all in memory."""

    def __init__(self, calibration, count: int):
        self.calibration, self.count, self.seen = calibration, count, 0

    def __iter__(self):
        seen = 0
        for batch in self.calibration(self.count):
            for image in batch:
                seen += 1
                self.seen = max(self.seen, seen)  # NNCF may stop a pass early, so count as it reads
                yield image[None]


def _split(path: Path) -> tuple[bytes, str | None]:
    """(the .xml without the edgeft entry, the metadata text or None) of an OpenVINO IR."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    if path.stat().st_size > _MAX_XML:
        raise InputError(f"{path}: larger than {_MAX_XML // 2**20} MiB, not an OpenVINO IR graph")
    xml = path.read_bytes()
    if not re.match(rb"\s*(<\?xml[^>]*\?>\s*)?<net\s", xml):
        raise InputError(f"{path}: not an OpenVINO IR (.xml with a <net> graph)")
    matches = list(_METADATA.finditer(xml))
    if len(matches) > 1:
        raise InputError(f"{path}: more than one edgeft entry in its rt_info; the file was changed")
    if not matches:
        return xml, None
    start, end = matches[0].span()
    try:
        text = ET.fromstring(matches[0].group(0)).get("value", "")
    except ET.ParseError:
        raise InputError(f"{path}: its edgeft metadata is not well-formed XML") from None
    return xml[:start] + xml[end:], text or None


def _quote(text: str) -> str:
    """An XML attribute value that keeps every character, line breaks included."""
    escaped = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
    return '"' + escaped.replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;") + '"'


def _runner(path: Path, threads: int | None) -> Runner:
    """The IR compiled for OpenVINO's CPU plugin at its recorded inference precision, for latency."""
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(path)
    except RuntimeError as exc:
        raise InputError(f"{path}: OpenVINO cannot read it ({str(exc).strip().splitlines()[0]})") from None
    hint = _recorded_hint(model)
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    shape, classes = list(model.inputs[0].partial_shape), list(model.outputs[0].partial_shape)

    def infer(x: np.ndarray) -> np.ndarray:
        request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return request.get_output_tensor(0).data.copy()

    return Runner(
        infer,
        f"openvino:CPU ({hint})",
        input_shape=_static(shape[1:]),
        output_shape=_static(classes[1:]),
    )


def _product(label: str, shape: tuple, weight_shape: tuple, precision: str, operations: int, threads: int) -> Gemm:
    """A MatMul (2-D `shape`) or a padded 3x3 Convolution of a parameter and constant weights,
    compiled for the CPU plugin at `precision` with `threads` threads."""
    import openvino as ov
    from openvino import opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter(list(shape), np.float32)
    if precision == "int8":
        low, high = ops.constant(np.float32(0)), ops.constant(np.float32(8))
        weights = ops.convert(ops.constant(rng.integers(-127, 128, weight_shape, dtype=np.int8)), np.float32)
        scales = np.full((weight_shape[0],) + (1,) * (len(weight_shape) - 1), 0.02, dtype=np.float32)
        weights, inputs = ops.multiply(weights, ops.constant(scales)), ops.fake_quantize(x, low, high, low, high, 256)
    else:
        weights, inputs = ops.constant(rng.standard_normal(weight_shape, dtype=np.float32)), x
    if len(shape) == 2:
        product = ops.matmul(inputs, weights, False, True)  # weights (out, in), as a fully connected layer's
    else:
        product = ops.convolution(inputs, weights, [1, 1], [1, 1], [1, 1], [1, 1])
    config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    config["INFERENCE_NUM_THREADS"] = threads
    request = ov.Core().compile_model(ov.Model([product], [x]), "CPU", config).create_infer_request()
    a = rng.standard_normal(shape, dtype=np.float32)
    return Gemm(label, lambda: request.infer({0: a}), operations)


def _static(dimensions: list) -> tuple[int, ...] | None:
    return tuple(d.get_length() for d in dimensions) if all(d.is_static for d in dimensions) else None


def _recorded_hint(model) -> str:
    """The inference precision the file was gated with (f32 when it records none)."""
    with contextlib.suppress(RuntimeError):
        hint = model.get_rt_info(["runtime_options", "INFERENCE_PRECISION_HINT"]).astype(str)
        if hint in _HINTS.values():
            return hint
    return "f32"
