"""The exported formats, one module each, and the registry that finds them.

Every module of this package that assigns a `Format` instance to `FORMAT` is a format: adding a
format is adding one module (see `base.Format` and the README's "Architecture"). The registry is
what the rest of edgeft asks: which formats exist, which one a file is, which one a runtime runs.
Importing it imports the format modules, which import no runtime until one is used.
"""

from __future__ import annotations

import functools
import importlib
import os
import pkgutil
from pathlib import Path

from edgeft.errors import InputError
from edgeft.formats.base import Format, Rung, Runner, WriteRequest

__all__ = ["Format", "Rung", "Runner", "WriteRequest", "all_formats", "by_runtime", "for_path", "get", "names"]

_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")


@functools.cache
def all_formats() -> tuple[Format, ...]:
    """Every registered format, in listing order."""
    found = []
    for module in pkgutil.iter_modules(__path__):
        candidate = getattr(importlib.import_module(f"{__name__}.{module.name}"), "FORMAT", None)
        if isinstance(candidate, Format):
            found.append(candidate)
    return tuple(sorted(found, key=lambda f: (f.rank, f.name)))


def names() -> tuple[str, ...]:
    return tuple(f.name for f in all_formats())


def get(name: str) -> Format:
    """The format called `name`; an InputError listing the others for an unknown one."""
    for fmt in all_formats():
        if fmt.name == name:
            return fmt
    raise InputError(f"unknown format {name!r}; choose from {', '.join(names())}")


def by_runtime(runtime: str) -> Format:
    """The format whose files `runtime` runs."""
    for fmt in all_formats():
        if fmt.runtime == runtime:
            return fmt
    raise InputError(f"unknown runtime {runtime!r}; choose from {', '.join(f.runtime for f in all_formats())}")


def for_path(path: str | os.PathLike) -> Format:
    """The format of the file at `path`, from its name; anything else is an InputError."""
    name = Path(path).name.lower()
    for fmt in all_formats():
        if name.endswith(fmt.suffixes):
            return fmt
    for fmt in all_formats():  # a file that belongs to an artifact named by another (OpenVINO's .bin)
        for sibling in (Path(path).with_suffix(s) for s in fmt.suffixes):
            if sibling.is_file() and Path(path) in fmt.files(sibling) and Path(path) != sibling:
                raise InputError(f"{path}: part of the {fmt.title} file {sibling}; give that one")
    if name.endswith(_CHECKPOINT_SUFFIXES) and _looks_like_a_checkpoint(Path(path)):
        raise InputError(
            f"{path}: a PyTorch checkpoint or weights file, not an exported model; "
            f"turn it into one with `edgeft export {path}`"
        )
    suffixes = ", ".join(s for f in all_formats() for s in f.suffixes)
    raise InputError(f"{path}: not an exported model (expected {suffixes})")


def _looks_like_a_checkpoint(path: Path) -> bool:
    """torch.save writes a zip archive (or, in its legacy format, a pickle)."""
    if not path.is_file():  # never open a FIFO or a device: it may block
        return False
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith((b"PK\x03\x04", b"\x80"))
