"""What every exported format implements: the one protocol the rest of edgeft uses.

A format is a module of `edgeft.formats` that assigns an instance of a `Format` subclass to
`FORMAT`. It says what it is (name, suffixes, runtime, the extra it needs, the precisions it
writes, the export options it reads), whether a precision can be written and run on a device,
how to write a file from a model (int8 calibration included), how to read and write the
metadata document it carries and the digest of its model content, how to open a runner, and
the matrix products its runtime offers (`edgeft bench`'s peak per precision).
Everything else (the gate, sealing, keeping or removing, timing, prediction) is edgeft's and
the same for every format. Heavy libraries are imported inside the methods that need them.
"""

from __future__ import annotations

import abc
import contextlib
import importlib.metadata
import importlib.util
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeft.interrupts import deferred_interrupts

__all__ = ["Format", "Gemm", "GemmShapes", "Rung", "Runner", "WriteRequest", "quiet_native_output"]

log = logging.getLogger("edgeft.formats")


@dataclass(frozen=True)
class Rung:
    """One setting of an int8 ladder: what a failed gate tries next. Formats with richer
    settings (ONNX's `QuantSettings`) provide the same three members."""

    name: str = "default"
    calibration_size: int = 256

    def label(self) -> str:
        return self.name

    def to_dict(self) -> dict:
        return {"label": self.name, "calibration_size": self.calibration_size}


@dataclass
class WriteRequest:
    """What a format is given to write one file."""

    model: Any  # a torch.nn.Module in eval mode, float32
    spec: Any  # an edgeft.preprocess.Preprocess: the input the file takes: channels, size (NCHW, float32)
    precision: str
    device: str  # cpu or cuda[:N]: where the model is traced (fp16 TorchScript: cuda)
    config: Any  # the edgeft.config.ExportConfig; the options; a format reads only its own (`Format.options`)
    workdir: Path  # a scratch folder of this export, removed when it ends
    rung: Any = None  # int8: the ladder's setting (a `Rung`, or the format's own kind)
    calibration: Callable[[int], Iterator[np.ndarray]] | None = None  # int8: count -> float32 NCHW batches


@dataclass
class Runner:
    """An opened file: float32 NCHW batch in, float32 logits out. Shapes are (C, H, W) and
    (classes,) where the runtime reports them (None where it does not)."""

    infer: Callable[[np.ndarray], np.ndarray]
    provider: str  # what runs it, e.g. CPUExecutionProvider, executorch:xnnpack
    input_shape: tuple | None = None
    output_shape: tuple | None = None
    close: Callable[[], None] = field(default=lambda: None)


@dataclass(frozen=True)
class GemmShapes:
    """The sizes of the products a runtime builds for `edgeft bench`'s peak: n x n x n matrix
    products, and 3x3 convolutions (stride 1, padded) of (batch, channels in = out, side): the
    layers of ResNet's last two stages at 224 px, which some runtimes (OpenVINO) compute faster
    than a matrix product."""

    n: int = 2048
    convolutions: tuple[tuple[int, int, int], ...] = ((8, 256, 14), (8, 512, 7))

    def matmul_operations(self) -> int:
        return 2 * self.n**3

    @staticmethod
    def conv_operations(batch: int, channels: int, side: int) -> int:
        return 2 * batch * channels * channels * 9 * side * side

    @staticmethod
    def conv_label(batch: int, channels: int, side: int) -> str:
        return f"Conv 3x3 {channels} ch {side}x{side} x{batch}"


@dataclass
class Gemm:
    """One product as a runtime computes it, built and ready to time: a candidate of `edgeft
    bench`'s peak per precision."""

    label: str  # what it is, e.g. "MatMulInteger u8 x s8"
    run: Callable[[], object]  # one product, to completion
    operations: int  # per run: 2 per multiply-add


