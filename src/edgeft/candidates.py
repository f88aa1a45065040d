"""Candidate files of one export, compared: the int8 fallback ladder's attempts and the
`--precision auto` decision (the fastest candidate that passes its gate). Timing runs the files
as `edgeft predict` does, interleaved in this process so every candidate sees the same load."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeft.artifact import open_runner
from edgeft.validate import ValidationResult

__all__ = ["Attempt", "attempts_table", "choose_fastest", "time_files"]

_ROUNDS = 10  # interleaved rounds; each runs every file once per batch size
_BUDGET_S = 10.0  # stop after this many seconds (after 3 rounds)


@dataclass
class Attempt:
    """One candidate file: how it was made, how it did at its gate, how fast it ran here."""

    candidate: str  # "fp32", "fp16", or "int8 <quantization settings>"
    precision: str
    accuracy: float | None  # the file's accuracy on the validation images
    drop: float | None  # accuracy drop against the checkpoint, in points
    passed: bool
    reason: str  # why its gate failed; empty when it passed
    p50_ms: float | None = None  # batch 1
    batch: int = 1  # the larger batch size timed
    p50_batch_ms: float | None = None  # at `batch`
    chosen: bool = False

    @classmethod
    def from_validation(cls, candidate: str, precision: str, validation: ValidationResult | None) -> Attempt:
        if validation is None:
            return cls(candidate, precision, None, None, True, "not validated")
        return cls(candidate, precision, validation.exported_acc, validation.acc_drop, validation.passed, validation.reason)

    def to_dict(self) -> dict:
        return asdict(self)


def time_files(paths: list[Path], *, batch_sizes: tuple[int, ...], device: str = "cpu") -> list[dict[int, float]]:
    """p50 latency in ms of each file at each batch size, measured in interleaved rounds."""
    runners = [open_runner(path, device=device) for path in paths]
    spec = runners[0].preprocess
    rng = np.random.default_rng(0)
    inputs = {b: rng.standard_normal((b, spec.channels, spec.size, spec.size), dtype=np.float32) for b in batch_sizes}
    for runner in runners:  # warm-up: first-run allocations are not timed
        for x in inputs.values():
            runner.logits(x)
    times: list[dict[int, list[float]]] = [{b: [] for b in batch_sizes} for _ in runners]
    deadline = time.perf_counter() + _BUDGET_S
    for round_ in range(_ROUNDS):
        if round_ >= 3 and time.perf_counter() > deadline:
            break
        for runner, measured in zip(runners, times):
            for b, x in inputs.items():
                start = time.perf_counter()
                runner.logits(x)
                measured[b].append(1000 * (time.perf_counter() - start))
    return [{b: float(np.median(ms)) for b, ms in measured.items()} for measured in times]


def choose_fastest(attempts: list[Attempt]) -> Attempt | None:
    """The passing attempt with the lowest batch-1 p50 (marked chosen), or None if none passed."""
    passed = [a for a in attempts if a.passed and a.p50_ms is not None]
    if not passed:
        return None
    best = min(passed, key=lambda a: a.p50_ms)
    best.chosen = True
    return best


def attempts_table(attempts: list[Attempt]) -> list[list[str]]:
    """Header and rows of the decision table (candidate, accuracy, drop, p50, passed)."""
    batch = max((a.batch for a in attempts), default=1)
    rows = [["candidate", "accuracy", "drop", "p50 ms", f"p50 ms b{batch}", "passed"]]
    for a in attempts:
        cells = [a.candidate + (" (kept)" if a.chosen else ""), _pct(a.accuracy), _num(a.drop, ".2f"),
                 _num(a.p50_ms, ".2f"), _num(a.p50_batch_ms, ".2f"), "yes" if a.passed else f"no: {a.reason}"]  # fmt: skip
        rows.append(cells)
    return rows


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
