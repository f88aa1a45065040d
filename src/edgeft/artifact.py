"""Exported files: the metadata they carry (schema-checked), the digest of their model content,
their safety checks, and the runners that execute them. Torch-free at import: the predictor
uses this module.

The content digest is the sha256 of everything in the file except the edgeft metadata:
for ONNX every top-level field of the ModelProto but `metadata_props`, read from the protobuf
wire format; for TorchScript every archive entry but `extra/edgeft.json` (an archive the loader
could read differently from the digest is refused); for ExecuTorch the program bytes before the
metadata trailer (`edgeft.pte`). Writing the metadata after validation therefore leaves the
digest as it was, and any change to the graph or the weights changes it.
"""

from __future__ import annotations

import hashlib
import os
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from edgeft.config import PRECISIONS
from edgeft.errors import InputError
from edgeft.preprocess import Preprocess
from edgeft import jsonio

__all__ = [
    "METADATA_FORMAT", "METADATA_KEY", "TorchScriptRunner", "artifact_format", "check_external_data", "content_digest",
    "check_digest", "check_outputs", "onnx_metadata_and_digest", "open_runner", "rewrite_torchscript", "parse_metadata", "read_metadata", "write_metadata",
]  # fmt: skip

METADATA_KEY = "edgeft"  # ONNX metadata_props key; TorchScript extra file "edgeft.json"
METADATA_FORMAT = "edgeft.export/2"
_TS_METADATA_ENTRY = "extra/edgeft.json"  # read by torch.jit.load(_extra_files={"edgeft.json": ...})
_ONNX_METADATA_FIELD = 14  # ModelProto.metadata_props
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


