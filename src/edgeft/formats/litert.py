"""LiteRT (TensorFlow Lite) flatbuffers (.tflite), written by litert-torch and run by ai-edge-litert's
interpreter through its XNNPACK delegate: fp32, fp16 (fp16 weights, float32 in and out) and int8
(PT2E post-training quantization with litert-torch's own quantizer).

Two extras: `litert` (ai-edge-litert, the interpreter: predict, validate, bench) and
`litert-export` (litert-torch, the converter, which brings jax and transformers). Opening and
running a file imports no torch.

Layout: input float32 NCHW (the other formats' layout; the converter puts one TRANSPOSE to NHWC
in front of the first convolution) with a batch of 1, what an app on a device runs; the runner runs
a larger batch in slices (XNNPACK fails to resize some int8 graphs); output logits.

int8 I/O: litert-torch's static PT2E conversion folds the first quantize and the last dequantize
into the model's input and output (float I/O is not an option of the converter), so an int8 file
takes int8 in and gives int8 out, as int8 apps on a device feed it. The runner quantizes the input
with the input tensor's scale and zero point and dequantizes the output (numpy); a float32 tensor is
passed as is (the dynamic rung, int8 weights with activations quantized at run time, keeps float32
I/O), so the runner takes either kind.
Threads: all cores unless told (`threads`); the interpreter's own default leaves it to the runtime.

Before the metadata goes in, `litert_xnnpack` rewrites operators XNNPACK cannot take (concatenations
of more than 5 inputs, PyTorch's padded max pooling, int8 average pooling) into ones it can, each the
same function (an int8 average up to the rounding of a half), so the delegate runs the whole graph
(densenet121 int8: 47 parts to 1, 30 % faster). The file records what was rewritten and how many
parts XNNPACK runs (`litert.xnnpack`).

The edgeft metadata is the model's metadata table entry `edgeft` (`Model.metadata`, which LiteRT's
loaders and the stock interpreter ignore), whose buffer is the last thing in the file: rewriting it
leaves every byte before it as it was. The content digest is the sha256 of the file up to that
buffer: graph, weights and the converter's own metadata.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeft.errors import InputError
from edgeft.formats.base import Format, Rung, Runner, WriteRequest, quiet_native_output
from edgeft.formats.litert_xnnpack import delegable

__all__ = ["FORMAT", "LiteRtFormat", "PtqRung"]

log = logging.getLogger(__name__)

METADATA_KEY = b"edgeft"
_IDENTIFIER = b"TFL3"  # the flatbuffer file identifier at bytes 4..8
_MAX_METADATA = 16 * 2**20
# int8 grouped convolutions are written with this many input channels per group (see
# _widen_grouped_convolutions): XNNPACK's int8 kernels in LiteRT run a narrow group far below their speed
# (resnext50_32x4d, 4 to 32 channels per group: 17 ms; widened to 64: 6.8 ms, to 32: 8.0, to 128: 7.6;
# benchmarks/README.md); its fp32 kernels gain nothing, so fp32 and fp16 files keep the groups
GROUP_WIDTH = 64
_U32 = 4


@dataclass(frozen=True)
class PtqRung(Rung):
    """One setting of litert-torch's PT2E quantizer (symmetric int8, per-channel weights): static
    (activation ranges calibrated, every tensor int8) or dynamic (int8 weights, activations
    quantized at run time by the kernels: slower, and it keeps the accuracy where a static graph
    loses it)."""

    dynamic: bool = False

    def to_dict(self) -> dict:
        return {**super().to_dict(), "dynamic": self.dynamic}


class LiteRtFormat(Format):
    name, title, suffixes, runtime = "litert", "LiteRT", (".tflite",), "litert"
    precisions = ("fp32", "fp16", "int8")
    options = frozenset({"fallback"})
    extra, extra_to_write = "litert", "litert-export"
    needs, needs_to_write = ("ai_edge_litert",), ("litert_torch",)
    torch_free, rank = True, 40

    def unavailable(self, precision: str, device: str, *, write: bool = True) -> str | None:
        if device.startswith("cuda"):
            return "LiteRT runs on the CPU here (XNNPACK); use --device cpu"
        return super().unavailable(precision, device, write=write)

    def int8_rungs(self, config) -> list:
        first = PtqRung("pt2e per-channel", config.calib_size)
        if config.fallback is False:
            return [first]
        return [first, PtqRung("pt2e per-channel, dynamic activations", config.calib_size, dynamic=True)]

    def write(self, request: WriteRequest, path: Path) -> dict:
        with quiet_native_output():
            flatbuffer, quantization = _convert(request)
            flatbuffer, rewritten = delegable(flatbuffer)
            path.write_bytes(_with_metadata_entry(flatbuffer))
        io, partitions = _described(path)
        xnnpack = {"rewritten": {k: n for k, n in rewritten.items() if n}, "partitions": partitions}
        extra = {"litert": {"layout": "NCHW", "io": io, "xnnpack": xnnpack}}
        return {**extra, "quantization": quantization} if quantization else extra

    def read(self, path: Path) -> tuple[str | None, str]:
        data = _read_bytes(path)
        start, text = _metadata_entry(data, path)
        return text or None, hashlib.sha256(memoryview(data)[:start]).hexdigest()

    def write_metadata(self, path: Path, text: str) -> None:
        data = _read_bytes(path)
        start, _ = _metadata_entry(data, path)
        payload = text.encode("utf-8")
        if len(payload) > _MAX_METADATA:
            raise InputError(f"{path}: metadata of {len(payload)} bytes exceeds {_MAX_METADATA}")
        with path.open("r+b") as f:
            f.truncate(start)
            f.seek(start)
            f.write(len(payload).to_bytes(_U32, "little") + payload)

    def open(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runner:
        reason = self.unavailable("fp32", device, write=False)
        if reason:
            raise InputError(f"{path}: {reason}")
        _metadata_entry(_read_bytes(path), path)  # a .tflite, or a one-line error
        return _runner(path, threads or os.cpu_count() or 1)


FORMAT = LiteRtFormat()


# --- writing ------------------------------------------------------------------------------


def _convert(request: WriteRequest) -> tuple[bytes, dict | None]:
    """The model as a LiteRT flatbuffer (batch 1, float32 NCHW in), and the int8 settings used."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # an import-time deprecation notice
    import litert_torch
    import torch

    spec = request.spec
    model = copy.deepcopy(request.model).float().eval()
    example = (torch.zeros(1, spec.channels, spec.size, spec.size),)
    log.info("converting to LiteRT (%s)", request.precision)
    if request.precision == "int8":
        return _quantized(model, example, request)
    quant_config = None
    if request.precision == "fp16":
        from litert_torch.generative.quantize import quant_recipes

        quant_config = quant_recipes.full_fp16_recipe()  # fp16 weights, dequantized in the graph
    return litert_torch.convert(model, example, quant_config=quant_config).model_content(), None


