"""ExecuTorch programs (.pte), run by ExecuTorch's runtime on the CPU through the XNNPACK delegate:
lowering (fp32, fp16, int8 PT2E), the edgeft metadata carried inside the file, its content
digest, and the runner.

`executorch` (an optional extra that imports torch, ~5 s) is imported only inside the functions
that write or run a program; reading the metadata and the digest needs neither.

File layout: an edgeft `.pte` is the ExecuTorch program, byte for byte as ExecuTorch wrote it,
followed by a trailer that the ExecuTorch runtime never reads (it addresses the program and its
segments by the offsets in the program's own header):

    <ExecuTorch program> <metadata JSON, UTF-8> <JSON length: uint64 little-endian> b"EDGEFTMD"

The content digest is the sha256 of the program bytes alone, so the metadata can be rewritten
(after validation) without changing it, and any change to the graph or the weights does.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import logging
import os
import re
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

from edgeft.errors import InputError
from edgeft.formats.base import Format, Rung, Runner, WriteRequest

__all__ = [
    "FORMAT",
    "MAX_BATCH",
    "ExecuTorchFormat",
    "delegation_summary",
    "load_pte_runner",
    "pte_content_digest",
    "read_pte_metadata",
    "write_pte",
    "write_pte_metadata",
]

MAX_BATCH = 32  # the program's batch dimension is dynamic in [1, MAX_BATCH]; the runner splits larger batches
_MAGIC = b"EDGEFTMD"
_TRAILER = 16  # JSON length (8 bytes) + magic (8 bytes)
_MAX_METADATA = 16 * 2**20
_PTE_IDENTIFIER = re.compile(rb"ET[0-9a-zA-Z]{2}")  # flatbuffer file identifier at bytes 4..8
_BOOKKEEPING_OPS = {"getitem", "sym_size"}  # graph plumbing, not computation


class ExecuTorchFormat(Format):
    name, title, suffixes, runtime = "executorch", "ExecuTorch", (".pte",), "executorch"
    precisions = ("fp32", "fp16", "int8")
    extra, needs, needs_to_write, rank = "executorch", ("executorch.runtime",), ("executorch.exir",), 20

    def unavailable(self, precision: str, device: str, *, write: bool = True) -> str | None:
        if device.startswith("cuda"):
            return "ExecuTorch runs on the CPU (XNNPACK); use --device cpu"
        return super().unavailable(precision, device, write=write)

    def int8_rungs(self, config) -> list:
        return [Rung("pt2e symmetric per-channel", config.calib_size)]  # XNNPACK's quantizer: one setting

    def write(self, request: WriteRequest, path: Path) -> dict:
        calibration = request.calibration(request.rung.calibration_size) if request.precision == "int8" else None
        delegation = write_pte(request.model, request.spec, path, precision=request.precision, calibration=calibration)
        return {"delegation": delegation}

    def read(self, path: Path) -> tuple[str | None, str]:
        return read_pte_metadata(path) or None, pte_content_digest(path)

    def write_metadata(self, path: Path, text: str) -> None:
        write_pte_metadata(path, text)

    def open(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runner:
        reason = self.unavailable("fp32", device, write=False)
        if reason:
            raise InputError(f"{path}: {reason}")
        infer, provider, shape = load_pte_runner(path, threads=threads or 0)
        return Runner(infer, provider, input_shape=shape)


FORMAT = ExecuTorchFormat()


def _calibration_batches(calibration: Iterable[np.ndarray] | np.ndarray, batch: int = 32) -> Iterable[np.ndarray]:
    """Float32 NCHW batches from an iterable of batches, or from one array of images."""
    if isinstance(calibration, np.ndarray):
        return (calibration[i : i + batch] for i in range(0, len(calibration), batch))
    return calibration


def _quantize_int8(module, example, dynamic, calibration):
    """PT2E post-training quantization for XNNPACK: symmetric int8, per-channel weights,
    observers fed the calibration batches one at a time."""
    import torch
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    if calibration is None:
        raise InputError("int8 ExecuTorch export needs calibration images")
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(torch.export.export(module, example, dynamic_shapes=dynamic).module(), quantizer)
    seen = 0
    with torch.no_grad():
        for batch in _calibration_batches(calibration):
            prepared(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
            seen += len(batch)
    if seen == 0:
        raise InputError("int8 ExecuTorch export: the calibration data is empty")
    return convert_pt2e(prepared)


def write_pte(model, spec, path: str | os.PathLike, *, precision: str, calibration=None) -> dict:
    """Lower `model` to an XNNPACK-delegated ExecuTorch program at `path` (float32 NCHW input with a
    dynamic batch in [1, MAX_BATCH], float32 logits). int8: PT2E quantization calibrated on
    `calibration` (an iterable of float32 NCHW batches, or one array). Returns the delegation
    summary (what runs inside and outside XNNPACK). The file has no metadata yet."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # an import-time deprecation notice
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    if precision not in ("fp32", "fp16", "int8"):
        raise InputError(f"ExecuTorch precision must be fp32, fp16 or int8, got {precision!r}")
    module = copy.deepcopy(model).float().eval()
    example = (torch.randn(2, spec.channels, spec.size, spec.size),)
    dynamic = ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)
    if precision == "int8":
        module = _quantize_int8(module, example, dynamic, calibration)
    elif precision == "fp16":
        from edgeft.models import Float32IO

        module = Float32IO(module.half())
    program = torch.export.export(module, example, dynamic_shapes=dynamic)
    # The fake convolution picks a CPU backend (NNPACK, oneDNN) by batch size and would narrow the
    # dynamic batch range to the example's side of that threshold; no convolution runs here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # oneDNN's TF32 note when its flags are set and restored
        with torch.backends.nnpack.flags(enabled=False), torch.backends.mkldnn.flags(enabled=False):
            edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    summary = delegation_summary(edge.exported_program().graph_module)
    Path(path).write_bytes(edge.to_executorch().buffer)
    return summary


