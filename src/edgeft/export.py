"""Checkpoint -> self-describing exported files of any registered format (`edgeft.formats`): fp32,
fp16, int8, or the fastest file that passes (auto), each validated against the checkpoint and
kept only when it passes its accuracy gate. int8 that fails its gate tries the next setting of
its format's ladder. Nothing here is specific to one format: the formats write, the job seals
(metadata and digest), gates, times and keeps or removes."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from edgeft import __version__, formats
from edgeft.artifact import METADATA_FORMAT, content_digest, read_metadata, write_metadata
from edgeft.candidates import Attempt, choose_fastest, time_files
from edgeft.checkpoint import load_checkpoint
from edgeft.config import ExportConfig, candidate_formats
from edgeft.cpu import use_threads
from edgeft.data import DataBundle, iterate_batches, load_checkpoint_data
from edgeft.devices import torch_device
from edgeft.errors import InputError, RunError
from edgeft.interrupts import deferred_interrupts, remove_dead_temporaries, temporary_name
from edgeft.models import model_from_checkpoint
from edgeft.preprocess import Preprocess, first_images, image_files, preprocess_image
from edgeft.progress import stage
from edgeft.validate import ValidationResult, file_sha256, gate

__all__ = ["ExportConfig", "ExportResult", "ExportedFile", "export", "selected_formats"]

log = logging.getLogger(__name__)


@dataclass
class ExportedFile:
    path: str
    format: str
    precision: str
    size_bytes: int
    validation: ValidationResult | None
    kept: bool  # False: failed its gate and was removed
    attempts: list[Attempt] = field(default_factory=list)  # int8 ladder attempts, or auto's candidates
    delegation: dict | None = None  # what runs inside and outside the runtime's delegate (ExecuTorch: XNNPACK)


@dataclass
class ExportResult:
    files: list[ExportedFile] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(f.validation is None or f.validation.passed for f in self.files)


def selected_formats(config: ExportConfig) -> list[formats.Format]:
    """The formats to write (or, for a choice, to compare), after refusing combinations that cannot
    work: a format asked for by name is refused with the reason, one that `all` cannot write here
    is skipped with it; a choice's candidates that cannot be built become rows of its table."""
    chosen = candidate_formats(config)
    if _is_choice(config):
        _check_choice(config, chosen)
        return chosen
    kept = []
    for fmt in chosen:
        reason = fmt.unavailable("fp32" if config.precision == "auto" else config.precision, config.device)
        if reason is None:
            kept.append(fmt)
        elif config.format != "all":
            raise InputError(f"--format {fmt.name} --precision {config.precision}: {reason}")
        else:
            log.warning("skipping %s: %s", fmt.title, reason)
    return kept


def _is_choice(config: ExportConfig) -> bool:
    """Whether the export keeps the fastest of several gated candidates (one file) rather than
    writing each file asked for."""
    return config.format == "auto" or config.precision == "auto"


def _check_choice(config: ExportConfig, chosen: list[formats.Format]) -> None:
    if not config.validate:
        raise InputError(
            f"--format {config.format} --precision {config.precision} gates the candidates: drop --no-validate"
        )
    if config.format == "all":
        raise InputError("--precision auto keeps one file: use --format auto (every runtime) or one format, not all")
    if config.format != "auto" and "int8" not in chosen[0].precisions:
        raise InputError(
            f"--precision auto compares a format's float and int8 files; {chosen[0].title} writes no int8: "
            "use --format auto to compare runtimes"
        )


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
    for stale in remove_dead_temporaries(folder):
        log.info("removed %s, left by an export that did not finish", stale)
    return folder