def artifact_format(path: str | os.PathLike) -> str:
    """'onnx', 'torchscript' or 'executorch', from the file name; anything else is an InputError."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".pte":
        return "executorch"
    if suffix in (".ts", ".torchscript"):
        return "torchscript"
    if suffix in _CHECKPOINT_SUFFIXES and _looks_like_torch_save(path):
        raise InputError(f"{path}: a PyTorch checkpoint or weights file, not an exported model; "
                         f"turn it into one with `edgeft export {path}`")  # fmt: skip
    raise InputError(f"{path}: not an exported model (expected .onnx, .ts or .pte)")


def _looks_like_torch_save(path: str | os.PathLike) -> bool:
    """The file starts as torch.save writes: a zip archive, or a pickle (protocol 2+)."""
    if not Path(path).is_file():  # never opened: a FIFO would block
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == b"PK\x03\x04" or head[:1] == b"\x80"


# --- the metadata document ----------------------------------------------------------------

_REQUIRED = {
    "format": str, "arch": str, "num_classes": int, "classes": list, "preprocess": dict, "precision": str,
    "input": dict, "output": dict, "content_sha256": str, "source_checkpoint": dict,
}  # fmt: skip


def parse_metadata(text: str | bytes | None, source: str | os.PathLike) -> dict:
    """The metadata document, checked against the schema; a clear InputError when it is not one."""
    if not text:
        raise InputError(f"{source}: has no edgeft metadata (not exported by edgeft)")
    try:
        metadata = jsonio.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{source}: its edgeft metadata is not valid JSON ({exc}); export the model again") from None
    if not isinstance(metadata, dict):
        raise InputError(f"{source}: its edgeft metadata is a {type(metadata).__name__}, not an object; export again")
    wrong = [key for key, kind in _REQUIRED.items()
             if not isinstance(metadata.get(key), kind) or isinstance(metadata.get(key), bool)]  # bool is an int
    if wrong:
        raise InputError(f"{source}: its edgeft metadata lacks or mistypes {', '.join(wrong)}; export the model again")
    if metadata["format"] != METADATA_FORMAT:
        raise InputError(f"{source}: metadata format {metadata['format']!r} is not {METADATA_FORMAT!r}; export again")
    classes = metadata["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or len(classes) != metadata["num_classes"]:
        raise InputError(f"{source}: its metadata needs {metadata['num_classes']} class names, got {len(classes)}")
    if not isinstance(metadata["source_checkpoint"].get("sha256"), str) or not isinstance(metadata.get("versions", {}), dict):
        raise InputError(f"{source}: its metadata's source_checkpoint or versions is malformed; export the model again")
    validation = metadata.get("validation")
    if validation is not None and not (isinstance(validation, dict) and isinstance(validation.get("passed"), bool)):
        raise InputError(f"{source}: its metadata's validation record is malformed; export the model again")
    if metadata["precision"] not in PRECISIONS:
        raise InputError(f"{source}: unknown precision {metadata['precision']!r} in its metadata")
    try:
        Preprocess.from_dict(metadata["preprocess"])
    except InputError as exc:
        raise InputError(f"{source}: {exc}") from None
    except (TypeError, KeyError, ValueError) as exc:
        raise InputError(f"{source}: its preprocess metadata is not usable ({exc})") from None
    return metadata


def read_metadata(path: str | os.PathLike, *, verify: bool = True) -> dict:
    """The metadata embedded in an exported file; with `verify`, a file whose model content no
    longer matches the digest recorded at export is refused."""
    path = Path(path)
    fmt = artifact_format(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    if fmt == "onnx":
        text, digest = onnx_metadata_and_digest(path.read_bytes(), path)
    elif fmt == "executorch":
        from edgeft.pte import pte_content_digest, read_pte_metadata

        text, digest = read_pte_metadata(path), pte_content_digest(path)
    else:
        text, digest = _torchscript_metadata_text(path), content_digest(path)
    metadata = parse_metadata(text, path)
    if verify:
        check_digest(path, metadata, digest)
    return metadata


def check_digest(path: str | os.PathLike, metadata: dict, digest: str) -> None:
    """Refuse a file whose model content (`digest`) no longer matches the one recorded at export."""
    if digest != metadata["content_sha256"]:
        raise InputError(f"{path}: its model content was modified after export (digest mismatch); "
                         f"do not use it, export the model again")  # fmt: skip


def write_metadata(path: str | os.PathLike, metadata: dict) -> None:
    """Embed (or replace) the metadata document in an exported file, in place, without touching
    the model content (so `content_digest` is unchanged)."""
    path = Path(path)
    text = jsonio.dumps(metadata, sort_keys=True)
    if artifact_format(path) == "onnx":
        fields = [(n, raw) for n, raw in _onnx_fields(path.read_bytes(), path) if n != _ONNX_METADATA_FIELD]
        entry = _length_delimited(1, METADATA_KEY.encode()) + _length_delimited(2, text.encode())
        path.write_bytes(b"".join(raw for _, raw in fields) + _length_delimited(_ONNX_METADATA_FIELD, entry))
    elif artifact_format(path) == "executorch":
        from edgeft.pte import write_pte_metadata

        write_pte_metadata(path, text)
    else:
        rewrite_torchscript(path, metadata=text.encode())


# --- content digests ----------------------------------------------------------------------


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of the model content of an exported file (graph and weights, not the metadata)."""
    path = Path(path)
    if artifact_format(path) == "onnx":
        return onnx_metadata_and_digest(path.read_bytes(), path)[1]
    if artifact_format(path) == "executorch":
        from edgeft.pte import pte_content_digest

        return pte_content_digest(path)
    digest = hashlib.sha256()
    for name, blocks in _torchscript_content(path):
        entry = hashlib.sha256()
        for block in blocks:
            entry.update(block)
        digest.update(name.encode() + b"\0" + entry.digest())
    return digest.hexdigest()


def _varint(data: bytes, pos: int) -> tuple[int, int]:
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


def _onnx_fields(data: bytes | memoryview, source) -> Iterator[tuple[int, memoryview]]:
    """(field number, raw bytes including the tag) of each top-level field of a ModelProto."""
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


def onnx_metadata_and_digest(data: bytes, source: str | os.PathLike) -> tuple[str | None, str]:
    """(the edgeft metadata text or None, the content digest) of a serialized ONNX model, in one
    pass over its top-level fields (no onnx import: the predictor uses this)."""
    digest, text = hashlib.sha256(), None
    for number, raw in _onnx_fields(data, source):
        if number != _ONNX_METADATA_FIELD:
            digest.update(raw)
            continue
        entry = dict(_string_fields(_payload(raw, source), source))
        if bytes(entry.get(1, b"")) == METADATA_KEY.encode():
            text = bytes(entry.get(2, b"")).decode("utf-8", errors="replace")
    return text, digest.hexdigest()


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


