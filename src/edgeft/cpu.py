"""What the CPU that runs can do: the instruction-set features that kernel choices (int8 types,
bf16 autocast) depend on, detected here and recorded with every benchmark result. Torch-free."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

__all__ = ["FEATURES", "cpu_description", "cpu_features", "has_bf16", "has_vnni", "load_note", "use_threads"]

# The flags (as Linux names them in /proc/cpuinfo) that change which kernels are fastest.
FEATURES = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_features() -> dict[str, bool]:
    """Each of FEATURES: present on this CPU or not (all False where they cannot be read)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return {name: name in flags for name in FEATURES}


def has_vnni() -> bool:
    """int8 dot products in one instruction (AVX-512 VNNI or AVX-VNNI)."""
    features = cpu_features()
    return features["avx512_vnni"] or features["avx_vnni"] or features["amx_int8"]


def has_bf16() -> bool:
    """Native bf16 arithmetic (AVX-512 BF16 or AMX)."""
    features = cpu_features()
    return features["avx512_bf16"] or features["amx_bf16"]


def cpu_description() -> dict:
    """Model name, logical cores and the feature flags: the CPU part of every saved result."""
    model = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    return {"cpu": model, "cores": os.cpu_count(), "features": [name for name, on in cpu_features().items() if on]}


def use_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: keep its default); returns the number it uses."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> float | None:
    """The 1-minute load average (None where the system does not tell)."""
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


def load_note() -> str | None:
    """One line when the machine is busier than its cores at start (speed and timings suffer), else None."""
    load = load_average()
    cores = os.cpu_count() or 1
    if load is None or load <= cores:
        return None
    return f"edgeft: note: load average {load:.1f} on {cores} cores: speed and timings will suffer"