def _versions(fmt: formats.Format) -> dict[str, str]:
    return {
        "edgeft": __version__,
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        **fmt.versions(),
    }


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
        "input": {
            "name": "input",
            "layout": "NCHW",
            "dtype": "float32",
            "shape": ["batch", spec.channels, spec.size, spec.size],
        },
        "output": {"name": "logits", "dtype": "float32", "shape": ["batch", checkpoint["num_classes"]]},
        "source_checkpoint": {"file": source.name, "run": source.resolve().parent.name, "sha256": file_sha256(source)},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def export(config: ExportConfig) -> ExportResult:
    """Write the requested files to `config.out`, each validated unless `config.validate` is off.
    A file that fails its gate is removed (or kept and marked failed with `config.force`); a file
    already at the destination is only replaced by one that passed or was forced."""
    chosen = selected_formats(config)
    torch_device(config.device)  # an unusable CUDA device is refused before any work
    use_threads(config.threads)
    source = Path(config.checkpoint)
    with stage(f"loading {source.name} and its data"):
        checkpoint = load_checkpoint(source)
        needs_data = config.validate or (config.precision in ("int8", "auto") and not config.calib_data)
        bundle = load_checkpoint_data(checkpoint, data=config.data, data_root=config.data_root) if needs_data else None
    out = _prepare_out(Path(config.out))
    stem = config.name or (source.resolve().parent.name or source.stem)
    job = _Job(config, checkpoint, model_from_checkpoint(checkpoint), bundle, _metadata(checkpoint, source, config))
    with _scratch(out / f"{temporary_name(stem)}.work") as job.workdir:
        if _is_choice(config):
            return ExportResult([job.write_auto(chosen, out, stem)])
        return ExportResult(
            [job.write(fmt, out / f"{_stem(stem, config.precision)}{fmt.suffixes[0]}") for fmt in chosen]
        )


@contextlib.contextmanager
def _scratch(folder: Path) -> Iterator[Path]:
    """A scratch folder for the formats' intermediate files, removed when the export ends (a
    killed export's is removed by the next one, as its other temporaries)."""
    folder.mkdir()
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _stem(stem: str, precision: str) -> str:
    return stem if precision == "fp32" else f"{stem}-{precision}"


