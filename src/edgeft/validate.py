"""The accuracy gate: an exported file, run exactly as `edgeft predict` runs it, against the
checkpoint it came from, on real images.

The validation images (the files on disk for folder data, the stored uint8 images for embedded
and torchvision data) go through the preprocessing written in the file and the `Predictor` that
`edgeft predict` runs, whatever the format; the checkpoint sees the same images
through training's evaluation transform. Everything is streamed: memory is O(batch).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from edgeft.artifact import read_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.config import MAX_BATCH, MAX_WORKERS, check_max_acc_drop, check_range, check_threads
from edgeft.cpu import use_threads
from edgeft.data import DataBundle, TensorImages, iterate_batches, load_checkpoint_data
from edgeft.devices import torch_device
from edgeft.errors import InputError
from edgeft.models import model_from_checkpoint
from edgeft.predict import Predictor
from edgeft.preprocess import preprocess_image
from edgeft.progress import stage

__all__ = ["GATES", "ValidationResult", "file_sha256", "find_reference", "gate", "gate_for", "validate_file"]

log = logging.getLogger(__name__)

GATES = {"fp32": 0.0, "fp16": 0.1, "bf16": 0.5, "int8": 1.0}  # largest accuracy drop allowed, in points
FP32_MIN_AGREEMENT = 0.999  # fp32: the same top-1 on >= 99.9 % of the images
FP32_LOGIT_RTOL = 1e-3  # fp32: every |logit - reference| <= 1e-3 * max(1, |reference|)
FP32_PROB_ATOL = 1e-4  # fp32: every |softmax - reference softmax| <= 1e-4
_CHUNK = 8  # images decoded and compared at a time (rounded up to a multiple of the batch size)


@dataclass
class ValidationResult:
    """The comparison of an exported file with its reference, and the gate's verdict. Rates
    and differences are the worst over the batch sizes tried."""

    reference_acc: float
    exported_acc: float
    acc_drop: float  # reference - exported, in percentage points
    top1_agreement: float  # fraction of images with the same top-1 class
    top5_agreement: float  # fraction of images with the same set of top-5 classes
    max_abs_logit_diff: float
    max_rel_logit_diff: float  # max |Δlogit| / max(1, |reference logit|)
    max_prob_diff: float  # max |Δ softmax probability|
    mean_prob_diff: float  # mean over images of the largest |Δ probability|
    n_images: int
    batch_sizes: list[int]
    dataset: str  # the data's name (a folder's name, never its path)
    precision: str
    max_acc_drop: float  # the gate
    min_agreement: float  # the gate
    passed: bool
    reason: str  # why the gate failed; empty when it passed
    provider: str  # what ran the exported file
    notes: list[str] = field(default_factory=list)  # what the user should know, not a failure
    threads: int | None = None  # intra-op threads of the runtime and the checkpoint (None: their defaults)
    file: str = ""  # the exported file validated (as given), for `edgeft validate`
    reference: str = ""  # the checkpoint it was compared with (as found or given), for `edgeft validate`

    def to_dict(self) -> dict:
        """Every field; `file` and `reference` only where set (an export's record names no path)."""
        return {k: v for k, v in asdict(self).items() if v != "" or k not in ("file", "reference")}


def gate_for(precision: str, max_acc_drop: float | None = None) -> tuple[float, float]:
    """(largest accuracy drop in points, smallest top-1 agreement) for a precision."""
    drop = GATES[precision] if max_acc_drop is None else max_acc_drop
    return drop, FP32_MIN_AGREEMENT if precision == "fp32" and max_acc_drop is None else 0.0


class _Tally:
    """Streaming counts and worst differences of one batch size."""

    def __init__(self):
        self.n = self.correct = self.agree = self.agree5 = 0
        self.max_abs = self.max_rel = self.max_prob = self.sum_prob = 0.0

    def add(self, logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> None:
        top1, ref_top1 = logits.argmax(1), reference.argmax(1)
        k = min(5, logits.shape[1])
        top5 = np.sort(np.argsort(-logits, 1)[:, :k], 1)
        ref_top5 = np.sort(np.argsort(-reference, 1)[:, :k], 1)
        diff = np.abs(logits.astype(np.float64) - reference)
        prob_diff = np.abs(_softmax(logits) - _softmax(reference)).max(1)
        self.n += len(labels)
        self.correct += int((top1 == labels).sum())
        self.agree += int((top1 == ref_top1).sum())
        self.agree5 += int((top5 == ref_top5).all(1).sum())
        self.max_abs = max(self.max_abs, float(diff.max()))
        self.max_rel = max(self.max_rel, float((diff / np.maximum(1.0, np.abs(reference))).max()))
        self.max_prob = max(self.max_prob, float(prob_diff.max()))
        self.sum_prob += float(prob_diff.sum())


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(1, keepdims=True)


def spec_mismatches(metadata: dict, checkpoint: dict) -> list[str]:
    """How the file's own description of its model disagrees with the checkpoint's."""
    spec = checkpoint["preprocess"]
    reasons = [
        f"preprocess {key} is {metadata['preprocess'].get(key)!r} in the file, {value!r} in the checkpoint"
        for key, value in spec.items()
        if _plain(metadata["preprocess"].get(key)) != _plain(value)
    ]
    if list(metadata["classes"]) != list(checkpoint["classes"]):
        reasons.append(
            f"the class list differs from the checkpoint's ({metadata['classes']} vs {checkpoint['classes']})"
        )
    if metadata["arch"] != checkpoint["arch"]:
        reasons.append(f"arch is {metadata['arch']} in the file, {checkpoint['arch']} in the checkpoint")
    expected_input = ["batch", checkpoint["in_chans"], spec["size"], spec["size"]]
    if metadata["input"].get("shape") != expected_input:
        reasons.append(
            f"input shape is {metadata['input'].get('shape')} in the file, {expected_input} for the checkpoint"
        )
    return reasons


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def _chunks(bundle: DataBundle, chunk: int, spec, pool: ThreadPoolExecutor, skipped: list[str]):
    """(reference input on training's eval transform, labels, the same images through the file's
    preprocessing `spec`), chunk by chunk. Sources: the stored uint8 images of in-memory data, the
    files of folder data (a file that cannot be decoded is left out of both, and listed in `skipped`)."""
    split = bundle.val
    if isinstance(split, TensorImages):
        start = 0
        for x, y in iterate_batches(split, batch_size=chunk, preprocess=bundle.preprocess, device=torch.device("cpu")):
            sources = [Image.fromarray(a) for a in split.raw[start : start + len(y)]]
            yield x, y.numpy(), np.stack(list(pool.map(lambda s: preprocess_image(s, spec), sources)))
            start += len(y)
        return
    for start in range(0, len(split), chunk):
        pairs = list(
            pool.map(lambda i: _decode_both(split, i, spec, skipped), range(start, min(start + chunk, len(split))))
        )
        good = [pair for pair in pairs if pair is not None]
        if good:
            yield (
                torch.stack([x for x, _, _ in good]),
                np.array([y for _, y, _ in good]),
                np.stack([e for _, _, e in good]),
            )


def _decode_both(split, index: int, spec, skipped: list[str]):
    """(training's eval tensor, label, the file's own preprocessing) of one file, or None."""
    try:
        reference, label = split[index]
        return reference, label, preprocess_image(split.files[index][0], spec)
    except InputError as exc:
        skipped.append(str(exc))
        return None


def gate(
    path: str | os.PathLike,
    checkpoint: dict,
    bundle: DataBundle,
    *,
    model: torch.nn.Module | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
    max_acc_drop: float | None = None,
    device: str = "cpu",
    workers: int = 2,
    threads: int | None = None,
) -> ValidationResult:
    """Run the checkpoint (`model`, when already built from it) and the exported file at `path` (as
    `edgeft predict` runs it) on the validation split, the file at each of `batch_sizes`, and judge
    the result by its precision's gate. A file that disagrees with its checkpoint is not run: its
    inputs may not even fit."""
    metadata = read_metadata(path)  # refuses a file modified after export
    mismatches = spec_mismatches(metadata, checkpoint)
    tallies = {b: _Tally() for b in batch_sizes}
    reference_correct, provider, skipped = 0, "not run", []
    if not mismatches:
        runner = Predictor(path, device=device, threads=threads)
        reference = (model or model_from_checkpoint(checkpoint)).eval()
        with stage(f"gating the {metadata['precision']} file", total=len(bundle.val), unit="images") as advance:
            reference_correct = _compare(runner, reference, bundle, tallies, workers, skipped, advance)
        provider = runner.provider
    result = _verdict(
        tallies,
        reference_correct,
        mismatches,
        bundle=bundle,
        precision=metadata["precision"],
        provider=provider,
        max_acc_drop=max_acc_drop,
    )
    result.threads = threads
    if skipped:
        result.notes.append(
            f"{len(skipped)} validation file(s) could not be decoded and were left out, e.g. {skipped[0]}"
        )
    return result


def _compare(
    runner,
    reference: torch.nn.Module,
    bundle: DataBundle,
    tallies: dict[int, _Tally],
    workers: int,
    skipped: list[str],
    advance: Callable[[int], None],
) -> int:
    """Stream the validation split through both (`advance` counts the images); returns the
    reference's correct count."""
    reference_correct = 0
    biggest = max(tallies)
    chunk = -(-max(_CHUNK, biggest) // biggest) * biggest
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool, torch.inference_mode():
        for x, labels, inputs in _chunks(bundle, chunk, runner.preprocess, pool, skipped):
            ref_logits = reference(x).float().numpy()
            reference_correct += int((ref_logits.argmax(1) == labels).sum())
            for b, tally in tallies.items():
                logits = np.concatenate([runner.logits(inputs[i : i + b]) for i in range(0, len(inputs), b)])
                tally.add(logits, ref_logits, labels)
            advance(len(labels))
    return reference_correct


def _verdict(
    tallies: dict[int, _Tally],
    reference_correct: int,
    mismatches: list[str],
    *,
    bundle: DataBundle,
    precision: str,
    provider: str,
    max_acc_drop: float | None,
) -> ValidationResult:
    n = max(t.n for t in tallies.values())
    rate = lambda count: count / n if n else 0.0  # noqa: E731
    reference_acc = rate(reference_correct)
    exported_acc = min(rate(t.correct) for t in tallies.values())
    agreement = min(rate(t.agree) for t in tallies.values())
    worst = lambda name: max(getattr(t, name) for t in tallies.values())  # noqa: E731
    drop = 100.0 * (reference_acc - exported_acc)
    max_drop, min_agreement = gate_for(precision, max_acc_drop)
    reasons = list(mismatches)
    if n and drop > max_drop + 1e-9:
        reasons.append(f"accuracy dropped {drop:.2f} points (allowed {max_drop:g})")
    if n and agreement < min_agreement:
        reasons.append(f"top-1 agreement {agreement:.2%} is below {min_agreement:.1%}")
    if n and precision == "fp32" and max_acc_drop is None:
        if worst("max_rel") > FP32_LOGIT_RTOL:
            reasons.append(
                f"logits differ by up to {worst('max_rel'):.2g} x max(1, |logit|) (allowed {FP32_LOGIT_RTOL:g})"
            )
        if worst("max_prob") > FP32_PROB_ATOL:
            reasons.append(f"probabilities differ by up to {worst('max_prob'):.2g} (allowed {FP32_PROB_ATOL:g})")
    return ValidationResult(
        reference_acc=reference_acc,
        exported_acc=exported_acc,
        acc_drop=drop if n else 0.0,
        top1_agreement=agreement,
        top5_agreement=min(rate(t.agree5) for t in tallies.values()),
        max_abs_logit_diff=worst("max_abs"),
        max_rel_logit_diff=worst("max_rel"),
        max_prob_diff=worst("max_prob"),
        mean_prob_diff=max(t.sum_prob / t.n if t.n else 0.0 for t in tallies.values()),
        n_images=n,
        batch_sizes=sorted(tallies),
        dataset=Path(bundle.name).name,
        precision=precision,
        max_acc_drop=max_drop,
        min_agreement=min_agreement,
        passed=not reasons,
        reason="; ".join(reasons),
        provider=provider,
    )


def _return_large_frees_to_the_system() -> None:
    """glibc keeps freed blocks smaller than a threshold that grows with the largest block freed,
    so each chunk's activations would stay in the process; fixed at 1 MiB, they go back to the
    system and the peak stays flat however many images are validated."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: nothing to tune


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_reference(path: Path, metadata: dict) -> Path:
    """The checkpoint an exported file came from: runs/<run>/<file> here, or beside the folder
    the file lies in (exported/../runs/<run>/<file>)."""
    source = metadata["source_checkpoint"]
    run, name = source.get("run", ""), source.get("file", "")
    candidates = [Path("runs") / run / name, path.resolve().parent.parent / "runs" / run / name]
    for candidate in candidates:
        if run and name and candidate.is_file():
            return candidate
    raise InputError(f"{path}: its source checkpoint runs/{run}/{name} is not here; pass --reference CHECKPOINT")


def validate_file(
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    data: str | None = None,
    data_root: str | None = None,
    max_acc_drop: float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    workers: int = 2,
    threads: int | None = None,
) -> ValidationResult:
    """`edgeft validate`: the gate on an exported file, against the checkpoint it was exported
    from (found by its recorded run and file name) or `reference`; data as `gate` reads it."""
    check_range("--batch-size", batch_size, 1, MAX_BATCH)
    check_range("--workers", workers, 0, MAX_WORKERS)
    check_max_acc_drop(max_acc_drop)
    check_threads(threads)
    use_threads(threads)
    _return_large_frees_to_the_system()
    device = str(torch_device(device))  # auto resolved; an unusable CUDA device refused before any work
    path = Path(path)
    metadata = read_metadata(path)  # refuses a file modified after export
    checkpoint_path = Path(reference) if reference else find_reference(path, metadata)
    with stage(f"loading {checkpoint_path.name} and its data"):
        checkpoint = load_checkpoint(checkpoint_path)
        notes = []
        if file_sha256(checkpoint_path) != metadata["source_checkpoint"]["sha256"]:
            notes.append(f"{checkpoint_path} is not the checkpoint this file was exported from (its sha256 differs)")
        bundle = load_checkpoint_data(checkpoint, data=data, data_root=data_root)
        model = model_from_checkpoint(checkpoint)
    del checkpoint["state_dict"]  # the model holds the weights now: memory is the point here
    result = gate(
        path,
        checkpoint,
        bundle,
        model=model,
        batch_sizes=(1, batch_size),
        max_acc_drop=max_acc_drop,
        device=device,
        workers=workers,
        threads=threads,
    )
    result.notes += notes
    result.file, result.reference = str(path), str(checkpoint_path)
    return result
