"""edgeft checkpoints: one `torch.save` of tensors and plain values, written atomically and
read back with `weights_only=True`."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import InputError
from edgeft.interrupts import atomic_write

__all__ = ["FORMAT", "load_checkpoint", "load_weights_only", "save_checkpoint"]

FORMAT = "edgeft.checkpoint/1"
_REQUIRED = ("arch", "num_classes", "in_chans", "classes", "preprocess", "state_dict")


def save_checkpoint(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write `content` (plus the format tag) to `path` with `atomic_write`: `path` is always
    either the old or the new complete file, also when SIGINT or SIGTERM arrives meanwhile."""
    path = Path(path)
    missing = [key for key in _REQUIRED if key not in content]
    if missing:
        raise ValueError(f"checkpoint content lacks {missing}")
    with atomic_write(path) as f:
        torch.save({"format": FORMAT, **content}, f)
    return path


def _unpickling_reason(exc: Exception) -> str:
    """The informative line of torch.load's (long) error message."""
    lines = [line.split("WeightsUnpickler error:")[-1].strip() for line in str(exc).splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if "unsupported" in line.lower():  # "Unsupported operand 103", "unsupported GLOBAL posix.system"
            return line
    return lines[0] if lines else type(exc).__name__


def _regular_file(path: Path) -> None:
    """Refuse a path that is not a regular file, saying what it is (never opening it: a FIFO
    would block)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"{path} does not exist") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{path} is a folder, not a checkpoint file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{path} is not a regular file (a pipe, socket or device), not a checkpoint file")


def load_weights_only(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load(weights_only=True)`; a missing file, a pickle that would run code, a truncated
    or foreign file raise InputError."""
    path = Path(path)
    _regular_file(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, non-PyTorch files
        raise InputError(f"{path}: not a weights-only PyTorch file ({_unpickling_reason(exc)})") from None


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an edgeft checkpoint; anything else raises InputError saying what it is."""
    path = Path(path)
    content = load_weights_only(path, map_location=map_location)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path}: not an edgeft checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [key for key in _REQUIRED if key not in content]
    if missing:
        raise InputError(f"{path}: incomplete edgeft checkpoint (missing {', '.join(missing)})")
    return content
