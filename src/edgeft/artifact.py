"""Exported files: the metadata document they carry (schema-checked) and the digest of their
model content, for every format alike. Torch-free at import: the predictor uses this module.

Each format (`edgeft.formats`) stores the document where it keeps metadata and computes the
sha256 of everything its runtime reads but the document, so writing the metadata after
validation leaves the digest as it was, and any change to the graph or the weights changes it.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from edgeft import formats, jsonio
from edgeft.config import PRECISIONS
from edgeft.errors import InputError
from edgeft.preprocess import Preprocess

__all__ = [
    "METADATA_FORMAT",
    "artifact_format",
    "check_digest",
    "check_outputs",
    "content_digest",
    "parse_metadata",
    "read_metadata",
    "write_metadata",
]

METADATA_FORMAT = "edgeft.export/2"


def artifact_format(path: str | os.PathLike) -> str:
    """The name of the format of the file at `path` (from its name); anything else is an InputError."""
    return formats.for_path(path).name


# --- the metadata document ----------------------------------------------------------------

_REQUIRED = {
    "format": str,
    "arch": str,
    "num_classes": int,
    "classes": list,
    "preprocess": dict,
    "precision": str,
    "input": dict,
    "output": dict,
    "content_sha256": str,
    "source_checkpoint": dict,
}


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
    wrong = [
        key
        for key, kind in _REQUIRED.items()
        if not isinstance(metadata.get(key), kind) or isinstance(metadata.get(key), bool)
    ]  # bool is an int
    if wrong:
        raise InputError(f"{source}: its edgeft metadata lacks or mistypes {', '.join(wrong)}; export the model again")
    if metadata["format"] != METADATA_FORMAT:
        raise InputError(f"{source}: metadata format {metadata['format']!r} is not {METADATA_FORMAT!r}; export again")
    classes = metadata["classes"]
    if not classes or not all(isinstance(c, str) for c in classes) or len(classes) != metadata["num_classes"]:
        raise InputError(f"{source}: its metadata needs {metadata['num_classes']} class names, got {len(classes)}")
    if not isinstance(metadata["source_checkpoint"].get("sha256"), str) or not isinstance(
        metadata.get("versions", {}), dict
    ):
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
    fmt = formats.for_path(path)
    if not path.is_file():
        raise InputError(f"{path} does not exist")
    text, digest = fmt.read(path)
    metadata = parse_metadata(text, path)
    if verify:
        check_digest(path, metadata, digest)
    return metadata


def check_digest(path: str | os.PathLike, metadata: dict, digest: str) -> None:
    """Refuse a file whose model content (`digest`) no longer matches the one recorded at export."""
    if digest != metadata["content_sha256"]:
        raise InputError(
            f"{path}: its model content was modified after export (digest mismatch); "
            f"do not use it, export the model again"
        )


def write_metadata(path: str | os.PathLike, metadata: dict) -> None:
    """Embed (or replace) the metadata document in an exported file, in place, without touching
    the model content (so `content_digest` is unchanged)."""
    path = Path(path)
    formats.for_path(path).write_metadata(path, jsonio.dumps(metadata, sort_keys=True))


def content_digest(path: str | os.PathLike) -> str:
    """sha256 of the model content of an exported file (graph and weights, not the metadata)."""
    path = Path(path)
    return formats.for_path(path).read(path)[1]


def check_outputs(logits: np.ndarray, classes: list[str], source: str | os.PathLike) -> np.ndarray:
    """Logits with one column per class name, or an InputError naming the disagreement."""
    if logits.ndim != 2 or logits.shape[1] != len(classes):
        raise InputError(
            f"{source}: the model gives [{logits.shape[-1]}] outputs but its metadata says "
            f"[{len(classes)}]; export it again"
        )
    return logits
