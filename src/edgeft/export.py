"""Checkpoint -> self-describing ONNX / TorchScript files (fp32, fp16, int8), each validated
against the checkpoint and kept only when it passes its accuracy gate."""

from __future__ import annotations

import copy
import datetime
import hashlib
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeft import __version__
from edgeft.artifact import check_external_data, load_runner, write_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.config import FORMATS, PRECISIONS, ExportConfig
from edgeft.data import DataBundle, iterate_batches, load_checkpoint_data
from edgeft.errors import InputError
from edgeft.models import model_from_checkpoint
from edgeft.preprocess import IMAGE_EXTENSIONS, Preprocess, preprocess_image
from edgeft.validate import ValidationResult, compare

__all__ = ["ExportConfig", "ExportResult", "ExportedFile", "export", "write_onnx", "write_torchscript"]

log = logging.getLogger(__name__)

FORMAT = "edgeft.export/1"
_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
_SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, with room for the graph


@dataclass
class ExportedFile:
    path: str
    format: str
    precision: str
    size_bytes: int
    validation: ValidationResult | None
    kept: bool  # False: failed its gate and was removed


@dataclass
class ExportResult:
    files: list[ExportedFile] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.validation is None or f.validation.passed for f in self.files)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    modules = {"torch": torch, "torchvision": torchvision, "onnx": onnx, "onnxruntime": onnxruntime}
    return {"edgeft": __version__, **{name: str(module.__version__) for name, module in modules.items()}}


def _check(config: ExportConfig) -> list[str]:
    """The formats to write, after refusing combinations that cannot work."""
    if config.format not in FORMATS:
        raise InputError(f"--format must be one of {', '.join(FORMATS)}, got {config.format!r}")
    if config.precision not in PRECISIONS:
        raise InputError(f"--precision must be one of {', '.join(PRECISIONS)}, got {config.precision!r}")
    formats = ["onnx", "torchscript"] if config.format == "all" else [config.format]
    on_cuda = config.device.startswith("cuda")
    ts_unsupported = config.precision == "int8" or (config.precision == "fp16" and not on_cuda)
    if "torchscript" in formats and ts_unsupported:
        why = "int8 is an ONNX (onnxruntime) precision" if config.precision == "int8" else "fp16 TorchScript needs --device cuda"
        if config.format == "torchscript":
            raise InputError(f"--format torchscript --precision {config.precision}: {why}")
        log.warning("skipping TorchScript: %s", why)
        formats.remove("torchscript")
    if config.calib_size < 1:
        raise InputError("--calib-size must be at least 1")
    return formats


def export(config: ExportConfig) -> ExportResult:
    """Write the requested files to `config.out`, each validated unless `config.validate` is off.
    A file that fails its gate is removed (or kept and marked failed with `config.force`); a file
    already at the destination is only replaced by one that passed or was forced."""
    formats = _check(config)
    source = Path(config.checkpoint)
    checkpoint = load_checkpoint(source)
    model = model_from_checkpoint(checkpoint)
    spec = Preprocess.from_dict(checkpoint["preprocess"])
    needs_data = config.validate or (config.precision == "int8" and not config.calib_data)
    bundle = load_checkpoint_data(checkpoint, data=config.data, data_root=config.data_root) if needs_data else None
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = config.name or (source.parent.name if source.parent.name else source.stem)
    if config.precision != "fp32":
        stem += f"-{config.precision}"
    metadata = {
        "format": FORMAT,
        "arch": checkpoint["arch"],
        "num_classes": checkpoint["num_classes"],
        "classes": list(checkpoint["classes"]),
        "preprocess": spec.to_dict(),
        "precision": config.precision,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": ["batch", spec.channels, spec.size, spec.size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", checkpoint["num_classes"]]},
        "source_checkpoint": {"path": str(source.resolve()), "sha256": _sha256(source)},
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    result = ExportResult()
    for fmt in formats:
        final = out / f"{stem}{_SUFFIX[fmt]}"
        fd, name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=final.suffix, dir=out)
        os.close(fd)
        tmp = Path(name)
        tmp.chmod(0o644)
        try:
            meta = {**metadata, "opset": config.opset if fmt == "onnx" else None}
            if fmt == "onnx":
                write_onnx(model, spec, tmp, opset=config.opset, precision=config.precision,
                            calibration=_calibration(config, bundle, spec))  # fmt: skip
            else:
                write_torchscript(model, spec, tmp, precision=config.precision, device=config.device)
            validation = None
            if config.validate:
                run, provider = load_runner(tmp, device=config.device)
                validation = compare(run, model, bundle, precision=config.precision, provider=provider,
                                     max_acc_drop=config.max_acc_drop, batch_sizes=(1, config.batch_size))  # fmt: skip
                meta["validation"] = validation.to_dict()
            write_metadata(tmp, meta)
            kept = validation is None or validation.passed or config.force
            if kept:
                os.replace(tmp, final)
            result.files.append(ExportedFile(str(final), fmt, config.precision, final.stat().st_size if kept else tmp.stat().st_size, validation, kept))
        finally:
            tmp.unlink(missing_ok=True)
        log.info("%s: %s", final, "kept" if kept else "removed, failed its gate")
    return result


