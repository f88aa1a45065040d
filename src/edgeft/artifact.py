"""Exported files: their embedded metadata, their safety checks, and running them on arrays."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

from edgeft.errors import InputError

__all__ = ["METADATA_KEY", "artifact_format", "check_external_data", "load_runner", "read_metadata", "write_metadata"]

METADATA_KEY = "edgeft"  # ONNX metadata_props key; TorchScript extra file "edgeft.json"
_TS_EXTRA = "edgeft.json"


def artifact_format(path: str | os.PathLike) -> str:
    """'onnx' or 'torchscript', from the file name; anything else is an InputError."""
    suffix = Path(path).suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".ts", ".pt", ".torchscript"):
        return "torchscript"
    raise InputError(f"{path}: not an exported model (expected .onnx or .ts)")


def check_external_data(path: str | os.PathLike) -> None:
    """Refuse an ONNX file whose external tensor data lives outside the file's own folder."""
    _refuse_outside_data(_load_onnx(Path(path)), Path(path))


def _refuse_outside_data(model, path: Path) -> None:
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    folder = path.resolve().parent
    for tensor in _get_all_tensors(model):
        if uses_external_data(tensor):
            location = ExternalDataInfo(tensor).location
            if os.path.isabs(location) or not (folder / location).resolve().is_relative_to(folder):
                raise InputError(f"{path}: external data {location!r} points outside {folder}; refusing to read it")


def _load_onnx(path: Path):
    import onnx

    if not path.is_file():
        raise InputError(f"{path} does not exist")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf decode errors of every kind
        raise InputError(f"{path}: not a readable ONNX file ({exc})") from None


def read_metadata(path: str | os.PathLike) -> dict:
    """The edgeft metadata document embedded in an exported file."""
    path = Path(path)
    if artifact_format(path) == "onnx":
        model = _load_onnx(path)
        _refuse_outside_data(model, path)
        props = {p.key: p.value for p in model.metadata_props}
        text = props.get(METADATA_KEY)
    else:
        text = _load_torchscript(path, extra=True)[1]
    if not text:
        raise InputError(f"{path}: has no edgeft metadata (not exported by edgeft)")
    return json.loads(text)


def write_metadata(path: str | os.PathLike, metadata: dict) -> None:
    """Embed (or replace) the metadata document in an exported file, in place."""
    path = Path(path)
    text = json.dumps(metadata, sort_keys=True)
    if artifact_format(path) == "onnx":
        import onnx

        model = onnx.load(str(path))
        del model.metadata_props[:]
        onnx.helper.set_model_props(model, {METADATA_KEY: text})
        onnx.save(model, str(path))
    else:
        import torch

        module, _ = _load_torchscript(path, extra=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated upstream
            torch.jit.save(module, str(path), _extra_files={_TS_EXTRA: text})


def _load_torchscript(path: Path, *, extra: bool, device: str = "cpu"):
    import torch

    if not path.is_file():
        raise InputError(f"{path} does not exist")
    files = {_TS_EXTRA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=files)
    except Exception as exc:  # noqa: BLE001
        raise InputError(f"{path}: not a readable TorchScript file ({str(exc).splitlines()[0]})") from None
    value = files[_TS_EXTRA]
    return module, value.decode() if isinstance(value, bytes) else value


def load_runner(path: str | os.PathLike, *, device: str = "cpu") -> tuple[Callable[[np.ndarray], np.ndarray], str]:
    """A function float32 NCHW batch -> float32 logits for an exported file, and what runs it."""
    path = Path(path)
    if artifact_format(path) == "onnx":
        import onnxruntime as ort

        check_external_data(path)
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.startswith("cuda") else ["CPUExecutionProvider"]
        session = ort.InferenceSession(str(path), providers=providers)
        name = session.get_inputs()[0].name
        return (lambda x: session.run(None, {name: x})[0]), session.get_providers()[0]
    import torch

    module, _ = _load_torchscript(path, extra=False, device=device)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(device)).float().cpu().numpy()

    return run, f"torchscript:{device}"
