"""ONNX files (.onnx), run by onnxruntime: fp32, fp16 and int8 (onnxruntime static quantization,
`onnx_int8`). Opening and running a file imports neither torch nor onnx: the metadata and the
digest are read from the protobuf wire format, so `edgeft predict` starts fast.

The metadata is the ModelProto's `metadata_props` entry "edgeft". The content digest is the
sha256 of every other top-level field of the ModelProto, in file order: graph, weights, opsets.
The exporter's per-node provenance (stack traces naming files of the exporting machine) is
removed before anything else, so the digest covers the file as shipped.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from edgeft.errors import InputError, RunError
from edgeft.formats.base import Format, Gemm, GemmShapes, Runner, WriteRequest

__all__ = ["FORMAT", "OPSETS", "OnnxFormat", "check_external_data", "quant_settings"]

OPSETS = range(18, 24)  # opsets written and tested (each read back from the file)
DEFAULT_OPSET = 18
METADATA_KEY = "edgeft"
_METADATA_FIELD = 14  # ModelProto.metadata_props
_SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, with room for the graph
_CUDA, _CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


class OnnxFormat(Format):
    name, title, suffixes, runtime = "onnx", "ONNX", (".onnx",), "onnxruntime"
    precisions = ("fp32", "fp16", "int8")
    options = frozenset(
        {"opset", "calib_method", "activation_type", "weight_type", "quant_format", "reduce_range", "fallback"}
    )
    needs, needs_to_write = ("onnxruntime",), ("onnx", "onnxscript")
    cuda, torch_free, rank = True, True, 0
    gemm_precisions = ("fp32", "int8")

    def int8_rungs(self, config) -> list:
        from edgeft.formats.onnx_int8 import fallback_ladder

        first = quant_settings(config)
        return [first, *fallback_ladder(first)] if config.fallback is not False else [first]

    def write(self, request: WriteRequest, path: Path) -> dict:
        opset = request.config.opset or DEFAULT_OPSET
        if request.precision != "int8":
            write_onnx(request.model, request.spec, path, opset=opset, precision=request.precision)
            return {"opset": opset}
        from edgeft.formats.onnx_int8 import quantize_onnx, settings_dict

        source = request.workdir / "fp32-source.onnx"  # written once, quantized by every rung
        if not source.exists():
            write_onnx(request.model, request.spec, source, opset=opset, precision="fp32")
        summary = quantize_onnx(
            source,
            path,
            calibration=request.calibration(request.rung.calibration_size),
            settings=request.rung,
            workdir=request.workdir / "quantize",
        )
        _check_onnx(path, opset)
        return {"opset": opset, "quantization": {**settings_dict(request.rung), "summary": summary.line()}}

    def read(self, path: Path) -> tuple[str | None, str]:
        return metadata_and_digest(_read_bytes(path), path)

    def write_metadata(self, path: Path, text: str) -> None:
        fields = [raw for number, raw in _fields(path.read_bytes(), path) if number != _METADATA_FIELD]
        entry = _length_delimited(1, METADATA_KEY.encode()) + _length_delimited(2, text.encode())
        path.write_bytes(b"".join(fields) + _length_delimited(_METADATA_FIELD, entry))

    def open(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runner:
        import onnxruntime as ort

        session = _session(ort, path, device, threads)
        provider = session.get_providers()[0]
        if device.startswith("cuda") and provider != _CUDA:
            raise InputError(
                f"--device {device}: onnxruntime cannot use CUDA here "
                f"(providers: {ort.get_available_providers()}); use --device cpu"
            )
        name = session.get_inputs()[0].name
        return Runner(
            lambda batch: session.run(None, {name: batch})[0],
            provider,
            input_shape=tuple(session.get_inputs()[0].shape[1:]),
            output_shape=tuple(session.get_outputs()[0].shape[1:]),
        )

    def details(self) -> dict:
        import onnxruntime

        return {"onnxruntime_providers": onnxruntime.get_available_providers()}

    def gemms(self, precision: str, shapes: GemmShapes, threads: int) -> list[Gemm]:
        """MatMul and Conv (fp32); for int8 MatMulInteger, QLinearMatMul and QLinearConv (MLAS's
        QGEMM), with the activation type of edgeft's int8 files on this CPU."""
        return _fp32_products(shapes, threads) if precision == "fp32" else _int8_products(shapes, threads)


FORMAT = OnnxFormat()


def quant_settings(config):
    """This CPU's default int8 settings, with the ones `config` names instead."""
    from edgeft.formats.onnx_int8 import default_settings

    chosen = {
        "activation_type": config.activation_type,
        "weight_type": config.weight_type,
        "format": config.quant_format,
        "reduce_range": config.reduce_range,
        "calibrate_method": config.calib_method,
    }
    return replace(
        default_settings(), calibration_size=config.calib_size, **{k: v for k, v in chosen.items() if v is not None}
    )


