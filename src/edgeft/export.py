"""Checkpoint -> self-describing ONNX / TorchScript / ExecuTorch files (fp32, fp16, int8, or the
fastest ONNX file that passes: auto), each validated against the checkpoint and kept only when it
passes its accuracy gate. ONNX int8 that fails its gate tries the next settings of the fallback
ladder."""

from __future__ import annotations

import copy
import datetime
import importlib.metadata
import logging
import os
import re
import shutil
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeft import __version__
from edgeft.artifact import (
    METADATA_FORMAT, check_external_data, content_digest, read_metadata, rewrite_torchscript, write_metadata,
)
from edgeft.candidates import Attempt, choose_fastest, time_files
from edgeft.checkpoint import load_checkpoint
from edgeft.config import ExportConfig
from edgeft.data import DataBundle, iterate_batches, load_checkpoint_data
from edgeft.devices import torch_device
from edgeft.errors import InputError, RunError
from edgeft.interrupts import deferred_interrupts
from edgeft.models import Float32IO, model_from_checkpoint
from edgeft.preprocess import Preprocess, image_files, preprocess_image
from edgeft.pte import write_pte
from edgeft.quantize import QuantSettings, default_settings, fallback_ladder, first_images, quantize_onnx
from edgeft.validate import ValidationResult, file_sha256, gate

__all__ = ["ExportConfig", "ExportResult", "ExportedFile", "export", "write_onnx", "write_torchscript"]

log = logging.getLogger(__name__)

_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "executorch": ".pte"}
_SINGLE_FILE_LIMIT = 2**31 - 2**26  # protobuf's 2 GiB, with room for the graph
_TEMP_TAG = "edgeft-tmp"  # temporaries are .<stem>.<pid>.edgeft-tmp<suffix>[.work], beside the final file


@dataclass
class ExportedFile:
    path: str
    format: str
    precision: str
    size_bytes: int
    validation: ValidationResult | None
    kept: bool  # False: failed its gate and was removed
    attempts: list[Attempt] = field(default_factory=list)  # int8 ladder attempts, or auto's candidates
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
    if config.precision == "auto" and (config.format != "onnx" or not config.validate):
        raise InputError("--precision auto gates and times ONNX candidates: use it with --format onnx and validation on")
    formats = ["onnx", "torchscript", "executorch"] if config.format == "all" else [config.format]
    if "executorch" in formats:
        _check_executorch(config, formats)
    on_cuda = config.device.startswith("cuda")
    ts_unsupported = config.precision == "int8" or (config.precision == "fp16" and not on_cuda)
    if "torchscript" in formats and ts_unsupported:
        why = "int8 is an ONNX and ExecuTorch precision" if config.precision == "int8" else "fp16 TorchScript needs --device cuda"
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
    for stale in folder.glob(f".*.{_TEMP_TAG}*"):
        owner = re.search(rf"\.(\d+)\.{_TEMP_TAG}", stale.name)
        if not (owner and _alive(int(owner.group(1)))):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
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
    needs_data = config.validate or (config.precision in ("int8", "auto") and not config.calib_data)
    bundle = load_checkpoint_data(checkpoint, data=config.data, data_root=config.data_root) if needs_data else None
    out = _prepare_out(Path(config.out))
    stem = config.name or (source.resolve().parent.name or source.stem)
    job = _Job(config, checkpoint, model_from_checkpoint(checkpoint), bundle, _metadata(checkpoint, source, config))
    if config.precision == "auto":
        return ExportResult([job.write_auto(out, stem)])
    return ExportResult([job.write(fmt, out / f"{_stem(stem, config.precision)}{_SUFFIX[fmt]}") for fmt in formats])


def _stem(stem: str, precision: str) -> str:
    return stem if precision == "fp32" else f"{stem}-{precision}"


def quant_settings(config: ExportConfig) -> QuantSettings:
    """This CPU's default int8 settings, with the ones `config` names instead."""
    chosen = {"activation_type": config.activation_type, "weight_type": config.weight_type, "format": config.quant_format,
              "reduce_range": config.reduce_range, "calibrate_method": config.calib_method}  # fmt: skip
    return replace(default_settings(), calibration_size=config.calib_size, **{k: v for k, v in chosen.items() if v is not None})


