"""Candidate files of one export, compared: the int8 fallback ladder's attempts and the
`--precision auto` decision (the fastest candidate that passes its gate). Each file is timed as
`edgeft bench` times a row, and as a user's own timing loop would see it: alone, in a fresh process,
with the runtime's default settings. Two sessions in one process would not be fair: the idle
one's spinning threads slowed the timed one up to 3x on 2 cores. The files take turns, round
after round, so every candidate sees the same load."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgeft import formats
from edgeft.artifact import read_metadata
from edgeft.errors import RunError
from edgeft.timing import run_measurement
from edgeft.validate import ValidationResult

__all__ = ["Attempt", "attempts_table", "choose_fastest", "time_files"]

_ROUNDS = 3  # when files are compared, each round times every file once, in its own process
_BUDGET_S = 1.0  # timed seconds per file, batch size and round (at least 5 runs)


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
    format: str = ""  # the format it was written in, where candidates of several are compared

    @classmethod
    def from_validation(cls, candidate: str, precision: str, validation: ValidationResult | None) -> Attempt:
        if validation is None:
            return cls(candidate, precision, None, None, True, "not validated")
        return cls(
            candidate, precision, validation.exported_acc, validation.acc_drop, validation.passed, validation.reason
        )

    def to_dict(self) -> dict:
        return asdict(self)


def time_files(
    paths: list[Path], *, batch_sizes: tuple[int, ...], device: str = "cpu", threads: int | None = None
) -> list[dict[int, float]]:
    """p50 latency in ms of each file at each batch size: the median of its rounds' p50s, each
    round timing every file in turn in a fresh process (one round for a single file), with
    `threads` intra-op threads (None: the runtime's default)."""
    specs = [_timing_spec(Path(path), batch_sizes, device, threads) for path in paths]
    rounds: list[list[dict[int, float]]] = [[] for _ in specs]
    for _ in range(_ROUNDS if len(specs) > 1 else 1):
        for spec, measured in zip(specs, rounds):
            result = run_measurement(spec, timeout=120 + 4 * _BUDGET_S * len(batch_sizes))
            if isinstance(result, str):
                raise RunError(f"{spec['file']}: could not be timed ({result})")
            measured.append({row["batch"]: row["p50_ms"] for row in result})
    return [{b: float(np.median([m[b] for m in measured])) for b in batch_sizes} for measured in rounds]


def _timing_spec(path: Path, batch_sizes: tuple[int, ...], device: str, threads: int | None) -> dict:
    """What `edgeft.timing` needs to run `path` as predict would: its runtime, input shape and
    threads."""
    preprocess = read_metadata(path)["preprocess"]
    return {
        "runtime": formats.for_path(path).runtime,
        "precision": "",
        "device": device,
        "threads": threads,
        "file": str(path),
        "batches": list(batch_sizes),
        "size": preprocess["size"],
        "channels": preprocess["channels"],
        "warmup": 3,
        "iterations": 200,
        "budget_s": _BUDGET_S,
    }


def choose_fastest(attempts: list[Attempt], *, force: bool = False) -> Attempt | None:
    """The passing attempt with the lowest batch-1 p50 (marked chosen); when none passed, with
    `force` the one that lost the least accuracy (then the fastest), else None."""
    timed = [a for a in attempts if a.p50_ms is not None]
    passed = [a for a in timed if a.passed]
    if passed:
        best = min(passed, key=lambda a: a.p50_ms)
    elif force and timed:
        best = min(timed, key=lambda a: (a.drop if a.drop is not None else float("inf"), a.p50_ms))
    else:
        return None
    best.chosen = True
    return best


def attempts_table(attempts: list[Attempt]) -> list[list[str]]:
    """Header and rows of the decision table: each candidate's accuracy, drop, p50s and result
    (kept, passed but slower, failed its gate, or not built, with the reason); a format column
    where candidates of several formats are compared."""
    batch = max((a.batch for a in attempts), default=1)
    several = len({a.format for a in attempts}) > 1
    chosen = next((a for a in attempts if a.chosen), None)
    rows = [[*(["format"] if several else []), "candidate", "accuracy", "drop", "p50 ms", f"p50 ms b{batch}", "result"]]
    for a in attempts:
        cells = [a.candidate, _pct(a.accuracy), _num(a.drop, ".2f"), _num(a.p50_ms, ".2f"), _num(a.p50_batch_ms, ".2f")]
        rows.append([*([a.format] if several else []), *cells, _result(a, chosen)])
    return rows


def _result(attempt: Attempt, chosen: Attempt | None) -> str:
    """Why a candidate was or was not kept, in a few words."""
    if attempt.chosen:
        return "kept" if attempt.passed else f"kept (--force), failed: {attempt.reason}"
    if not attempt.passed:
        return f"{'failed' if attempt.accuracy is not None else 'not built'}: {attempt.reason}"
    if attempt.accuracy is None:
        return attempt.reason  # not validated
    if chosen and chosen.p50_ms and attempt.p50_ms:
        return f"{attempt.p50_ms / chosen.p50_ms:.2f}x slower"
    return "passed"


def _pct(value: float | None) -> str:
    return "" if value is None else f"{100 * value:.2f} %"


def _num(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)