@dataclass
class _Job:
    """One export's inputs, shared by the formats it writes."""

    config: ExportConfig
    checkpoint: dict
    model: nn.Module
    bundle: DataBundle | None
    metadata: dict
    workdir: Path = Path()

    @property
    def spec(self) -> Preprocess:
        return Preprocess.from_dict(self.checkpoint["preprocess"])

    def write(self, fmt: formats.Format, final: Path) -> ExportedFile:
        """Write one file beside `final` (int8: by its format's ladder), seal and gate it, and move
        it into place if kept."""
        precision, tmp = self.config.precision, _temporary(final)
        try:
            if precision == "int8":
                attempts, validation, extra = self._int8_ladder(fmt, tmp)
            else:
                attempts, extra = [], self._write_file(fmt, tmp, precision)
                validation = self._seal_and_gate(tmp, fmt, precision, extra)
            return self._place(fmt, tmp, final, precision, validation, attempts, extra.get("delegation"))
        finally:
            _remove(fmt, tmp)

    def write_auto(self, fmts: list[formats.Format], out: Path, stem: str) -> ExportedFile:
        """Every candidate (format, precision) of `fmts` that runs here, gated (int8: by its format's
        ladder), then timed side by side in fresh processes; the fastest that passed is kept, with
        the decision table (every row, those that could not be built included) in its metadata."""
        plan, rows = self._auto_plan(fmts)
        temps = {c: _temporary(out / f"{stem}{c[0].suffixes[0]}", f"{c[0].name}-{c[1]}") for c in plan}
        try:
            built: dict[tuple, tuple[Attempt, ValidationResult]] = {}  # candidate -> its finalist, its gate
            for number, (fmt, precision) in enumerate(plan, 1):
                log.info("candidate %d/%d: %s %s", number, len(plan), fmt.title, precision)
                attempts, validation = self._build_candidate(fmt, precision, temps[fmt, precision])
                rows += attempts
                if validation is not None:
                    built[fmt, precision] = (attempts[-1], validation)
            if not built:
                raise RunError("no candidate could be written here: " + "; ".join(a.reason for a in rows))
            finalists = [attempt for attempt, _ in built.values()]
            log.info("timing %d candidates side by side, each in its own process", len(finalists))
            self._time([temps[c] for c in built], finalists)
            chosen = choose_fastest(finalists, force=self.config.force)
            if chosen is None:  # nothing kept; the first candidate's gate is the failure shown
                (fmt, precision), (_, validation) = next(iter(built.items()))
                path = out / f"{_stem(stem, precision)}{fmt.suffixes[0]}"
                return ExportedFile(str(path), fmt.name, precision, 0, validation, False, rows)
            fmt, precision = next(c for c, (finalist, _) in built.items() if finalist is chosen)
            final = out / f"{_stem(stem, precision)}{fmt.suffixes[0]}"
            return self._place_chosen(fmt, temps[fmt, precision], final, chosen, rows)
        finally:
            for (fmt, _), tmp in temps.items():
                _remove(fmt, tmp)

    def _auto_plan(self, fmts: list[formats.Format]) -> tuple[list[tuple], list[Attempt]]:
        """The (format, precision) candidates to build, and a row for each that cannot be built here
        (its reason). fp16 is a candidate on CUDA only, where it pays."""
        device, asked = self.config.device, self.config.precision
        plan, rows = [], []
        for fmt in fmts:
            for precision in fmt.precisions:
                if asked not in ("auto", precision) or (precision == "fp16" and not device.startswith("cuda")):
                    continue
                reason = fmt.unavailable(precision, device)
                if reason is None:
                    plan.append((fmt, precision))
                else:
                    rows.append(Attempt(precision, precision, None, None, False, reason, format=fmt.name))
        if not plan:
            raise InputError(
                f"--format {self.config.format}: no candidate can be written here: {rows[0].reason}"
                if rows
                else f"--format {self.config.format}: no format writes {asked}"
            )
        return plan, rows

    def _build_candidate(
        self, fmt: formats.Format, precision: str, tmp: Path
    ) -> tuple[list[Attempt], ValidationResult | None]:
        """Write and gate one candidate (int8: its format's ladder; the last attempt is in `tmp`).
        A candidate its converter cannot write is a failed row with the reason, not a failed export."""
        try:
            if precision == "int8":
                attempts, validation, _ = self._int8_ladder(fmt, tmp)
            else:
                validation = self._seal_and_gate(tmp, fmt, precision, self._write_file(fmt, tmp, precision))
                attempts = [Attempt.from_validation(precision, precision, validation)]
        except Exception as exc:  # a converter's failure on this model: any exception type
            log.debug("%s %s could not be written", fmt.title, precision, exc_info=True)
            reason = (
                f"could not be written: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}"
            )
            attempts, validation = [Attempt(precision, precision, None, None, False, reason)], None
        for attempt in attempts:
            attempt.format = fmt.name
        return attempts, validation

    def _place_chosen(self, fmt, tmp: Path, final: Path, chosen: Attempt, attempts: list[Attempt]) -> ExportedFile:
        """Move the chosen candidate into place, its metadata carrying every candidate's row."""
        meta = read_metadata(tmp)
        _write_metadata(
            tmp, {**meta, "precision_auto": {"chosen": chosen.candidate, "candidates": [a.to_dict() for a in attempts]}}
        )
        validation = ValidationResult(**meta["validation"])
        return self._place(fmt, tmp, final, chosen.precision, validation, attempts, meta.get("delegation"))

    def _int8_ladder(self, fmt: formats.Format, tmp: Path) -> tuple[list[Attempt], ValidationResult | None, dict]:
        """Write `tmp` with each int8 setting of the format's ladder until one passes its gate;
        each attempt gated, timed and logged. `tmp` holds the last attempt."""
        rungs = fmt.int8_rungs(self.config)
        attempts: list[Attempt] = []
        tried = rungs if self.config.validate else rungs[:1]
        for k, rung in enumerate(tried, 1):
            with stage(f"int8 rung {k}/{len(tried)}: {rung.label()}"):
                extra = self._write_file(fmt, tmp, "int8", rung)
                validation = self._seal_and_gate(tmp, fmt, "int8", extra)
                attempt = Attempt.from_validation(f"int8 {rung.label()}", "int8", validation)
                self._time([tmp], [attempt])
            attempts.append(attempt)
            log.info("int8 attempt %d (%s): %s", len(attempts), rung.label(), _attempt_line(attempt))
            if attempt.passed:
                break
        return attempts, validation, extra

    def _time(self, paths: list[Path], attempts: list[Attempt]) -> None:
        batch_sizes = tuple(dict.fromkeys((1, self.config.batch_size)))
        with stage(f"timing {' and '.join(a.candidate for a in attempts)}"):
            timings = time_files(paths, batch_sizes=batch_sizes, device=self.config.device, threads=self.config.threads)
        for attempt, p50 in zip(attempts, timings):
            attempt.p50_ms, attempt.batch, attempt.p50_batch_ms = p50[1], batch_sizes[-1], p50[batch_sizes[-1]]

    def _write_file(self, fmt: formats.Format, tmp: Path, precision: str, rung=None) -> dict:
        """Write one file through its format; returns what its metadata adds."""
        request = formats.WriteRequest(
            self.model, self.spec, precision, self.config.device, self.config, self.workdir, rung, self._calibration
        )
        with stage(f"writing {fmt.title} {precision}"):
            return {"versions": _versions(fmt), **fmt.write(request, tmp)}

    def _calibration(self, count: int) -> Iterator[np.ndarray]:
        with stage("calibrating", total=count, unit="images") as advance:
            for batch in _calibration(self.config, self.bundle, self.spec, count):
                advance(len(batch))
                yield batch

    def _seal_and_gate(self, tmp: Path, fmt: formats.Format, precision: str, extra: dict) -> ValidationResult | None:
        """Write the metadata and content digest, then gate the file as `edgeft predict` reads it."""
        config = self.config
        meta = {**self.metadata, "precision": precision, "opset": None, **extra, "content_sha256": content_digest(tmp)}
        _write_metadata(tmp, meta)
        if not config.validate:
            return None
        validation = gate(
            tmp,
            self.checkpoint,
            self.bundle,
            model=self.model,
            device=config.device,
            batch_sizes=(1, config.batch_size),
            max_acc_drop=config.max_acc_drop,
            threads=config.threads,
        )
        _write_metadata(tmp, {**meta, "validation": validation.to_dict()})
        return validation

    def _place(
        self,
        fmt: formats.Format,
        tmp: Path,
        final: Path,
        precision: str,
        validation: ValidationResult | None,
        attempts: list[Attempt],
        delegation: dict | None,
    ) -> ExportedFile:
        """Move every file of the artifact into place (the one named last) when it is kept."""
        kept = validation is None or validation.passed or self.config.force
        size = sum(p.stat().st_size for p in fmt.files(tmp))
        if kept:
            fmt.replace(tmp, final)
        log.info("%s: %s", final, "kept" if kept else "removed, failed its gate")
        return ExportedFile(str(final), fmt.name, precision, size, validation, kept, attempts, delegation)