@dataclass
class _Job:
    """One export's inputs, shared by the formats it writes."""

    config: ExportConfig
    checkpoint: dict
    model: nn.Module
    bundle: DataBundle | None
    metadata: dict

    @property
    def spec(self) -> Preprocess:
        return Preprocess.from_dict(self.checkpoint["preprocess"])

    def write(self, fmt: str, final: Path) -> ExportedFile:
        """Write one file beside `final`, digest it, gate it, and move it into place if kept."""
        if fmt == "onnx" and self.config.precision == "int8":  # ExecuTorch int8: PT2E in one pass
            return self.write_int8(final)
        tmp = _temporary(final)
        try:
            extra = self._write_file(fmt, tmp, self.config.precision)
            validation = self._seal_and_gate(tmp, fmt, self.config.precision, extra)
            return self._place(tmp, final, self.config.precision, validation, delegation=extra.get("delegation"))
        finally:
            tmp.unlink(missing_ok=True)

    def write_int8(self, final: Path) -> ExportedFile:
        """int8 from the first settings of the fallback ladder that pass the gate."""
        tmp, source = _temporary(final), _temporary(final, "fp32-source")
        try:
            self._write_file("onnx", source, "fp32")
            attempts, validation = self._int8_ladder(source, tmp)
            return self._place(tmp, final, "int8", validation, attempts)
        finally:
            tmp.unlink(missing_ok=True)
            source.unlink(missing_ok=True)

    def write_auto(self, out: Path, stem: str) -> ExportedFile:
        """Every candidate that runs here (fp32, int8 by its ladder, fp16 on CUDA), gated and timed
        side by side; the fastest that passes is kept, with the decision table in its metadata."""
        precisions = ["fp32", "fp16"] if self.config.device.startswith("cuda") else ["fp32"]
        temps = {p: _temporary(out / f"{stem}.onnx", p) for p in (*precisions, "int8")}
        try:
            validations = {p: self._write_candidate(temps[p], p) for p in precisions}
            floats = [Attempt.from_validation(p, p, validations[p]) for p in precisions]
            int8_attempts, _ = self._int8_ladder(temps["fp32"], temps["int8"])
            finalists = {**dict(zip(precisions, floats)), "int8": int8_attempts[-1]}
            self._time([temps[p] for p in finalists], list(finalists.values()))  # side by side, same load
            chosen = choose_fastest(list(finalists.values()), force=self.config.force)
            if chosen is None:  # nothing kept; the fp32 gate's reason is the failure
                return ExportedFile(str(out / f"{stem}.onnx"), "onnx", "fp32", 0, validations["fp32"], False, floats + int8_attempts)
            final = out / f"{_stem(stem, chosen.precision)}.onnx"
            return self._place_chosen(temps[chosen.precision], final, chosen, floats + int8_attempts)
        finally:
            for tmp in temps.values():
                tmp.unlink(missing_ok=True)

    def _write_candidate(self, tmp: Path, precision: str) -> ValidationResult | None:
        self._write_file("onnx", tmp, precision)
        return self._seal_and_gate(tmp, "onnx", precision)

    def _place_chosen(self, tmp: Path, final: Path, chosen: Attempt, attempts: list[Attempt]) -> ExportedFile:
        """Move the chosen candidate into place, its metadata carrying every candidate's row."""
        meta = read_metadata(tmp)
        _write_metadata(tmp, {**meta, "precision_auto": {"chosen": chosen.candidate, "candidates": [a.to_dict() for a in attempts]}})
        validation = ValidationResult(**meta["validation"])
        return self._place(tmp, final, chosen.precision, validation, attempts)

    def _int8_ladder(self, source: Path, tmp: Path) -> tuple[list[Attempt], ValidationResult | None]:
        """Quantize `source` into `tmp` with each setting of the fallback ladder until one passes
        its gate; each attempt gated, timed and logged. `tmp` holds the last attempt."""
        first = quant_settings(self.config)
        ladder = [first, *fallback_ladder(first)] if self.config.fallback and self.config.validate else [first]
        attempts: list[Attempt] = []
        for settings in ladder:
            calibration = _calibration(self.config, self.bundle, self.spec, settings.calibration_size)
            summary = quantize_onnx(source, tmp, calibration=calibration, settings=settings,
                                    workdir=tmp.with_name(f"{tmp.name}.work"))  # fmt: skip
            _check_onnx(tmp, self.config.opset)
            validation = self._seal_and_gate(tmp, "onnx", "int8", {"quantization": {**_settings_dict(settings), "summary": summary.line()}})
            attempt = Attempt.from_validation(f"int8 {settings.label()}", "int8", validation)
            self._time([tmp], [attempt])
            attempts.append(attempt)
            log.info("int8 attempt %d (%s): %s", len(attempts), settings.label(), _attempt_line(attempt))
            if attempt.passed:
                break
        return attempts, validation

    def _time(self, paths: list[Path], attempts: list[Attempt]) -> None:
        batch_sizes = tuple(dict.fromkeys((1, self.config.batch_size)))
        for attempt, p50 in zip(attempts, time_files(paths, batch_sizes=batch_sizes, device=self.config.device)):
            attempt.p50_ms, attempt.batch, attempt.p50_batch_ms = p50[1], batch_sizes[-1], p50[batch_sizes[-1]]

    def _write_file(self, fmt: str, tmp: Path, precision: str) -> dict:
        """Write one float ONNX or TorchScript file, or an ExecuTorch program of any precision;
        returns what the file's metadata adds (ExecuTorch: its delegation and version)."""
        if fmt == "onnx":
            write_onnx(self.model, self.spec, tmp, opset=self.config.opset, precision=precision)
        elif fmt == "torchscript":
            write_torchscript(self.model, self.spec, tmp, precision=precision, device=self.config.device)
        else:
            calibration = _calibration(self.config, self.bundle, self.spec, self.config.calib_size) if precision == "int8" else None
            delegation = write_pte(self.model, self.spec, tmp, precision=precision, calibration=calibration)
            versions = {**self.metadata["versions"], "executorch": importlib.metadata.version("executorch")}
            return {"delegation": delegation, "versions": versions}
        return {}

    def _seal_and_gate(self, tmp: Path, fmt: str, precision: str, extra: dict | None = None) -> ValidationResult | None:
        """Write the metadata and content digest, then gate the file as `edgeft predict` reads it."""
        config = self.config
        meta = {**self.metadata, "precision": precision, "opset": config.opset if fmt == "onnx" else None, **(extra or {}),
                "content_sha256": content_digest(tmp)}  # fmt: skip
        _write_metadata(tmp, meta)
        if not config.validate:
            return None
        validation = gate(tmp, self.checkpoint, self.bundle, model=self.model, device=config.device,
                          batch_sizes=(1, config.batch_size), max_acc_drop=config.max_acc_drop)  # fmt: skip
        _write_metadata(tmp, {**meta, "validation": validation.to_dict()})
        return validation

    def _place(self, tmp: Path, final: Path, precision: str, validation: ValidationResult | None,
               attempts: list[Attempt] | None = None, delegation: dict | None = None) -> ExportedFile:  # fmt: skip
        kept = validation is None or validation.passed or self.config.force
        size = tmp.stat().st_size
        if kept:
            with deferred_interrupts():
                os.replace(tmp, final)
        log.info("%s: %s", final, "kept" if kept else "removed, failed its gate")
        return ExportedFile(str(final), _format_of(final), precision, size, validation, kept, attempts or [], delegation)


