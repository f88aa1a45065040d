"""Shared pieces of the benchmark suites: the machine description that goes into every saved result.

The suites here are collected only when `benchmarks/` is named on the command line (pyproject's
`testpaths` is `tests`), so `python -m pytest` never runs them.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform

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