class Format(abc.ABC):
    """One exported format. Subclasses set the class attributes and implement the abstract
    methods; the others have defaults that fit one-file formats."""

    name: ClassVar[str]  # --format value and the metadata's "exported_format"
    title: ClassVar[str]  # how people write it: ONNX, TorchScript, ExecuTorch
    suffixes: ClassVar[tuple[str, ...]]  # the first is what export writes
    runtime: ClassVar[str]  # what runs it: edgeft bench's --runtimes value
    precisions: ClassVar[tuple[str, ...]]  # what it can write
    options: ClassVar[frozenset[str]] = frozenset()  # ExportConfig fields only this format reads
    extra: ClassVar[str | None] = None  # the pip extra that installs it (None: edgeft's own dependencies)
    extra_to_write: ClassVar[str | None] = None  # the extra that installs its writer, where that is another one
    needs: ClassVar[tuple[str, ...]] = ()  # modules needed to run a file (a missing one: install `extra`)
    needs_to_write: ClassVar[tuple[str, ...]] = ()  # modules needed to write one, besides `needs`
    cuda: ClassVar[bool] = False  # its runner can use a CUDA device
    torch_free: ClassVar[bool] = False  # opening and running a file imports no torch
    deployable: ClassVar[bool] = True  # an edge runtime: a candidate of `export --format auto`
    rank: ClassVar[int] = 50  # place in listings and in `--format all`
    gemm_precisions: ClassVar[tuple[str, ...]] = ()  # precisions of the CPU matrix products `gemms` builds

    def __repr__(self) -> str:
        return f"<format {self.name}>"

    # --- what runs where -------------------------------------------------------------------

    def missing(self, *, write: bool = False) -> str | None:
        """Why this format cannot be used here (its extra is not installed), or None."""
        modules = (*self.needs, *(self.needs_to_write if write else ()))
        absent = [m for m in modules if not _importable(m)]
        if not absent:
            return None
        name = (self.extra_to_write if write else None) or self.extra
        extra = f'pip install "edgeft[{name}]"' if name else 'pip install "edgeft"'
        return f"{self.title} needs {', '.join(absent)}, not installed here; install it: {extra}"

    def unavailable(self, precision: str, device: str, *, write: bool = True) -> str | None:
        """Why `precision` on `device` cannot be written (or only run, without `write`) here, in
        one line; None when it can."""
        if precision not in self.precisions:
            return f"{self.title} files are {', '.join(self.precisions)}, not {precision}"
        if device.startswith("cuda") and not self.cuda:
            return f"{self.title} files run on the CPU here; use --device cpu"
        return self.missing(write=write)

    def int8_rungs(self, config) -> list:
        """The int8 settings to try in order, each when the one before failed its gate."""
        return [Rung(calibration_size=config.calib_size)]

    def versions(self) -> dict[str, str]:
        """Versions of the libraries that write and run its files (recorded in the metadata)."""
        distributions = importlib.metadata.packages_distributions()  # module -> the package that installs it
        found = {}
        for module in dict.fromkeys(m.split(".")[0] for m in (*self.needs, *self.needs_to_write)):
            for package in distributions.get(module, [])[:1]:
                found[module] = importlib.metadata.version(package)
        return found

    def details(self) -> dict:
        """What a benchmark report records about its runtime here, besides the versions."""
        return {}

    def gemms(self, precision: str, shapes: GemmShapes, threads: int) -> list[Gemm]:
        """Its runtime's CPU products of `precision` (one of `gemm_precisions`) at `shapes` with
        `threads` threads, the weights constant as a model's: what `edgeft bench` takes the
        fastest of as the peak that rows of `precision` are divided by."""
        return []

    # --- files ------------------------------------------------------------------------------

    def files(self, path: Path) -> list[Path]:
        """Every file the artifact at `path` consists of (moved, kept or removed together)."""
        return [path]

    def replace(self, source: Path, target: Path) -> None:
        """Move every file of the artifact at `source` to `target` (in the same file system), all of
        them: an interrupt arriving meanwhile waits until they are in place."""
        with deferred_interrupts():
            for moved, place in zip(self.files(source), self.files(target)):
                os.replace(moved, place)

    @abc.abstractmethod
    def write(self, request: WriteRequest, path: Path) -> dict:
        """Write the model to `path` (no metadata yet); returns what the metadata adds."""

    @abc.abstractmethod
    def read(self, path: Path) -> tuple[str | None, str]:
        """(the metadata text, or None; the sha256 of the model content) of the file at `path`.
        The digest covers everything the runtime reads except the metadata."""

    @abc.abstractmethod
    def write_metadata(self, path: Path, text: str) -> None:
        """Embed (or replace) the metadata text, in place, leaving the content digest as it was."""

    @abc.abstractmethod
    def open(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runner:
        """The file opened for inference on `device` with `threads` (None: the runtime's default)."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def quiet_native_output() -> Iterator[None]:
    """Keep what converters print (progress bars, absl and C++ log lines, on stdout and stderr,
    from Python or native code) off the user's console; logged at INFO (`-v` shows it)."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink:
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            for fd, copy in zip((1, 2), saved):
                os.dup2(copy, fd)
                os.close(copy)
            sink.seek(0)
            printed = sink.read().decode("utf-8", "replace").strip()
            if printed:
                log.info("converter output:\n%s", printed)