def _write_metadata(tmp: Path, metadata: dict) -> None:
    """Rewrite a temporary's metadata in one piece (a C++ writer meeting SIGINT halfway would
    turn it into an error): the interrupt is delivered after the write."""
    with deferred_interrupts():
        write_metadata(tmp, metadata)


def _temporary(final: Path, tag: str = "") -> Path:
    """A temporary beside `final` that `_prepare_out` can tell from a live export's."""
    label = f"{final.stem}-{tag}" if tag else final.stem
    return final.with_name(f".{label}.{os.getpid()}.{_TEMP_TAG}{final.suffix}")


def _format_of(path: Path) -> str:
    return next(fmt for fmt, suffix in _SUFFIX.items() if suffix == path.suffix)


def _settings_dict(settings: QuantSettings) -> dict:
    return {**asdict(settings), "keep_float": list(settings.keep_float), "op_types": list(settings.op_types)}


def _attempt_line(a: Attempt) -> str:
    accuracy = "not validated" if a.accuracy is None else f"accuracy {100 * a.accuracy:.2f} % (drop {a.drop:.2f} pt)"
    verdict = "passed" if a.passed else f"failed: {a.reason}"
    return f"{accuracy}, p50 {a.p50_ms:.2f} ms at batch 1, {verdict}"


