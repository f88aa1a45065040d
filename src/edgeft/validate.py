"""The accuracy gate: an exported file against its reference checkpoint, on real images."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgeft.artifact import load_runner, read_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.data import DataBundle, iterate_batches, load_checkpoint_data
from edgeft.errors import InputError
from edgeft.models import model_from_checkpoint

__all__ = ["GATES", "ValidationResult", "compare", "gate_for", "validate_file"]

log = logging.getLogger(__name__)

GATES = {"fp32": 0.0, "fp16": 0.1, "int8": 1.0}  # largest accuracy drop allowed, in points
FP32_MIN_AGREEMENT = 0.999  # fp32 must also give the same top-1 on >= 99.9 % of the images


@dataclass
class ValidationResult:
    """The comparison of an exported file with its reference, and the gate's verdict."""

    reference_acc: float
    exported_acc: float  # the lower of the batch sizes tried
    acc_drop: float  # reference - exported, in percentage points
    top1_agreement: float  # fraction of images with the same top-1 class (lowest over batch sizes)
    max_abs_logit_diff: float
    n_images: int
    batch_sizes: list[int]
    dataset: str
    precision: str
    max_acc_drop: float  # the gate
    min_agreement: float  # the gate
    passed: bool
    reason: str  # why the gate failed; empty when it passed
    provider: str  # what ran the exported file

    def to_dict(self) -> dict:
        return asdict(self)


def gate_for(precision: str, max_acc_drop: float | None = None) -> tuple[float, float]:
    """(largest accuracy drop in points, smallest top-1 agreement) for a precision."""
    drop = GATES[precision] if max_acc_drop is None else max_acc_drop
    return drop, FP32_MIN_AGREEMENT if precision == "fp32" and max_acc_drop is None else 0.0


def compare(
    run: Callable[[np.ndarray], np.ndarray],
    reference: nn.Module,
    bundle: DataBundle,
    *,
    precision: str,
    provider: str,
    max_acc_drop: float | None = None,
    batch_sizes: tuple[int, ...] = (1, 8),
) -> ValidationResult:
    """Run the reference (PyTorch, fp32) and `run` on the validation split, the latter at each of
    `batch_sizes`, and judge the result by the precision's gate."""
    device = torch.device("cpu")
    reference = reference.to(device).eval()
    inputs, labels, ref_logits = [], [], []
    with torch.inference_mode():
        for x, y in iterate_batches(bundle.val, batch_size=64, preprocess=bundle.preprocess, device=device):
            inputs.append(x.numpy())
            labels.append(y.numpy())
            ref_logits.append(reference(x).float().numpy())
    images, labels, ref_logits = np.concatenate(inputs), np.concatenate(labels), np.concatenate(ref_logits)
    ref_top1 = ref_logits.argmax(1)
    accuracies, agreements, max_diff = [], [], 0.0
    for batch_size in batch_sizes:
        logits = np.concatenate([run(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])
        top1 = logits.argmax(1)
        accuracies.append(float((top1 == labels).mean()))
        agreements.append(float((top1 == ref_top1).mean()))
        max_diff = max(max_diff, float(np.abs(logits - ref_logits).max()))
    reference_acc = float((ref_top1 == labels).mean())
    exported_acc, agreement = min(accuracies), min(agreements)
    drop = 100.0 * (reference_acc - exported_acc)
    max_drop, min_agreement = gate_for(precision, max_acc_drop)
    reasons = []
    if drop > max_drop + 1e-9:
        reasons.append(f"accuracy dropped {drop:.2f} points (allowed {max_drop:g})")
    if agreement < min_agreement:
        reasons.append(f"top-1 agreement {agreement:.2%} is below {min_agreement:.1%}")
    return ValidationResult(
        reference_acc=reference_acc,
        exported_acc=exported_acc,
        acc_drop=drop,
        top1_agreement=agreement,
        max_abs_logit_diff=max_diff,
        n_images=len(images),
        batch_sizes=list(batch_sizes),
        dataset=bundle.name,
        precision=precision,
        max_acc_drop=max_drop,
        min_agreement=min_agreement,
        passed=not reasons,
        reason="; ".join(reasons),
        provider=provider,
    )


def validate_file(
    path: str | os.PathLike,
    *,
    reference: str | os.PathLike | None = None,
    data: str | None = None,
    data_root: str | None = None,
    max_acc_drop: float | None = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> ValidationResult:
    """`edgeft validate`: compare an exported file with its checkpoint (the one it was exported
    from unless `reference` is given) on the checkpoint's validation split or `data`."""
    metadata = read_metadata(path)
    reference = reference or metadata.get("source_checkpoint", {}).get("path")
    if not reference or not Path(reference).is_file():
        raise InputError(f"{path}: its source checkpoint {reference} is not here; pass --reference CHECKPOINT")
    checkpoint = load_checkpoint(reference)
    if checkpoint["classes"] != metadata["classes"]:
        raise InputError(f"{reference} has other classes than {path}; pass the checkpoint it was exported from")
    bundle = load_checkpoint_data(checkpoint, data=data, data_root=data_root)
    run, provider = load_runner(path, device=device)
    return compare(
        run, model_from_checkpoint(checkpoint), bundle, precision=metadata["precision"], provider=provider,
        max_acc_drop=max_acc_drop, batch_sizes=(1, batch_size),
    )  # fmt: skip
