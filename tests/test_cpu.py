"""CPU feature detection."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeft.cpu import FEATURES, cpu_description, cpu_features, has_bf16, has_vnni


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads Linux's /proc/cpuinfo")
def test_features_match_proc_cpuinfo():
    flags = set(
        next(row for row in Path("/proc/cpuinfo").read_text().splitlines() if row.startswith("flags"))
        .split(":")[1]
        .split()
    )
    assert cpu_features() == {name: name in flags for name in FEATURES}
    assert has_vnni() == bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"})
    assert has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


def test_description_lists_present_features_only():
    description = cpu_description()
    assert description["cores"] >= 1 and description["cpu"]
    assert set(description["features"]) == {name for name, on in cpu_features().items() if on}