def _example_input(spec: Preprocess, batch: int = 2, device: str = "cpu") -> torch.Tensor:
    return torch.randn(batch, spec.channels, spec.size, spec.size, device=device)


def write_onnx(model: nn.Module, spec: Preprocess, path: Path, *, opset: int, precision: str,
               calibration: Iterator[np.ndarray] | None = None, settings: QuantSettings | None = None) -> None:  # fmt: skip
    """fp32 export with a dynamic batch dimension, then fp16 conversion or int8 quantization
    (`settings`, default: this CPU's, calibrated on the `calibration` batches); always one
    self-contained file, checked with onnx.checker."""
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
    model = _without_provenance(onnx.load(str(path)))
    onnx.save(_to_fp16(model) if precision == "fp16" else model, str(path))
    if precision == "int8":
        quantize_onnx(path, path, calibration=calibration, settings=settings or default_settings())
    _check_onnx(path, opset)


def _check_onnx(path: Path, opset: int) -> None:
    """One self-contained file that onnx.checker accepts, at the opset asked for."""
    import onnx

    check_external_data(path)
    onnx.checker.check_model(str(path), full_check=True)
    written = {o.version for o in onnx.load(str(path), load_external_data=False).opset_import if o.domain in ("", "ai.onnx")}
    if written != {opset}:
        raise RunError(f"asked for opset {opset}, the exporter wrote {sorted(written)}")


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


_CALIB_BATCH = 32


def _calibration(config: ExportConfig, bundle: DataBundle | None, spec: Preprocess, count: int) -> Iterator[np.ndarray]:
    """Batches of `count` preprocessed images in all, streamed: from `calib_data`, else the
    checkpoint's training split."""
    if config.calib_data:
        return _folder_batches(Path(config.calib_data), count, spec)
    batches = iterate_batches(bundle.train, batch_size=_CALIB_BATCH, preprocess=spec, device=torch.device("cpu"), shuffle=True)
    return first_images((x.numpy() for x, _ in batches), count)


def _folder_batches(folder: Path, count: int, spec: Preprocess) -> Iterator[np.ndarray]:
    files = image_files(folder)
    if not files:
        raise InputError(f"--calib-data {folder}: no images found")
    chosen = [files[i] for i in sorted(np.random.default_rng(0).permutation(len(files))[:count])]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(chosen), _CALIB_BATCH):
            yield np.stack(list(pool.map(lambda p: preprocess_image(p, spec), chosen[start : start + _CALIB_BATCH])))


def write_torchscript(model: nn.Module, spec: Preprocess, path: Path, *, precision: str, device: str) -> None:
    """Traced and frozen for inference; fp16 (CUDA) keeps float32 inputs and outputs."""
    module = copy.deepcopy(model).to(device).eval()
    if precision == "fp16":
        module = Float32IO(module.half())
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.freeze(torch.jit.trace(module, (_example_input(spec, device=device),)))
        torch.jit.save(traced, str(path))
    rewrite_torchscript(path, metadata=None)  # without the debug tables: they name this machine's files
