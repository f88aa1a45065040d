"""int8 ONNX files with onnxruntime static quantization, with settings chosen for the CPU that runs.

Torch-free. What the settings are and why (onnxruntime 1.31, CPU provider; speed: 224 px, batch 1,
random-weight resnet18 / resnext50_32x4d / densenet121 timed interleaved in one process, see
`benchmarks/test_int8_speed.py`; accuracy: resnet18 trained on digits at 64 px, gated; README
"int8" has the tables):

- **QDQ, uint8 activations, int8 weights (U8S8).** onnxruntime's x86 int8 kernels multiply
  unsigned by signed bytes (AVX2 `vpmaddubsw`, VNNI `vpdpbusd`); int8 activations (S8S8) took a
  slower path: 0.75-1.05x fp32 on AVX2, against 1.25-1.85x for U8S8. QOperator was no faster than
  QDQ. ARM kernels prefer int8 activations, so ARM gets S8S8.
- **Per-channel weights.** No slower than per-tensor, and closer to the float weights where the
  output channels of a convolution differ in scale.
- **reduce_range (7-bit weights) only without VNNI.** AVX2's `vpmaddubsw` adds two u8 x s8
  products into a saturating int16, which 8-bit weights can overflow: on AVX2 the 8-bit file's
  probabilities were 3.6x further from the checkpoint's (mean |dprob| 0.0061 against 0.0017),
  at the same speed. VNNI sums in int32, so 8 bits are kept there.
- **MinMax calibration.** Entropy was no closer and percentile slightly further on trained
  checkpoints; the fallback ladder tries percentile second.
- **Batch norms with no convolution before them become depthwise 1x1 convolutions.** onnxruntime
  folds a BatchNormalization into the convolution before it, but DenseNet's pre-activation order
  (concatenation, BN, ReLU, conv) leaves 58 of them in densenet121, and there is no int8
  BatchNormalization: each stayed float between DequantizeLinear / QuantizeLinear and layout
  Transposes (312 DequantizeLinear and 127 Transpose nodes). The same per-channel scale and shift
  as a depthwise 1x1 convolution is exact in float and runs as QLinearConv with its ReLU fused, so
  the whole network runs in int8: densenet121 1.19x -> 1.47x fp32 on AVX2.

Calibration streams: batches are fed to the calibrator one at a time and reduced to ranges or
histograms at once, so memory holds one batch, never the whole calibration set. The quantizer's
per-tensor log lines and prints are kept out of the console (in the quantizing thread only);
`quantize_onnx` returns a one-line summary instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeft.cpu import has_vnni
from edgeft.errors import InputError
from edgeft.preprocess import first_images

if TYPE_CHECKING:
    import numpy as np

__all__ = [
    "ACTIVATION_TYPES",
    "CALIBRATION_METHODS",
    "FLOAT_NODE_GROUPS",
    "QUANT_FORMATS",
    "WEIGHT_TYPES",
    "QuantSettings",
    "QuantSummary",
    "batchnorms_as_depthwise_convs",
    "default_settings",
    "fallback_ladder",
    "quantize_onnx",
    "settings_dict",
]

log = logging.getLogger(__name__)

ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPES = ("int8", "uint8")
QUANT_FORMATS = ("qdq", "qoperator")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
FLOAT_NODE_GROUPS = ("first_conv", "classifier")  # names for nodes found in any graph
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_QUANTIZED_OPS = ("QLinearConv", "QLinearMatMul", "QGemm", "ConvInteger", "MatMulInteger")


@dataclass(frozen=True)
class QuantSettings:
    """How a float ONNX file becomes int8."""

    activation_type: str = "uint8"  # uint8 | int8 (x86 kernels are written for uint8 activations)
    weight_type: str = "int8"  # int8 | uint8
    format: str = "qdq"  # qdq | qoperator
    per_channel: bool = True  # one scale per output channel of each weight
    reduce_range: bool = False  # 7-bit weights: avoids int16 saturation on x86 without VNNI
    calibrate_method: str = "minmax"  # minmax | entropy | percentile
    calibration_size: int = 256  # calibration images
    keep_float: tuple[str, ...] = ()  # node names, or "first_conv" / "classifier", left in float
    op_types: tuple[str, ...] = ()  # operator types to quantize; empty: every type onnxruntime can
    batchnorms_as_convs: bool = True  # batch norms with no conv before them run as int8 depthwise convs

    def __post_init__(self):
        for name, value, allowed in (
            ("activation type", self.activation_type, ACTIVATION_TYPES),
            ("weight type", self.weight_type, WEIGHT_TYPES),
            ("quantization format", self.format, QUANT_FORMATS),
            ("calibration method", self.calibrate_method, CALIBRATION_METHODS),
        ):
            if value not in allowed:
                raise InputError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        if self.calibration_size < 1:
            raise InputError(f"calibration size must be at least 1, got {self.calibration_size}")

    def label(self) -> str:
        """A short name for tables: 'qdq u8s8 pc rr minmax/256 float:first_conv+classifier'."""
        types = f"{self.activation_type[0]}8{self.weight_type[0]}8".replace("i", "s")
        parts = [self.format, types, "pc" if self.per_channel else "pt"] + (["rr"] if self.reduce_range else [])
        parts.append(f"{self.calibrate_method}/{self.calibration_size}")
        if self.keep_float:
            parts.append("float:" + "+".join(self.keep_float))
        if self.op_types:
            parts.append("ops:" + "+".join(self.op_types))
        if not self.batchnorms_as_convs:
            parts.append("float-bn")
        return " ".join(parts)


@dataclass
class QuantSummary:
    """What the quantizer did, in numbers and one line."""

    settings: QuantSettings
    quantized: int  # weighted nodes (Conv, Gemm, MatMul) running in int8
    left_float: int  # weighted nodes left in float
    calibration_images: int
    batchnorms_as_convs: int = 0  # batch norms with no conv before them, run as depthwise convolutions

    def line(self) -> str:
        converted = f" ({self.batchnorms_as_convs} of them batch norms)" if self.batchnorms_as_convs else ""
        return (
            f"int8 ({self.settings.label()}): {self.quantized} of {self.quantized + self.left_float} "
            f"conv/gemm/matmul nodes quantized{converted}, {self.left_float} left in float; "
            f"calibrated on {self.calibration_images} images"
        )


def settings_dict(settings: QuantSettings) -> dict:
    """The settings as plain JSON values (for the metadata)."""
    return {
        **dataclasses.asdict(settings),
        "keep_float": list(settings.keep_float),
        "op_types": list(settings.op_types),
    }


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def default_settings(*, features: dict[str, bool] | None = None, machine_is_x86: bool | None = None) -> QuantSettings:
    """The fastest settings that keep accuracy on this CPU (or on one with `features`)."""
    vnni = has_vnni() if features is None else any(features.get(k) for k in ("avx512_vnni", "avx_vnni", "amx_int8"))
    x86 = _is_x86() if machine_is_x86 is None else machine_is_x86
    if not x86:  # ARM's int8 kernels prefer symmetric int8 activations
        return QuantSettings(activation_type="int8")
    return QuantSettings(reduce_range=not vnni)


def fallback_ladder(settings: QuantSettings) -> list[QuantSettings]:
    """What to try, in order, when `settings` fails its gate: 4x the calibration images, then
    another calibration method, then the first convolution and the classifier left in float.
    Each step keeps the previous ones."""
    more = dataclasses.replace(settings, calibration_size=settings.calibration_size * 4)
    other = "percentile" if settings.calibrate_method != "percentile" else "minmax"
    method = dataclasses.replace(more, calibrate_method=other)
    ends = tuple(dict.fromkeys(settings.keep_float + FLOAT_NODE_GROUPS))
    return [more, method, dataclasses.replace(method, keep_float=ends)]


def quantize_onnx(
    fp32_path: str | Path,
    out_path: str | Path,
    *,
    calibration: Iterable[np.ndarray],
    settings: QuantSettings,
    input_name: str = "input",
    workdir: Path | None = None,
) -> QuantSummary:
    """Write the int8 version of the float file `fp32_path` to `out_path`, calibrated on the
    first `settings.calibration_size` images of `calibration` (float32 NCHW batches, read one
    batch at a time). Intermediate files go to `workdir`, a folder created and removed here
    (None: one in the system's temporary folder)."""
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out_path = Path(out_path)
    with _scratch(workdir) as tmp, _quiet():
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        converted = batchnorms_as_depthwise_convs(prepared) if settings.batchnorms_as_convs else 0
        excluded = _resolve_float_nodes(prepared, settings.keep_float)
        cache, images = _calibrate(prepared, Path(tmp), calibration, settings, input_name)
        quantize_static(
            str(prepared),
            str(out_path),
            None,
            calibration_cache_path=str(cache),
            **_quantizer_options(settings),
            nodes_to_exclude=excluded,
        )
    quantized, left_float = _count_quantized(out_path)
    summary = QuantSummary(settings, quantized, left_float, images, converted)
    log.info("%s", summary.line())
    return summary


@contextlib.contextmanager
def _scratch(workdir: Path | None) -> Iterator[Path]:
    """`workdir` (created, then removed with what is in it; the temporaries onnxruntime's tools
    make go there too), or a new folder in the system's temporary folder when None."""
    if workdir is None:
        with tempfile.TemporaryDirectory() as tmp:
            yield Path(tmp)
        return
    workdir.mkdir()
    system_folder, tempfile.tempdir = tempfile.tempdir, str(workdir)  # onnxruntime's tools make their own temporaries
    try:
        yield workdir
    finally:
        tempfile.tempdir = system_folder
        shutil.rmtree(workdir, ignore_errors=True)


def _quantizer_options(settings: QuantSettings) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType

    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    return {
        "quant_format": QuantFormat.QDQ if settings.format == "qdq" else QuantFormat.QOperator,
        "activation_type": types[settings.activation_type],
        "weight_type": types[settings.weight_type],
        "per_channel": settings.per_channel,
        "reduce_range": settings.reduce_range,
        "calibrate_method": _calibration_method(settings.calibrate_method),
        "op_types_to_quantize": list(settings.op_types) or None,
    }


def _calibration_method(name: str):
    from onnxruntime.quantization import CalibrationMethod

    return {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[name]


def _calibrate(
    prepared: Path, tmp: Path, calibration: Iterable[np.ndarray], settings: QuantSettings, input_name: str
) -> tuple[Path, int]:
    """Ranges of every tensor from `settings.calibration_size` images, one batch in memory at a
    time; saved as onnxruntime's calibration cache. Returns (cache path, images used)."""
    from onnxruntime.quantization import CalibrationDataReader, create_calibrator
    from onnxruntime.quantization.calibrate import save_tensors_data
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry

    class OneBatch(CalibrationDataReader):
        def __init__(self, batch: np.ndarray):
            self.batch = batch

        def get_next(self):
            batch, self.batch = self.batch, None
            return None if batch is None else {input_name: batch}

    op_types = sorted(set(QLinearOpsRegistry) | set(QDQRegistry))  # the tensors quantize_static calibrates
    calibrator = create_calibrator(
        prepared,
        op_types,
        augmented_model_path=str(tmp / "augmented.onnx"),
        calibrate_method=_calibration_method(settings.calibrate_method),
    )
    images = 0
    for batch in first_images(calibration, settings.calibration_size):
        calibrator.collect_data(OneBatch(batch))
        images += len(batch)
    if images == 0:
        raise InputError("int8 calibration needs at least one image; none were given")
    cache = tmp / "calibration.json"
    save_tensors_data(calibrator.compute_data(), cache)
    return cache, images


def batchnorms_as_depthwise_convs(path: Path) -> int:
    """Rewrite, in place, every inference BatchNormalization of a 4-D tensor with constant
    statistics as the depthwise 1x1 Conv that computes the same per-channel scale and shift.
    onnxruntime has already folded those that follow a convolution; these remain. Returns how many."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    graph = model.graph
    constants = {init.name: init for init in graph.initializer}
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in (*graph.value_info, *graph.input)}
    nodes, converted = [], 0
    for node in graph.node:
        stats = node.input[1:5]
        if (
            node.op_type != "BatchNormalization"
            or len(node.output) != 1
            or ranks.get(node.input[0]) != 4
            or len(stats) != 4
            or not all(name in constants for name in stats)
        ):
            nodes.append(node)
            continue
        scale, shift, mean, var = (numpy_helper.to_array(constants[name]).astype(np.float64) for name in stats)
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        weight = scale / np.sqrt(var + epsilon)
        names = (f"{node.name}.depthwise_weight", f"{node.name}.depthwise_bias")
        graph.initializer.extend(
            [
                numpy_helper.from_array(weight.reshape(-1, 1, 1, 1).astype(np.float32), names[0]),
                numpy_helper.from_array((shift - mean * weight).astype(np.float32), names[1]),
            ]
        )
        nodes.append(
            helper.make_node(
                "Conv",
                [node.input[0], *names],
                list(node.output),
                name=f"{node.name}.depthwise",
                group=len(weight),
                kernel_shape=[1, 1],
            )
        )
        converted += 1
    if converted:
        graph.ClearField("node")
        graph.node.extend(nodes)
        used = {name for node in nodes for name in node.input}
        kept = [init for init in graph.initializer if init.name in used]  # the batch norms' statistics go
        graph.ClearField("initializer")
        graph.initializer.extend(kept)
        onnx.save(model, str(path))
    return converted


def _resolve_float_nodes(model_path: Path, names: tuple[str, ...]) -> list[str]:
    """Node names for `names`: 'first_conv' and 'classifier' found in the graph, others as given."""
    if not names:
        return []
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    weighted = [node for node in graph.node if node.op_type in _WEIGHTED_OPS]
    found = {
        "first_conv": next((n.name for n in weighted if n.op_type == "Conv"), None),
        "classifier": next((n.name for n in reversed(weighted) if n.op_type in ("Gemm", "MatMul")), None),
    }
    return [found.get(name, name) for name in names if found.get(name, name)]


def _count_quantized(path: Path) -> tuple[int, int]:
    """(weighted nodes running in int8, weighted nodes left in float) in a quantized file."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    dequantized = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    quantized = left_float = 0
    for node in graph.node:
        if node.op_type in _QUANTIZED_OPS:
            quantized += 1
        elif node.op_type in _WEIGHTED_OPS:
            if any(name in dequantized for name in node.input[:2]):
                quantized += 1
            else:
                left_float += 1
    return quantized, left_float


class _DropOnnxruntimeRecords(logging.Filter):
    """Sends the log records that onnxruntime's quantization code writes, in the thread that
    quantizes, to this module's debug log instead of the console."""

    def __init__(self):
        super().__init__()
        self.thread = threading.get_ident()
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and f"{os.sep}onnxruntime{os.sep}" in record.pathname:
            self.dropped += 1
            log.debug("quantizer: %s", record.getMessage())
            return False
        return True


_quantizing = threading.local()  # .active: this thread is inside quantize_onnx


def _calibrator_print(*args, sep: str | None = " ", end: str | None = "\n", file=None, flush: bool = False) -> None:
    """`print` as onnxruntime's calibrate module sees it: the histogram calibrators' progress lines
    (entropy, percentile; no option turns them off) go to the debug log while this thread
    quantizes; everything else is printed as usual."""
    if getattr(_quantizing, "active", False) and file is None:
        log.debug("quantizer: %s", (" " if sep is None else sep).join(map(str, args)))
    else:
        print(*args, sep=sep, end=end, file=file, flush=flush)


@contextlib.contextmanager
def _quiet():
    """Keep the quantizer's per-tensor lines off the console, in this thread only: its root-logger
    records ('Axis 1 is out-of-range ...'), its shape-inference record and the calibrators' prints.
    onnxruntime 1.31 raises no Python warnings here and its native log stays silent at its default
    severity, so other threads keep their prints, warnings and log records."""
    from onnxruntime.quantization import calibrate

    calibrate.print = _calibrator_print  # a module global shadows the builtin for that module only
    dropped = _DropOnnxruntimeRecords()
    loggers = (logging.getLogger(), logging.getLogger("onnxruntime.quantization.shape_inference"))
    for logger in loggers:
        logger.addFilter(dropped)
    _quantizing.active = True
    try:
        yield
    finally:
        _quantizing.active = False
        for logger in loggers:
            logger.removeFilter(dropped)
        log.debug("quantizer: %d log lines kept off the console", dropped.dropped)