def _quantized(model, example, request: WriteRequest) -> tuple[bytes, dict]:
    """PT2E static int8 with litert-torch's quantizer, observers fed the calibration batches."""
    import litert_torch
    import torch
    from litert_torch.quantize import pt2e_quantizer
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    rung = request.rung
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True, is_dynamic=rung.dynamic)
    )
    widened = _widen_grouped_convolutions(model)
    batch = torch.export.Dim("batch", min=1, max=1024)
    # strict: the quantizer finds additions and concatenations by their source (torch.add, torch.cat), which
    # only a strict export records; without it they stay float between a DEQUANTIZE and a QUANTIZE
    exported = torch.export.export(model, (example[0].repeat(2, 1, 1, 1),), dynamic_shapes=({0: batch},), strict=True)
    prepared = prepare_pt2e(exported.module(), quantizer)
    seen = 0
    with torch.no_grad():  # the weights' observers too run on a forward pass: one batch for a dynamic rung
        for images in request.calibration(1 if rung.dynamic else rung.calibration_size):
            prepared(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)))
            seen += len(images)
    if not seen:
        raise InputError("int8 LiteRT export: the calibration data is empty")
    converted = convert_pt2e(prepared, fold_quantize=False)
    edge = litert_torch.convert(converted, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    settings = {**rung.to_dict(), "calibration_images": seen}
    if widened:
        settings["grouped_convolutions"] = {"widened": widened, "channels_per_group": GROUP_WIDTH}
    return edge.model_content(), settings


def _widen_grouped_convolutions(model) -> int:
    """Give each grouped convolution with fewer than GROUP_WIDTH input channels per group (not a
    depthwise one) GROUP_WIDTH channels per group: neighbouring groups merged, their weights laid
    block-diagonally, zero elsewhere. The same function, exactly (the zeros add nothing, and each
    output channel's int8 scale comes from the weights it had). Returns how many were widened."""
    import torch

    widened = 0
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if type(conv) is not torch.nn.Conv2d:
                continue
            per_group = conv.in_channels // conv.groups
            if per_group == 1:  # depthwise: kernels of its own
                continue
            fits = (f for f in range(2, conv.groups + 1) if conv.groups % f == 0 and f * per_group <= GROUP_WIDTH)
            merge = max(fits, default=1)
            if merge > 1:
                setattr(parent, name, _merged_groups(conv, merge))
                widened += 1
    return widened


def _merged_groups(conv, merge: int):
    """`conv` with every `merge` neighbouring groups as one, the weights block-diagonal."""
    import torch

    groups, out_per_group, in_per_group = conv.groups // merge, conv.out_channels // conv.groups, conv.weight.shape[1]
    blocks = conv.weight.detach().reshape(groups, merge, out_per_group, in_per_group, *conv.kernel_size)
    weight = torch.zeros(groups, merge, out_per_group, merge, in_per_group, *conv.kernel_size)
    for j in range(merge):
        weight[:, j, :, j] = blocks[:, j]
    wide = copy.deepcopy(conv)
    wide.groups, wide.weight = groups, torch.nn.Parameter(weight.reshape(conv.out_channels, -1, *conv.kernel_size))
    return wide


def _with_metadata_entry(flatbuffer: bytes) -> bytes:
    """The model with an empty `edgeft` entry in its metadata table, the entry's bytes last in the
    file (a flatbuffer builder lays out what it builds first at the end)."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(flatbuffer, 0)
    builder = flatbuffers.Builder(len(flatbuffer) + 4096)
    payload = builder.CreateByteVector(b"")  # built first: laid out last

    class Payload:  # a Buffer whose data is the vector above
        def Pack(self, builder):  # the flatbuffers object API's name
            schema.BufferStart(builder)
            schema.BufferAddData(builder, payload)
            return schema.BufferEnd(builder)

    model.buffers = [*(model.buffers or []), Payload()]
    entry = schema.MetadataT()
    entry.name, entry.buffer = METADATA_KEY.decode(), len(model.buffers) - 1
    model.metadata = [m for m in model.metadata or [] if m.name != METADATA_KEY] + [entry]
    builder.Finish(model.Pack(builder), file_identifier=_IDENTIFIER)
    return bytes(builder.Output())


# --- reading --------------------------------------------------------------------------------


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    with path.open("rb") as f:
        data = f.read()
    if len(data) < 8 or data[4:8] != _IDENTIFIER:
        raise InputError(f"{path}: not a LiteRT model (.tflite flatbuffer)")
    return data


def _metadata_entry(data: bytes, path: Path) -> tuple[int, str]:
    """(where the edgeft entry's bytes start, at their length prefix; the metadata text) of a .tflite
    written by edgeft, whose entry ends the file."""
    reason = FORMAT.missing()
    if reason:
        raise InputError(f"{path}: {reason}")
    from ai_edge_litert import schema_py_generated as schema

    try:
        model = schema.Model.GetRootAs(data, 0)
        entries = (model.Metadata(i) for i in range(model.MetadataLength()))
        found = [entry.Buffer() for entry in entries if entry.Name() == METADATA_KEY]
        table = model.Buffers(found[0])._tab if len(found) == 1 else None  # the data's place: no public accessor
        start = table.Vector(table.Offset(4)) - _U32 if table and table.Offset(4) else None
    except (IndexError, ValueError, TypeError, AttributeError, struct.error) as exc:  # reads past the end
        raise InputError(f"{path}: not a readable LiteRT model ({exc})") from None
    if start is None:
        raise InputError(f"{path}: a LiteRT model with no edgeft metadata entry (not exported by edgeft)")
    if start + _U32 + int.from_bytes(data[start : start + _U32], "little") != len(data):
        raise InputError(f"{path}: its edgeft metadata is not at the end of the file; the file was changed")
    try:
        return start, data[start + _U32 :].decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: its edgeft metadata is not UTF-8 text") from None


# --- running --------------------------------------------------------------------------------


def _interpreter(path: Path, threads: int):
    """The stock interpreter on the file (XNNPACK applied by default), tensors allocated; its native
    log lines (the delegate's creation) kept off the console."""
    from ai_edge_litert.interpreter import Interpreter

    try:
        with quiet_native_output():
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
    except (ValueError, RuntimeError) as exc:
        raise InputError(f"{path}: LiteRT cannot load it ({str(exc).strip().splitlines()[0]})") from None
    return interpreter


def _described(path: Path) -> tuple[dict[str, str], int]:
    """The element types of the file's input and output tensors (e.g. {"input": "int8", ...}), and
    how many parts of the graph XNNPACK runs (1: all of it, where every operator is one it takes)."""
    interpreter = _interpreter(path, 1)
    first = (interpreter.get_input_details()[0], interpreter.get_output_details()[0])
    io = {side: np.dtype(d["dtype"]).name for side, d in zip(("input", "output"), first)}
    return io, _xnnpack_parts(interpreter)


def _xnnpack_parts(interpreter) -> int:
    """How many parts of the loaded graph the XNNPACK delegate runs (0: none)."""
    return sum(op["op_name"] == "DELEGATE" for op in interpreter._get_ops_details())


def _runner(path: Path, threads: int) -> Runner:
    """The file in the stock interpreter: float32 NCHW in (quantized here for an int8 input), float32
    logits out (dequantized for an int8 output); a larger batch runs in slices of the file's batch
    (XNNPACK cannot resize every int8 graph)."""
    interpreter = _interpreter(path, threads)
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    batch, *shape = (int(d) for d in source["shape"])
    to_input, from_output = _quantizer(source), _dequantizer(target)

    def run(x: np.ndarray) -> np.ndarray:
        interpreter.set_tensor(source["index"], to_input(x))
        interpreter.invoke()
        return from_output(interpreter.get_tensor(target["index"]))

    def infer(x: np.ndarray) -> np.ndarray:
        if list(x.shape[1:]) != shape:
            raise InputError(f"{path}: the model takes N x {shape} inputs, got {list(x.shape)}")
        if len(x) == batch:
            return run(x)
        return np.concatenate([run(x[i : i + batch]) for i in range(0, len(x), batch)])

    delegated = _xnnpack_parts(interpreter) > 0
    classes = tuple(int(d) for d in target["shape"][1:])
    return Runner(infer, "litert:xnnpack" if delegated else "litert", input_shape=tuple(shape), output_shape=classes)


def _quantizer(tensor: dict):
    """float32 -> the tensor's type: its scale and zero point for an integer tensor (in place on one
    temporary: a tenth of the time of the plain expression)."""
    kind = np.dtype(tensor["dtype"])
    if kind == np.float32:
        return lambda x: np.ascontiguousarray(x, dtype=np.float32)
    scale, zero = tensor["quantization"]
    inverse, low, high = np.float32(1 / scale), np.iinfo(kind).min, np.iinfo(kind).max

    def quantize(x: np.ndarray) -> np.ndarray:
        q = np.multiply(x, inverse, dtype=np.float32)
        q += zero
        np.rint(q, out=q)
        np.clip(q, low, high, out=q)
        return q.astype(kind)

    return quantize


def _dequantizer(tensor: dict):
    """The tensor's type -> float32."""
    if np.dtype(tensor["dtype"]) == np.float32:
        return lambda y: y
    scale, zero = tensor["quantization"]
    return lambda y: (y.astype(np.float32) - zero) * np.float32(scale)
