"""`Predictor`: an exported file and its runtime, opened by the file's format (`edgeft.formats`),
exactly as the gate and the bench open it. An ONNX file needs onnxruntime, numpy and Pillow,
nothing else, and never imports torch; TorchScript and ExecuTorch files import torch.

    from edgeft.predict import Predictor
    for p in Predictor("exported/resnet18-digits.onnx").predict(["img.png"]):
        print(p.file, p.top_k[0].label, p.top_k[0].prob)
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from edgeft import formats
from edgeft.artifact import check_digest, check_outputs, parse_metadata, read_metadata
from edgeft.config import MAX_BATCH, check_range
from edgeft.devices import parse_device
from edgeft.errors import InputError
from edgeft.preprocess import IMAGE_EXTENSIONS, MAX_PIXELS, FileScan, Preprocess, preprocess_image

__all__ = ["Label", "Prediction", "Predictor", "check_options", "collect_images", "gate_failure", "newest_model"]


@dataclass(frozen=True)
class Label:
    label: str
    index: int
    prob: float


@dataclass
class Prediction:
    """One image's top-k classes, or the reason it could not be read."""

    file: str
    top_k: list[Label] = field(default_factory=list)
    provider: str = ""
    error: str | None = None

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"file": self.file, "error": self.error}
        return {"file": self.file, "top_k": [asdict(label) for label in self.top_k], "provider": self.provider}


def newest_model(folder: str | os.PathLike = "exported") -> Path:
    """The most recently written usable file in `folder` of a format that runs without torch
    (ONNX): never a hidden file (export's temporaries are `.<name>.<pid>.edgeft-tmp.<suffix>`),
    one without readable edgeft metadata, one modified after export, or one kept with `--force`
    although it failed its accuracy gate."""
    folder = Path(folder)
    suffixes = tuple(suffix for fmt in formats.all_formats() if fmt.torch_free for suffix in fmt.suffixes)
    found = (
        {p: _mtime(p) for p in folder.iterdir() if p.name.lower().endswith(suffixes) and not p.name.startswith(".")}
        if folder.is_dir()
        else {}
    )
    failed: list[Path] = []
    for path in sorted(found, key=found.__getitem__, reverse=True):
        try:
            metadata = read_metadata(path)  # schema and content digest checked
        except InputError:
            continue
        if gate_failure(metadata) is None:
            return path
        failed.append(path)
    if failed:
        raise InputError(
            f"no --model given and every {'/'.join(suffixes)} file in {folder}/ failed its accuracy gate; "
            f"give --model {failed[0]} to use one anyway"
        )
    skipped = f" ({len(found)} unreadable or not exported by edgeft)" if found else ""
    raise InputError(
        f"no --model given and no usable {'/'.join(suffixes)} file in {folder}/{skipped}; run `edgeft export` first"
    )


def _mtime(path: Path) -> float:
    """When `path` was last written; -1 for one that vanished meanwhile (it is then skipped)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return -1.0


def gate_failure(metadata: dict) -> str | None:
    """Why the file failed the accuracy gate at export (it was kept with --force); None when it
    passed or was not validated."""
    validation = metadata.get("validation")
    if isinstance(validation, dict) and validation.get("passed") is False:
        return str(validation.get("reason") or "failed its accuracy gate")
    return None


def check_options(*, top_k: int, batch_size: int) -> None:
    """Refuse prediction options that cannot work, before any work starts."""
    check_range("--top-k", top_k, 1, 2**31)  # more than the classes: all of them
    check_range("--batch-size", batch_size, 1, MAX_BATCH)


def collect_images(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and the image files under each directory (sorted, recursively; by the
    rules of `FileScan`: no symlinked folder followed, no file twice). A directory without image
    files is kept as itself, so that it gets its own error."""
    files: list[Path] = []
    scan = FileScan()
    for item in map(Path, inputs):
        files += (scan.images(item) or [item]) if item.is_dir() else [item]
    scan.log_skipped("inputs")
    return files


class _PixelBudget:
    """Decoder threads together decode at most `limit` pixels at once (one image within the
    loader's limit always may), so a folder of large photos needs the memory of one."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0
        self.changed = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        with self.changed:
            self.changed.wait_for(lambda: self.used == 0 or self.used + pixels <= self.limit)
            self.used += pixels
        try:
            yield
        finally:
            with self.changed:
                self.used -= pixels
                self.changed.notify_all()


def _header_pixels(path: Path) -> int:
    """width x height from the file's header; 0 when it has none (the loader then says why)."""
    try:
        with Image.open(path) as img:
            return img.width * img.height
    except Exception:  # noqa: BLE001 - any unreadable file is refused by the loader itself
        return 0


