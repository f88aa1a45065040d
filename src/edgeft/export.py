"""Checkpoint -> self-describing ONNX / TorchScript / ExecuTorch files (fp32, fp16, int8), each
validated against the checkpoint and kept only when it passes its accuracy gate."""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeft import __version__
from edgeft.artifact import METADATA_FORMAT, check_external_data, content_digest, write_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.config import ExportConfig
from edgeft.data import DataBundle, iterate_batches, load_checkpoint_data
from edgeft.devices import torch_device
from edgeft.errors import InputError, RunError
from edgeft.models import model_from_checkpoint
from edgeft.preprocess import IMAGE_EXTENSIONS, Preprocess, preprocess_image
from edgeft.pte import write_pte
from edgeft.validate import ValidationResult, file_sha256, gate

__all__ = ["ExportConfig", "ExportResult", "ExportedFile", "export", "write_onnx", "write_torchscript"]

log = logging.getLogger(__name__)

_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "executorch": ".pte"}
_SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, with room for the graph
_TEMP_TAG = "edgeft-tmp"  # temporaries are .<stem>.<pid>.edgeft-tmp.<suffix>, beside the final file


@dataclass
class ExportedFile:
    path: str
    format: str
    precision: str
    size_bytes: int
    validation: ValidationResult | None
    kept: bool  # False: failed its gate and was removed
    delegation: dict | None = None  # ExecuTorch: what runs inside and outside the XNNPACK delegate


@dataclass
class ExportResult:
    files: list[ExportedFile] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.validation is None or f.validation.passed for f in self.files)


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torchvision

    modules = {"torch": torch, "torchvision": torchvision, "onnx": onnx, "onnxruntime": onnxruntime}
    return {"edgeft": __version__, **{name: str(module.__version__) for name, module in modules.items()}}


def _formats(config: ExportConfig) -> list[str]:
    """The formats to write, after refusing combinations that cannot work."""
    formats = ["onnx", "torchscript", "executorch"] if config.format == "all" else [config.format]
    if "executorch" in formats:
        _check_executorch(config, formats)
    on_cuda = config.device.startswith("cuda")
    ts_unsupported = config.precision == "int8" or (config.precision == "fp16" and not on_cuda)
    if "torchscript" in formats and ts_unsupported:
        why = "int8 is an ONNX (onnxruntime) precision" if config.precision == "int8" else "fp16 TorchScript needs --device cuda"
        if config.format == "torchscript":
            raise InputError(f"--format torchscript --precision {config.precision}: {why}")
        log.warning("skipping TorchScript: %s", why)
        formats.remove("torchscript")
    return formats


def _check_executorch(config: ExportConfig, formats: list[str]) -> None:
    """ExecuTorch needs its extra and runs on the CPU: refused when asked for by name, skipped in `all`."""
    from edgeft.pte import require_executorch

    why = "ExecuTorch files are lowered for and validated on the CPU (XNNPACK); use --device cpu"
    try:
        require_executorch()
        if config.device.startswith("cuda"):
            raise InputError(why)
    except InputError as exc:
        if config.format == "executorch":
            raise InputError(f"--format executorch: {exc}") from None
        log.warning("skipping ExecuTorch: %s", exc)
        formats.remove("executorch")


