"""Shared pieces of the benchmark suites: the machine description that goes into every saved result,
and the summary JSON a suite writes when it ends.

The suites here are collected only when `benchmarks/` is named on the command line (pyproject's
`testpaths` is `tests`), so `python -m pytest` never runs them.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest


def cpu_model() -> str:
    """The CPU's marketing name: /proc/cpuinfo on Linux, else platform.processor()."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_machine() -> dict:
    """CPU model, cores, OS, Python, torch and torchvision versions, torch threads, date (UTC)."""
    import torch
    import torchvision

    import edgeft

    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "edgeft": edgeft.__version__,
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def pytest_benchmark_update_machine_info(config, machine_info):  # noqa: ARG001 - pytest-benchmark hook
    """Name the machine in pytest-benchmark's own JSON too (`machine_info.edgeft_machine`)."""
    machine_info["edgeft_machine"] = describe_machine()


@pytest.fixture(scope="session")
def machine() -> dict:
    """The machine a benchmark ran on, for the summaries the suites write."""
    return describe_machine()


def _saved_summary(path: Path, summarize: Callable[[dict], dict], *, merge: bool = False) -> Iterator[dict]:
    """Yields a dict for the results of a suite's tests; when the suite ends, writes
    `summarize(results)` to `path` as indented JSON. With `merge`, always, over what the file holds
    already (a single test can be re-run); without, only when a test put something in."""
    results: dict = {}
    yield results
    if results or merge:
        saved = json.loads(path.read_text()) if merge and path.exists() else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**saved, **summarize(results)}, indent=2) + "\n")


@pytest.fixture(scope="session")
def saved_summary():
    """For a suite's module fixture: `yield from saved_summary(path, summarize, merge=False)`."""
    return _saved_summary


# The timing loop of the plain scripts that check `edgeft bench`: p50(run) in ms, the median of 30
# runs after 3 warm-up runs.
P50_SCRIPT = r"""
import statistics, time
def p50(run):
    for _ in range(3):
        run()
    times = []
    for _ in range(30):
        t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)
"""

ONNXRUNTIME_SCRIPT = (
    P50_SCRIPT
    + r"""
import json, sys
import numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
feed = session.get_inputs()[0]
x = np.random.default_rng(1).standard_normal([1, *feed.shape[1:]], dtype=np.float32)
print(json.dumps({"p50_ms": p50(lambda: session.run(None, {feed.name: x}))}))
"""
)


def independent_onnxruntime_p50(path: str | Path) -> float:
    """Batch-1 p50 in ms of an ONNX file timed by a plain onnxruntime script in a fresh process,
    with onnxruntime's default session options: how a user would check a reported number."""
    out = subprocess.run(
        [sys.executable, "-c", ONNXRUNTIME_SCRIPT, str(path)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["p50_ms"]