def _preprocess_file(path: Path, spec: Preprocess, budget: _PixelBudget) -> np.ndarray:
    if path.is_dir():
        raise InputError(f"{path}: a folder with no image files ({', '.join(IMAGE_EXTENSIONS)})")
    pixels = _header_pixels(path)
    with budget.hold(pixels if pixels <= budget.limit else 0):  # over the limit: refused undecoded
        return preprocess_image(path, spec)


class Predictor:
    """An exported classifier: its preprocessing and classes come from the file's metadata, and
    its format opens it (`threads`: the runtime's; None: its default)."""

    def __init__(self, model: str | os.PathLike, *, device: str = "auto", threads: int | None = None):
        path = Path(model)
        if not path.is_file():
            raise InputError(f"model {path} does not exist")
        fmt = formats.for_path(path)
        device = parse_device(device)
        reason = fmt.unavailable("fp32", device, write=False) if device != "auto" else fmt.missing()
        if reason:
            raise InputError(f"{path}: {reason}")
        self.path, self.format = path, fmt
        text, digest = fmt.read(path)
        self.metadata = parse_metadata(text, path)
        check_digest(path, self.metadata, digest)
        self.gate_failure = gate_failure(self.metadata)  # set for a file kept with --force
        self.preprocess = Preprocess.from_dict(self.metadata["preprocess"])
        self.classes: list[str] = list(self.metadata["classes"])
        runner = fmt.open(path, device="cpu" if device == "auto" and not fmt.cuda else device, threads=threads)
        self._infer, self.provider = runner.infer, runner.provider
        self._check_io(runner)

    def _check_io(self, runner: formats.Runner) -> None:
        """The file's fixed input and output sizes agree with the metadata's preprocessing and classes."""
        spec = self.preprocess
        expected = {"input": [spec.channels, spec.size, spec.size], "output": [len(self.classes)]}
        actual = {"input": runner.input_shape, "output": runner.output_shape}
        for kind in expected:
            if actual[kind] is not None and any(
                isinstance(a, int) and a != e for a, e in zip(actual[kind], expected[kind])
            ):
                verb = "gives" if kind == "output" else "takes"
                raise InputError(
                    f"{self.path}: the model {verb} {list(actual[kind])} {kind}s but its metadata says "
                    f"{expected[kind]}; export it again"
                )

    def logits(self, batch: np.ndarray) -> np.ndarray:
        """Raw model output for a float32 NCHW batch that is already preprocessed."""
        return check_outputs(self._infer(batch), self.classes, self.path)

    def predict(self, images: Iterable[str | os.PathLike], *, top_k: int = 5, batch_size: int = 8) -> list[Prediction]:
        return list(self.predict_iter(images, top_k=top_k, batch_size=batch_size))

    def predict_iter(
        self, images: Iterable[str | os.PathLike], *, top_k: int = 5, batch_size: int = 8, decoders: int = 4
    ) -> Iterator[Prediction]:
        """Predictions in input order. Files are decoded by `decoders` threads ahead of the
        batch being inferred; an unreadable file yields a Prediction with `error` set."""
        check_options(top_k=top_k, batch_size=batch_size)
        k = min(top_k, len(self.classes))
        pool = ThreadPoolExecutor(max_workers=decoders)
        budget = _PixelBudget(MAX_PIXELS)
        try:
            pending: deque = deque()
            batch: list[tuple[str, np.ndarray]] = []
            for path in map(Path, images):
                pending.append((str(path), pool.submit(_preprocess_file, path, self.preprocess, budget)))
                while len(pending) > 2 * batch_size * decoders or (pending and pending[0][1].done()):
                    yield from self._take(pending.popleft(), batch, batch_size, k)
            while pending:
                yield from self._take(pending.popleft(), batch, batch_size, k)
            yield from self._run(batch, k)
        finally:  # on Ctrl-C or an early stop, images not started yet are not decoded
            pool.shutdown(wait=True, cancel_futures=True)

    def _take(self, item, batch: list, batch_size: int, k: int) -> Iterator[Prediction]:
        name, future = item
        try:
            batch.append((name, future.result()))
        except InputError as exc:
            yield from self._run(batch, k)  # keep the output in input order
            yield Prediction(file=name, error=str(exc))
            return
        if len(batch) >= batch_size:
            yield from self._run(batch, k)

    def _run(self, batch: list[tuple[str, np.ndarray]], k: int) -> Iterator[Prediction]:
        if not batch:
            return
        logits = self.logits(np.stack([array for _, array in batch]))
        probs = _softmax(logits)
        order = np.argsort(-probs, axis=1)[:, :k]
        for (name, _), row, top in zip(batch, probs, order):
            labels = [Label(self.classes[i], int(i), float(row[i])) for i in top]
            yield Prediction(file=name, top_k=labels, provider=self.provider)
        batch.clear()


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)