def _prepare_out(folder: Path) -> Path:
    """The output folder, created and writable, with temporaries of dead exports removed."""
    if folder.exists() and not folder.is_dir():
        raise InputError(f"--out {folder} is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {folder}: cannot create it ({exc.strerror or exc})") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"--out {folder} is not writable")
    for stale in folder.glob(f".*.{_TEMP_TAG}.*"):
        pid = stale.name.split(".")[-3]
        if not (pid.isdigit() and _alive(int(pid))):
            stale.unlink(missing_ok=True)
            log.info("removed %s, left by an export that did not finish", stale)
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _metadata(checkpoint: dict, source: Path, config: ExportConfig) -> dict:
    """The metadata every file of this export carries (no path of this machine in it)."""
    spec = Preprocess.from_dict(checkpoint["preprocess"])
    return {
        "format": METADATA_FORMAT,
        "arch": checkpoint["arch"],
        "num_classes": checkpoint["num_classes"],
        "classes": list(checkpoint["classes"]),
        "preprocess": spec.to_dict(),
        "precision": config.precision,
        "input": {"name": "input", "layout": "NCHW", "dtype": "float32", "shape": ["batch", spec.channels, spec.size, spec.size]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", checkpoint["num_classes"]]},
        "source_checkpoint": {"file": source.name, "run": source.resolve().parent.name, "sha256": file_sha256(source)},
        "versions": _versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def export(config: ExportConfig) -> ExportResult:
    """Write the requested files to `config.out`, each validated unless `config.validate` is off.
    A file that fails its gate is removed (or kept and marked failed with `config.force`); a file
    already at the destination is only replaced by one that passed or was forced."""
    formats = _formats(config)
    torch_device(config.device)  # an unusable CUDA device is refused before any work
    source = Path(config.checkpoint)
    checkpoint = load_checkpoint(source)
    needs_data = config.validate or (config.precision == "int8" and not config.calib_data)
    bundle = load_checkpoint_data(checkpoint, data=config.data, data_root=config.data_root) if needs_data else None
    out = _prepare_out(Path(config.out))
    stem = config.name or (source.resolve().parent.name or source.stem)
    if config.precision != "fp32":
        stem += f"-{config.precision}"
    job = _Job(config, checkpoint, model_from_checkpoint(checkpoint), bundle, _metadata(checkpoint, source, config))
    return ExportResult([job.write(fmt, out / f"{stem}{_SUFFIX[fmt]}") for fmt in formats])


@dataclass
class _Job:
    """One export's inputs, shared by the formats it writes."""

    config: ExportConfig
    checkpoint: dict
    model: nn.Module
    bundle: DataBundle | None
    metadata: dict

    def write(self, fmt: str, final: Path) -> ExportedFile:
        """Write one file beside `final`, digest it, gate it, and move it into place if kept."""
        config, spec = self.config, Preprocess.from_dict(self.checkpoint["preprocess"])
        tmp = final.with_name(f".{final.stem}.{os.getpid()}.{_TEMP_TAG}{final.suffix}")
        try:
            delegation = None
            if fmt == "onnx":
                write_onnx(self.model, spec, tmp, opset=config.opset, precision=config.precision,
                           calibration=_calibration(config, self.bundle, spec))  # fmt: skip
            elif fmt == "executorch":
                delegation = write_pte(self.model, spec, tmp, precision=config.precision,
                                       calibration=_calibration(config, self.bundle, spec))  # fmt: skip
            else:
                write_torchscript(self.model, spec, tmp, precision=config.precision, device=config.device)
            meta = {**self.metadata, "opset": config.opset if fmt == "onnx" else None, "content_sha256": content_digest(tmp)}
            if delegation is not None:
                meta["delegation"] = delegation
                meta["versions"] = {**meta["versions"], "executorch": importlib.metadata.version("executorch")}
            write_metadata(tmp, meta)  # the gate reads the file as `edgeft predict` will
            validation = None
            if config.validate:
                validation = gate(tmp, self.checkpoint, self.bundle, model=self.model, device=config.device,
                                  batch_sizes=(1, config.batch_size), max_acc_drop=config.max_acc_drop)  # fmt: skip
                write_metadata(tmp, {**meta, "validation": validation.to_dict()})
            kept = validation is None or validation.passed or config.force
            size = tmp.stat().st_size
            if kept:
                os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("%s: %s", final, "kept" if kept else "removed, failed its gate")
        return ExportedFile(str(final), fmt, config.precision, size, validation, kept, delegation)


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
    written = {o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise RunError(f"asked for opset {opset}, the exporter wrote {sorted(written)}")


def _to_fp16(model):
    """fp16 weights and compute behind float32 inputs and outputs (the casts the converter adds
    come last in the node list, so the graph is sorted again)."""
    import onnx_ir as ir
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = ir.from_proto(convert_float_to_float16(model, keep_io_types=True))
    converted.graph.sort()
    return ir.to_proto(converted)


def _quantize(path: Path, calibration: Iterator[np.ndarray]) -> None:
    """onnxruntime static quantization: QDQ, int8 activations, per-channel int8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def get_next(self):
            batch = next(calibration, None)
            return None if batch is None else {"input": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(path), str(prepared))
        quantize_static(str(prepared), str(path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8)  # fmt: skip


_CALIB_BATCH = 32


def _calibration(config: ExportConfig, bundle: DataBundle | None, spec: Preprocess) -> Iterator[np.ndarray] | None:
    """Batches of `calib_size` preprocessed images in all, streamed: from `calib_data`, else the
    checkpoint's training split."""
    if config.precision != "int8":
        return None
    if config.calib_data:
        return _folder_batches(Path(config.calib_data), config.calib_size, spec)
    batches = iterate_batches(bundle.train, batch_size=_CALIB_BATCH, preprocess=spec, device=torch.device("cpu"), shuffle=True)
    return _take(((x.numpy() for x, _ in batches)), config.calib_size)


def _folder_batches(folder: Path, count: int, spec: Preprocess) -> Iterator[np.ndarray]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise InputError(f"--calib-data {folder}: no images found")
    chosen = [files[i] for i in sorted(np.random.default_rng(0).permutation(len(files))[:count])]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(chosen), _CALIB_BATCH):
            yield np.stack(list(pool.map(lambda p: preprocess_image(p, spec), chosen[start : start + _CALIB_BATCH])))


def _take(batches: Iterator[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """The first `count` images of a stream of batches."""
    for batch in batches:
        yield batch[:count]
        count -= len(batch)
        if count <= 0:
            return


def write_torchscript(model: nn.Module, spec: Preprocess, path: Path, *, precision: str, device: str) -> None:
    """Traced and frozen for inference; fp16 (CUDA) keeps float32 inputs and outputs."""
    module = copy.deepcopy(model).to(device).eval()
    if precision == "fp16":
        module = _Float32IO(module.half())
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(module, (_example_input(spec, device=device),)))
        torch.jit.save(traced, str(path))
