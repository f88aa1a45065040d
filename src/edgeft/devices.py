"""The one parser of `--device`, shared by every command. Parsing is torch-free (the predictor
uses it); `torch_device` also checks that the device is usable here."""

from __future__ import annotations

import re

from edgeft.errors import InputError

__all__ = ["DEVICE_CHOICES", "cuda_index", "parse_device", "torch_device"]

DEVICE_CHOICES = "auto | cpu | cuda | cuda:N"
_PATTERN = re.compile(r"(auto|cpu|cuda)(:(\d+))?")


def parse_device(text: str, *, allow_auto: bool = True) -> str:
    """'auto', 'cpu', 'cuda' or 'cuda:N' (spaces and case ignored); anything else is an InputError."""
    name = str(text).strip().lower()
    match = _PATTERN.fullmatch(name)
    if not match or (match[2] and match[1] != "cuda") or (name == "auto" and not allow_auto):
        choices = DEVICE_CHOICES if allow_auto else DEVICE_CHOICES.replace("auto | ", "")
        raise InputError(f"--device {text!r} is not a device; use {choices}")
    return name


def cuda_index(name: str) -> int:
    """N of 'cuda:N' (0 for 'cuda')."""
    return int(name.split(":")[1]) if ":" in name else 0


def torch_device(text: str):
    """The torch.device for `text`: 'auto' is CUDA when usable, else CPU; a CUDA device that is
    not usable here is an InputError, never a silent fallback to the CPU."""
    import torch

    name = parse_device(text)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: CUDA is not usable here; use --device cpu or auto")
        if cuda_index(name) >= torch.cuda.device_count():
            raise InputError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    return torch.device(name)