# --- writing ------------------------------------------------------------------------------


def write_onnx(model, spec, path: Path, *, opset: int = DEFAULT_OPSET, precision: str = "fp32") -> None:
    """fp32 export with a dynamic batch dimension, without the exporter's provenance, then fp16
    conversion (fp16 compute behind float32 inputs and outputs); one self-contained file,
    checked with onnx.checker."""
    import onnx
    import torch

    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if n_bytes > _SINGLE_FILE_LIMIT:
        raise InputError(f"the model's {n_bytes / 2**30:.1f} GiB of weights do not fit a single-file ONNX")
    example = torch.randn(2, spec.channels, spec.size, spec.size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(),
            (example,),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    program.save(str(path), external_data=False)
    exported = _without_provenance(onnx.load(str(path)))
    onnx.save(_to_fp16(exported) if precision == "fp16" else exported, str(path))
    _check_onnx(path, opset)


def _without_provenance(model):
    """The model without the exporter's provenance (per-node stack traces and module paths that
    name files of the exporting machine) and documentation strings, at every level."""
    from google.protobuf.message import Message

    pending = [model]
    while pending:
        message = pending.pop()
        for descriptor, value in message.ListFields():
            if descriptor.name == "metadata_props":
                del value[:]
            elif descriptor.name == "doc_string":
                message.doc_string = ""
            elif descriptor.message_type is None:
                continue
            elif isinstance(value, Message):
                pending.append(value)
            else:
                pending += list(value)
    return model


def _to_fp16(model):
    """fp16 weights and compute behind float32 inputs and outputs (the casts the converter adds
    come last in the node list, so the graph is sorted again)."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = ir.from_proto(convert_float_to_float16(model, keep_io_types=True))
    converted.graph.sort()
    return ir.to_proto(converted)


def _check_onnx(path: Path, opset: int) -> None:
    """One self-contained file that onnx.checker accepts, at the opset asked for."""
    import onnx

    check_external_data(path)
    onnx.checker.check_model(str(path), full_check=True)
    written = {
        o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")
    }
    if written != {opset}:
        raise RunError(f"asked for opset {opset}, the exporter wrote {sorted(written)}")


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external tensor data lives outside the file's own folder."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors of every kind
        raise InputError(f"{path}: not a readable ONNX file ({exc})") from None
    folder = path.resolve().parent
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if os.path.isabs(location) or not (folder / location).resolve().is_relative_to(folder):
                raise InputError(f"{path}: external data {location!r} points outside {folder}; refusing to read it")


# --- running ------------------------------------------------------------------------------


def _session(ort, path: Path, device: str, threads: int | None):
    """An onnxruntime session: CUDA first when wanted, then the CPU. No CPU memory arena: it
    would keep the largest batch's buffers for good, and measured no faster without it."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    wants_cuda = device.startswith("cuda") or (device == "auto" and _cuda_present(ort))
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    providers: list = [(_CUDA, {"device_id": index}), _CPU] if wants_cuda else [_CPU]
    if wants_cuda:
        ort.set_default_logger_severity(4)  # a CUDA library that fails to load is reported by the caller
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise InputError(f"{path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
    finally:
        ort.set_default_logger_severity(2)


def _cuda_present(ort) -> bool:
    """onnxruntime-gpu lists CUDA even where no GPU or CUDA library is; only try it when an
    NVIDIA device exists, so a CPU-only machine does not pay for the failed attempt."""
    return _CUDA in ort.get_available_providers() and (Path("/dev/nvidiactl").exists() or os.name == "nt")


def _fp32_products(shapes: GemmShapes, threads: int) -> list[Gemm]:
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((shapes.n, shapes.n), dtype=np.float32) for _ in range(2))
    products = [_product("MatMul fp32", "MatMul", a, {"b": b}, np.float32, shapes.matmul_operations(), threads)]
    for batch, channels, side in shapes.convolutions:
        x = rng.standard_normal((batch, channels, side, side), dtype=np.float32)
        w = rng.standard_normal((channels, channels, 3, 3), dtype=np.float32)
        label, operations = shapes.conv_label(batch, channels, side), shapes.conv_operations(batch, channels, side)
        products.append(_product(f"{label} fp32", "Conv", x, {"w": w}, np.float32, operations, threads, pads=[1] * 4))
    return products


def _int8_products(shapes: GemmShapes, threads: int) -> list[Gemm]:
    import numpy as np

    from edgeft.formats.onnx_int8 import default_settings

    rng = np.random.default_rng(0)
    kind = np.uint8 if default_settings().activation_type == "uint8" else np.int8
    zero, scale = kind(128 if kind is np.uint8 else 0), np.float32(0.02)
    types = f"{'u' if kind is np.uint8 else 's'}8 x s8"

    def activations(shape: tuple) -> np.ndarray:
        return rng.integers(np.iinfo(kind).min, np.iinfo(kind).max + 1, shape, dtype=kind)

    a, b = activations((shapes.n, shapes.n)), rng.integers(-127, 128, (shapes.n, shapes.n), dtype=np.int8)
    operations = shapes.matmul_operations()
    qlinear = {"a_scale": scale, "a_zero": zero, "b": b, "b_scale": scale, "b_zero": np.int8(0), "y_scale": scale}
    products = [
        _product(f"MatMulInteger {types}", "MatMulInteger", a, {"b": b, "a_zero": zero}, np.int32, operations, threads),
        _product(f"QLinearMatMul {types}", "QLinearMatMul", a, {**qlinear, "y_zero": zero}, kind, operations, threads),
    ]
    for batch, channels, side in shapes.convolutions:
        w = rng.integers(-127, 128, (channels, channels, 3, 3), dtype=np.int8)
        per_channel = {"w_scale": np.full(channels, scale), "w_zero": np.zeros(channels, np.int8)}
        constants = {"x_scale": scale, "x_zero": zero, "w": w, **per_channel, "y_scale": scale, "y_zero": zero}
        label, operations = shapes.conv_label(batch, channels, side), shapes.conv_operations(batch, channels, side)
        x = activations((batch, channels, side, side))
        products.append(
            _product(f"Q{label} {types}", "QLinearConv", x, constants, kind, operations, threads, pads=[1] * 4)
        )
    return products


def _product(label: str, op: str, a, constants: dict, out_dtype, operations: int, threads: int, **attributes) -> Gemm:
    """A one-node model `op`(a, *constants) (the constants as initializers, as a model's weights;
    the output shaped as `a`, as these products are) in an onnxruntime CPU session with `threads` threads."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    def tensor(name: str, dtype) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), a.shape)

    graph = helper.make_graph(
        [helper.make_node(op, ["a", *constants], ["y"], **attributes)],
        op,
        [tensor("a", a.dtype)],
        [tensor("y", out_dtype)],
        [numpy_helper.from_array(np.asarray(value), name) for name, value in constants.items()],
    )
    opsets = [helper.make_opsetid("", DEFAULT_OPSET)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=[_CPU])
    return Gemm(label, lambda: session.run(None, {"a": a}), operations)


# --- the protobuf wire format: metadata and digest without onnx --------------------------


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    return path.read_bytes()


def metadata_and_digest(data: bytes, source: str | os.PathLike) -> tuple[str | None, str]:
    """(the edgeft metadata text or None, the content digest) of a serialized ONNX model, in one
    pass over its top-level fields."""
    digest, text = hashlib.sha256(), None
    for number, raw in _fields(data, source):
        if number != _METADATA_FIELD:
            digest.update(raw)
            continue
        entry = {n: _payload(r, source) for n, r in _fields(_payload(raw, source), source)}
        if bytes(entry.get(1, b"")) == METADATA_KEY.encode():
            text = bytes(entry.get(2, b"")).decode("utf-8", errors="replace")
    return text, digest.hexdigest()


def _varint(data, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if byte < 0x80:
            return value, pos


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | 2) + _encode_varint(len(payload)) + payload


def _fields(data, source) -> Iterator[tuple[int, memoryview]]:
    """(field number, raw bytes including the tag) of each top-level field of a message."""
    data, pos = memoryview(data), 0
    try:
        while pos < len(data):
            start = pos
            tag, pos = _varint(data, pos)
            wire = tag & 7
            if wire == 0:
                _, pos = _varint(data, pos)
            elif wire == 2:
                length, pos = _varint(data, pos)
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError(f"wire type {wire}")
            if pos > len(data) or tag >> 3 == 0:
                raise ValueError("truncated field")
            yield tag >> 3, data[start:pos]
    except ValueError as exc:
        raise InputError(f"{source}: not a readable ONNX file ({exc})") from None


def _payload(raw: memoryview, source) -> memoryview:
    """The content of a length-delimited field (tag and length stripped)."""
    try:
        tag, pos = _varint(raw, 0)
        if tag & 7 != 2:
            raise ValueError(f"field {tag >> 3} is not length-delimited")
        _, pos = _varint(raw, pos)
    except ValueError as exc:
        raise InputError(f"{source}: not a readable ONNX file ({exc})") from None
    return raw[pos:]