class _Float32IO(nn.Module):
    """Runs a half-precision model behind float32 inputs and outputs."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def _example_input(spec: Preprocess, batch: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, spec.channels, spec.size, spec.size, device=device)


def write_onnx(model: nn.Module, spec: Preprocess, path: Path, *, opset: int, precision: str, calibration) -> None:
    """fp32 export with a dynamic batch dimension, then fp16 conversion or int8 quantization;
    always one self-contained file, checked with onnx.checker."""
    import onnx

    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if n_bytes > _SINGLE_FILE_LIMIT:
        raise InputError(f"the model's {n_bytes / 2**30:.1f} GiB of weights do not fit a single-file ONNX")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model.eval(), (_example_input(spec),), input_names=["input"], output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=opset, dynamo=True,
            external_data=False, verbose=False,
        )  # fmt: skip
    program.save(str(path), external_data=False)
    if precision == "fp16":
        onnx.save(_to_fp16(onnx.load(str(path))), str(path))
    elif precision == "int8":
        _quantize(path, calibration)
    check_external_data(path)
    onnx.checker.check_model(str(path), full_check=True)


def _to_fp16(model):
    """fp16 weights and compute behind float32 inputs and outputs (the casts the converter adds
    come last in the node list, so the graph is sorted again)."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = ir.from_proto(convert_float_to_float16(model, keep_io_types=True))
    converted.graph.sort()
    return ir.to_proto(converted)


def _quantize(path: Path, calibration: np.ndarray) -> None:
    """onnxruntime static quantization: QDQ, int8 activations, per-channel int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 32)))

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared))
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)  # fmt: skip


def _calibration(config: ExportConfig, bundle: DataBundle | None, spec: Preprocess) -> np.ndarray | None:
    """`calib_size` preprocessed images: from `calib_data`, else the checkpoint's training split."""
    if config.precision != "int8":
        return None
    if config.calib_data:
        folder = Path(config.calib_data)
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise InputError(f"--calib-data {folder}: no images found")
        rng = np.random.default_rng(0)
        chosen = [files[i] for i in sorted(rng.permutation(len(files))[: config.calib_size])]
        return np.stack([preprocess_image(p, spec) for p in chosen])
    batches = iterate_batches(bundle.train, batch_size=64, preprocess=spec, device=torch.device("cpu"), shuffle=True)
    images, count = [], 0
    for x, _ in batches:
        images.append(x.numpy())
        count += len(x)
        if count >= config.calib_size:
            break
    return np.concatenate(images)[: config.calib_size]


def write_torchscript(model: nn.Module, spec: Preprocess, path: Path, *, precision: str, device: str) -> None:
    """Traced and frozen for inference; fp16 (CUDA) keeps float32 inputs and outputs."""
    module = copy.deepcopy(model).to(device).eval()
    if precision == "fp16":
        module = _Float32IO(module.half())
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(module, (_example_input(spec, device=device),)))
        torch.jit.save(traced, str(path))