def delegation_summary(graph_module) -> dict:
    """What a lowered graph runs inside the XNNPACK delegate and what it leaves to ExecuTorch's
    portable kernels: subgraph and node counts, and the operators outside by name and count."""
    from executorch.devtools.backend_debug import get_delegation_info

    info = get_delegation_info(graph_module)
    outside = {
        name: b.non_delegated
        for name, b in info.delegation_by_operator.items()
        if b.non_delegated and name not in _BOOKKEEPING_OPS
    }
    inside = sum(b.delegated for name, b in info.delegation_by_operator.items() if name not in _BOOKKEEPING_OPS)
    return {
        "backend": "XnnpackBackend",
        "delegated_subgraphs": info.num_delegated_subgraphs,
        "delegated_ops": inside,
        "outside_ops": sum(outside.values()),
        "outside_by_op": dict(sorted(outside.items())),
        "max_batch": MAX_BATCH,
    }


def _split(path: Path) -> tuple[int, str]:
    """(length of the ExecuTorch program, metadata text or '') of an edgeft .pte file."""
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8 or not _PTE_IDENTIFIER.fullmatch(head[4:8]):
            raise InputError(f"{path}: not an ExecuTorch program (.pte)")
        if size < 8 + _TRAILER:
            return size, ""
        f.seek(size - _TRAILER)
        tail = f.read(_TRAILER)
        length = int.from_bytes(tail[:8], "little")
        if tail[8:] != _MAGIC or length > min(_MAX_METADATA, size - 8 - _TRAILER):
            return size, ""
        program = size - _TRAILER - length
        f.seek(program)
        try:
            return program, f.read(length).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{path}: its edgeft metadata is not UTF-8 text") from None


def read_pte_metadata(path: str | os.PathLike) -> str:
    """The edgeft metadata text carried by a .pte file ('' when it has none)."""
    return _split(Path(path))[1]


def write_pte_metadata(path: str | os.PathLike, text: str) -> None:
    """Set (or replace) the metadata text of a .pte file in place; the program is not touched."""
    path = Path(path)
    program, _ = _split(path)
    data = text.encode("utf-8")
    if len(data) > _MAX_METADATA:
        raise InputError(f"{path}: metadata of {len(data)} bytes exceeds {_MAX_METADATA}")
    with path.open("r+b") as f:
        f.truncate(program)
        f.seek(program)
        f.write(data + len(data).to_bytes(8, "little") + _MAGIC)


def pte_content_digest(path: str | os.PathLike) -> str:
    """sha256 (hex) of the ExecuTorch program in a .pte file: graph and weights, not the metadata."""
    path = Path(path)
    remaining, _ = _split(path)
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while remaining:
            block = f.read(min(remaining, 1 << 20))
            digest.update(block)
            remaining -= len(block)
    return digest.hexdigest()


def set_threads(threads: int) -> None:
    """Size ExecuTorch's CPU thread pool (XNNPACK runs on it)."""
    from executorch.extension.pybindings import portable_lib

    if threads > 0 and portable_lib._threadpool_get_thread_count() != threads:
        portable_lib._unsafe_reset_threadpool(threads)


def load_pte_runner(
    path: str | os.PathLike, *, threads: int = 0
) -> tuple[Callable[[np.ndarray], np.ndarray], str, tuple[int, ...]]:
    """A function float32 NCHW batch -> float32 logits running a .pte through ExecuTorch's runtime
    on `threads` CPU threads (0: its default), batches above the program's maximum run in slices;
    what runs it; and the program's input shape (C, H, W)."""
    path = Path(path)
    _split(path)  # a readable .pte, or a one-line error
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)  # an import-time deprecation notice
    import torch
    from executorch.runtime import Runtime

    runtime = Runtime.get()
    # ExecuTorch's bindings write its native log to sys.stderr, with no switch to turn it off: CPU
    # probing and the thread count when its thread pool starts or is resized, and why a program
    # fails to load (re-raised below as one line). Swapping sys.stderr is process-wide, so it is
    # held only around these calls.
    with contextlib.redirect_stderr(io.StringIO()):
        set_threads(threads)
        try:
            method = runtime.load_program(path).load_method("forward")
        except (RuntimeError, ValueError) as exc:
            raise InputError(f"{path}: ExecuTorch cannot load it ({str(exc).splitlines()[0]})") from None
    max_batch, *program_shape = method.metadata.input_tensor_meta(0).sizes()

    def run(x: np.ndarray) -> np.ndarray:
        if list(x.shape[1:]) != program_shape:
            raise InputError(f"{path}: the program takes N x {program_shape} inputs, got {list(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        # outputs live in the program's planned memory: copy each before the next call
        outs = [
            method.execute((torch.from_numpy(x[i : i + max_batch]),))[0].numpy().copy()
            for i in range(0, len(x), max_batch)
        ]
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    backends = runtime.backend_registry.registered_backend_names
    return run, "executorch:xnnpack" if "XnnpackBackend" in backends else "executorch", tuple(program_shape)