def _string_fields(data, source) -> Iterator[tuple[int, bytes]]:
    for number, raw in _onnx_fields(data, source):
        yield number, _payload(raw, source)


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
        raise InputError(f"{path}: a TorchScript archive has one top-level folder, this one has "
                         f"{len(prefixes)}; modified after export, export the model again")  # fmt: skip
    entries = {info.filename.split("/", 1)[1]: info for info in infos}
    if len({name.casefold() for name in entries}) != len(infos):
        raise InputError(f"{path}: duplicate entries in the archive; modified after export, export the model again")
    if sum(info.file_size for info in infos) > 2 * path.stat().st_size + _TS_SLACK:
        raise InputError(f"{path}: its entries inflate to more than a model of its size holds; refusing to read it")
    return entries


def _torchscript_content(path: Path) -> Iterator[tuple[str, Iterator[bytes]]]:
    """(name inside the archive folder, its data in blocks) of every entry but the edgeft
    metadata, sorted by name: everything the loader can read."""
    with _open_zip(path) as archive:
        entries = _archive_entries(archive, path)
        for name in sorted(entries):
            if name != _TS_METADATA_ENTRY:
                yield name, _entry_blocks(archive, entries[name], path)


def _torchscript_metadata_text(path: Path) -> str | None:
    with _open_zip(path) as archive:
        info = _archive_entries(archive, path).get(_TS_METADATA_ENTRY)
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


def rewrite_torchscript(path: Path, *, metadata: bytes | None) -> None:
    """Rewrite a TorchScript archive in place without its debug tables (source ranges that name
    files of the exporting machine; the loader does without them) and with `metadata` as its
    edgeft extra file (None: the one it has, if any). Every other entry is copied byte for byte."""
    tmp = path.with_name(path.name + ".rewrite")
    try:
        with _open_zip(path) as source, zipfile.ZipFile(tmp, "w") as target:
            entries = _archive_entries(source, path)
            prefix = next(iter(source.infolist())).filename.split("/", 1)[0]
            for name, info in entries.items():
                if name.endswith(".debug_pkl") or (metadata is not None and name == _TS_METADATA_ENTRY):
                    continue
                target.writestr(info, b"".join(_entry_blocks(source, info, path)), compress_type=info.compress_type)
            if metadata is not None:
                target.writestr(f"{prefix}/{_TS_METADATA_ENTRY}", metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- safety checks and runners ------------------------------------------------------------


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


def _load_torchscript(path: Path, *, device: str):
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable TorchScript file ({str(exc).splitlines()[0]})") from None


class TorchScriptRunner:
    """A TorchScript file run the way `Predictor` runs an ONNX file: metadata checked, its own
    preprocessing, float32 NCHW in, logits out."""

    def __init__(self, path: str | os.PathLike, *, device: str = "cpu"):
        self.path = Path(path)
        self.metadata = read_metadata(self.path)
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])
        self.classes: list[str] = list(self.metadata["classes"])
        self.device = device
        self.module = _load_torchscript(self.path, device=device)
        self.provider = f"torchscript:{device}"

    def logits(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            out = self.module(torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)).float().cpu().numpy()
        return check_outputs(out, self.classes, self.path)


def check_outputs(logits: np.ndarray, classes: list[str], source: str | os.PathLike) -> np.ndarray:
    """Logits with one column per class name, or an InputError naming the disagreement."""
    if logits.ndim != 2 or logits.shape[1] != len(classes):
        raise InputError(f"{source}: the model gives [{logits.shape[-1]}] outputs but its metadata says "
                         f"[{len(classes)}]; export it again")  # fmt: skip
    return logits


def open_runner(path: str | os.PathLike, *, device: str = "cpu"):
    """What `edgeft predict` would run for this file: a `Predictor` (ONNX through onnxruntime,
    .pte through ExecuTorch) or a `TorchScriptRunner`; each has .metadata, .preprocess, .classes,
    .provider and .logits()."""
    if artifact_format(path) in ("onnx", "executorch"):
        from edgeft.predict import Predictor

        return Predictor(path, device=device)
    return TorchScriptRunner(path, device=device)