def _write_metadata(tmp: Path, metadata: dict) -> None:
    """Rewrite a temporary's metadata in one piece (a C++ writer meeting SIGINT halfway would
    turn it into an error): the interrupt is delivered after the write."""
    with deferred_interrupts():
        write_metadata(tmp, metadata)


def _temporary(final: Path, tag: str = "") -> Path:
    """A temporary beside `final` that `_prepare_out` can tell from a live export's."""
    label = f"{final.stem}-{tag}" if tag else final.stem
    return final.with_name(f"{temporary_name(label)}{final.suffix}")


def _remove(fmt: formats.Format, tmp: Path) -> None:
    for path in fmt.files(tmp):
        path.unlink(missing_ok=True)


def _attempt_line(a: Attempt) -> str:
    accuracy = "not validated" if a.accuracy is None else f"accuracy {100 * a.accuracy:.2f} % (drop {a.drop:.2f} pt)"
    verdict = "passed" if a.passed else f"failed: {a.reason}"
    return f"{accuracy}, p50 {a.p50_ms:.2f} ms at batch 1, {verdict}"


_CALIB_BATCH = 32


def _calibration(config: ExportConfig, bundle: DataBundle | None, spec: Preprocess, count: int) -> Iterator[np.ndarray]:
    """Batches of `count` preprocessed images in all, streamed: from `calib_data`, else the
    checkpoint's training split."""
    if config.calib_data:
        return _folder_batches(Path(config.calib_data), count, spec)
    batches = iterate_batches(
        bundle.train, batch_size=_CALIB_BATCH, preprocess=spec, device=torch.device("cpu"), shuffle=True
    )
    return first_images((x.numpy() for x, _ in batches), count)


def _folder_batches(folder: Path, count: int, spec: Preprocess) -> Iterator[np.ndarray]:
    files = image_files(folder)
    if not files:
        raise InputError(f"--calib-data {folder}: no images found")
    chosen = [files[i] for i in sorted(np.random.default_rng(0).permutation(len(files))[:count])]
    with ThreadPoolExecutor(max_workers=4) as pool:
        for start in range(0, len(chosen), _CALIB_BATCH):
            yield np.stack(list(pool.map(lambda p: preprocess_image(p, spec), chosen[start : start + _CALIB_BATCH])))
