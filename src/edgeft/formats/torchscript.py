"""TorchScript files (.ts), run by torch.jit: fp32, and fp16 traced on CUDA (float32 inputs and
outputs). Writing and running need torch; reading the metadata and the digest need only zipfile.

A TorchScript file is a zip archive with one top-level folder. The metadata is its extra file
`extra/edgeft.json` (what `torch.jit.load(_extra_files={"edgeft.json": ...})` reads). The content
digest covers every other entry, so an archive the loader could read differently from the digest
is refused: entries outside the one folder, names its case-insensitive lookup could confuse, and
entries that inflate beyond what a model of the file's size holds. The debug tables (source
ranges naming files of the exporting machine) are removed when the file is written.
"""

from __future__ import annotations

import copy
import hashlib
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeft.errors import InputError
from edgeft.formats.base import Format, Runner, WriteRequest

__all__ = ["FORMAT", "TorchScriptFormat", "rewrite_archive"]

_METADATA_ENTRY = "extra/edgeft.json"  # read by torch.jit.load(_extra_files={"edgeft.json": ...})


class TorchScriptFormat(Format):
    name, title, suffixes, runtime = "torchscript", "TorchScript", (".ts", ".torchscript"), "torchscript"
    precisions = ("fp32", "fp16")
    cuda, rank = True, 10
    deployable = False  # runs inside PyTorch: not one of the edge runtimes `--format auto` compares

    def unavailable(self, precision: str, device: str, *, write: bool = True) -> str | None:
        if precision == "fp16" and not device.startswith("cuda"):
            return "fp16 TorchScript needs --device cuda"
        return super().unavailable(precision, device, write=write)

    def write(self, request: WriteRequest, path: Path) -> dict:
        """Traced and frozen for inference; fp16 keeps float32 inputs and outputs."""
        import torch

        from edgeft.models import Float32IO

        module = copy.deepcopy(request.model).to(request.device).eval()
        if request.precision == "fp16":
            module = Float32IO(module.half())
        example = torch.randn(2, request.spec.channels, request.spec.size, request.spec.size, device=request.device)
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
            warnings.simplefilter("ignore")  # TorchScript is deprecated upstream; tracing notes
            traced = torch.jit.freeze(torch.jit.trace(module, (example,)))
            torch.jit.save(traced, str(path))
        rewrite_archive(path, metadata=None)  # without the debug tables: they name this machine's files
        return {}

    def read(self, path: Path) -> tuple[str | None, str]:
        return _metadata_text(path), _digest(path)

    def write_metadata(self, path: Path, text: str) -> None:
        rewrite_archive(path, metadata=text.encode())

    def open(self, path: Path, *, device: str = "cpu", threads: int | None = None) -> Runner:
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if threads:
            torch.set_num_threads(threads)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(path), map_location=device)
        except Exception as exc:  # noqa: BLE001
            raise InputError(f"{path}: not a readable TorchScript file ({str(exc).splitlines()[0]})") from None

        def infer(batch: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                out = module(torch.from_numpy(np.ascontiguousarray(batch)).to(device))
                return out.float().cpu().numpy()

        return Runner(infer, f"torchscript:{device}")


FORMAT = TorchScriptFormat()


def _digest(path: Path) -> str:
    """sha256 over every entry's name and sha256 but the metadata's."""
    digest = hashlib.sha256()
    for name, blocks in _content(path):
        entry = hashlib.sha256()
        for block in blocks:
            entry.update(block)
        digest.update(name.encode() + b"\0" + entry.digest())
    return digest.hexdigest()


_TS_SLACK = 16 * 2**20  # bytes a TorchScript archive may inflate to beyond twice its own size
_MAX_METADATA = 16 * 2**20


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise InputError(f"{path}: not a readable TorchScript file ({exc})") from None


def _archive_entries(archive: zipfile.ZipFile, path: Path) -> dict[str, zipfile.ZipInfo]:
    """The entries of a TorchScript archive by name inside its one top-level folder, refused
    unless they are exactly what torch.jit.load reads: one folder (the loader reads only the
    first entry's), no two entries its case-insensitive lookup could confuse, and no more bytes
    than a model of the file's size holds (a deflated bomb is refused before it is inflated)."""
    infos = archive.infolist()
    prefixes = {info.filename.split("/", 1)[0] for info in infos}
    if len(prefixes) != 1 or any("/" not in info.filename for info in infos):
        raise InputError(
            f"{path}: a TorchScript archive has one top-level folder, this one has "
            f"{len(prefixes)}; modified after export, export the model again"
        )
    entries = {info.filename.split("/", 1)[1]: info for info in infos}
    if len({name.casefold() for name in entries}) != len(infos):
        raise InputError(f"{path}: duplicate entries in the archive; modified after export, export the model again")
    if sum(info.file_size for info in infos) > 2 * path.stat().st_size + _TS_SLACK:
        raise InputError(f"{path}: its entries inflate to more than a model of its size holds; refusing to read it")
    return entries


def _content(path: Path) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(name inside the archive folder, its data in blocks) of every entry but the edgeft
    metadata, sorted by name: everything the loader can read."""
    with _open_zip(path) as archive:
        entries = _archive_entries(archive, path)
        for name in sorted(entries):
            if name != _METADATA_ENTRY:
                yield name, _entry_blocks(archive, entries[name], path)


def _metadata_text(path: Path) -> str | None:
    with _open_zip(path) as archive:
        info = _archive_entries(archive, path).get(_METADATA_ENTRY)
        if info is None:
            return None
        if info.file_size > _MAX_METADATA:
            raise InputError(f"{path}: its edgeft metadata is over {_MAX_METADATA} bytes; export the model again")
        return b"".join(_entry_blocks(archive, info, path)).decode("utf-8", errors="replace")


def _entry_blocks(archive: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path) -> Iterator[bytes]:
    """An entry's bytes, 1 MiB at a time (never more than its recorded size)."""
    try:
        with archive.open(info) as entry:
            yield from iter(lambda: entry.read(1 << 20), b"")
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise InputError(f"{path}: damaged or modified after export ({exc}); export the model again") from None


def rewrite_archive(path: Path, *, metadata: bytes | None) -> None:
    """Rewrite a TorchScript archive in place without its debug tables (source ranges that name
    files of the exporting machine; the loader does without them) and with `metadata` as its
    edgeft extra file (None: the one it has, if any). Every other entry is copied byte for byte."""
    tmp = path.with_name(path.name + ".rewrite")
    try:
        with _open_zip(path) as source, zipfile.ZipFile(tmp, "w") as target:
            entries = _archive_entries(source, path)
            prefix = next(iter(source.infolist())).filename.split("/", 1)[0]
            for name, info in entries.items():
                if name.endswith(".debug_pkl") or (metadata is not None and name == _METADATA_ENTRY):
                    continue
                target.writestr(info, b"".join(_entry_blocks(source, info, path)), compress_type=info.compress_type)
            if metadata is not None:
                target.writestr(f"{prefix}/{_METADATA_ENTRY}", metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
