"""edgeft checkpoints: one `torch.save` of tensors and plain values, written atomically and
read back with `weights_only=True`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from edgeft.errors import InputError

__all__ = ["FORMAT", "load_checkpoint", "save_checkpoint"]

FORMAT = "edgeft.checkpoint/1"
_REQUIRED = ("arch", "num_classes", "in_chans", "classes", "preprocess", "state_dict")


def save_checkpoint(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """Write `content` (plus the format tag) to `path` through a temporary file in the same
    folder and `os.replace`, so `path` is always either the old or the new complete file."""
    path = Path(path)
    missing = [key for key in _REQUIRED if key not in content]
    if missing:
        raise ValueError(f"checkpoint content lacks {missing}")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **content}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read an edgeft checkpoint; anything else raises InputError saying what it is."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"checkpoint {path} does not exist")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickles with code, truncated files, non-PyTorch files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{path}: not a weights-only edgeft checkpoint ({reason})") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        found = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise InputError(f"{path}: not an edgeft checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [key for key in _REQUIRED if key not in content]
    if missing:
        raise InputError(f"{path}: incomplete edgeft checkpoint (missing {', '.join(missing)})")
    return content
