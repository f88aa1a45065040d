"""`edgeft validate --data FOLDER` holds O(batch) images: peak memory with 1,000 and with 5,000
validation JPEGs at 224 px must be <= 1 GB and within 10 % of each other.

The model is a resnet18 (10 classes, 224 px, eval resize 256) exported to fp32 ONNX; the folder
holds 320 x 240 JPEGs in `train/` and `val/`. Each `edgeft validate` runs as its own process; its
memory is sampled every 50 ms: the process's own peak RSS (VmHWM) and the proportional set size
(PSS) of the whole process tree (the DataLoader workers that decode the reference side share
pages with it, PSS counts each shared page once).

Run: python -m pytest benchmarks/test_validate_memory.py --benchmark-only \
         --benchmark-json benchmarks/results/validate_memory-cpu.pytest-benchmark.json
It writes benchmarks/results/validate_memory-cpu.json (peaks, ratio, machine).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft.checkpoint import save_checkpoint
from edgeft.config import ExportConfig
from edgeft.cpu import cpu_description
from edgeft.data import default_preprocess
from edgeft.export import export
from edgeft.models import get_model

SUMMARY = Path(__file__).parent / "results" / "validate_memory-cpu.json"
SIZES = (1000, 5000)
CLASSES = [f"class{i}" for i in range(10)]


def _write_images(folder: Path, count: int, rng: np.random.Generator) -> None:
    for i in range(count):
        label = CLASSES[i % len(CLASSES)]
        (folder / label).mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # smooth content, like a photo compresses
        Image.fromarray(base).resize((320, 240), Image.Resampling.BICUBIC).save(
            folder / label / f"{i:05d}.jpg", quality=90
        )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("validate_memory")
    rng = np.random.default_rng(0)
    data = root / "data"
    _write_images(data / "train", 20, rng)
    _write_images(data / "val", max(SIZES), rng)
    spec = default_preprocess(size=224, channels=3, resize=256)
    run = root / "runs" / "r18"
    checkpoint = run / "best.pt"
    run.mkdir(parents=True)
    save_checkpoint(
        checkpoint,
        {
            "arch": "resnet18",
            "num_classes": 10,
            "in_chans": 3,
            "classes": CLASSES,
            "preprocess": spec.to_dict(),
            "state_dict": get_model("resnet18", num_classes=10).state_dict(),
            "config": {"data": str(data)},
        },
    )
    onnx_path = (
        export(ExportConfig(checkpoint=str(checkpoint), out=str(root / "exported"), validate=False)).files[0].path
    )
    return {"root": root, "data": data, "onnx": onnx_path}


def _subset(data: Path, count: int, target: Path) -> Path:
    """A copy of the folder (symlinks) whose val/ holds the first `count` images."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir()
    (target / "train").symlink_to(data / "train")
    files = sorted((data / "val").rglob("*.jpg"), key=lambda f: f.name)[:count]  # every class, evenly
    for f in files:
        (target / "val" / f.parent.name).mkdir(parents=True, exist_ok=True)
        (target / "val" / f.parent.name / f.name).symlink_to(f)
    return target


def _tree(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = [int(c) for c in children.read_text().split()] if children.exists() else []
    return [pid] + [p for kid in kids for p in _tree(kid)]


def _kib(pid: int, file: str, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _measure(argv: list[str], cwd: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hwm = tree_pss = 0
    while proc.poll() is None:
        try:
            pids = _tree(proc.pid)
        except (OSError, ValueError):
            pids = [proc.pid]
        hwm = max(hwm, _kib(proc.pid, "status", "VmHWM:"))
        tree_pss = max(tree_pss, sum(_kib(p, "smaps_rollup", "Pss:") for p in pids))
        time.sleep(0.05)
    out, err = proc.communicate()
    assert proc.returncode == 0, err
    return {
        "wall_s": time.perf_counter() - start,
        "peak_rss_mb": hwm / 1024,
        "peak_tree_pss_mb": tree_pss / 1024,
        "result": json.loads(out),
    }


@pytest.fixture(scope="module")
def results(machine):
    collected: dict = {}
    yield collected
    if set(SIZES) <= set(collected):
        small, large = collected[SIZES[0]], collected[SIZES[1]]
        summary = {
            "machine": {**machine, **cpu_description()},
            "model": "resnet18 fp32 ONNX, 224 px (resize 256), 10 classes, validated at batch 1 and 8",
            "runs": {
                str(n): {k: v for k, v in collected[n].items() if k != "result"}
                | {"n_images": collected[n]["result"]["n_images"]}
                for n in SIZES
            },
            "peak_rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"],
            "peak_tree_pss_ratio": large["peak_tree_pss_mb"] / small["peak_tree_pss_mb"],
            "command": "python -m pytest benchmarks/test_validate_memory.py --benchmark-only "
            "--benchmark-json benchmarks/results/validate_memory-cpu.pytest-benchmark.json",
        }
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")


@pytest.mark.parametrize("count", SIZES)
def test_validate_memory(benchmark, setup, results, count):
    edgeft = str(Path(shutil.which("edgeft") or "edgeft"))
    data = _subset(setup["data"], count, setup["root"] / f"data{count}")
    argv = [edgeft, "validate", setup["onnx"], "--data", str(data), "--json"]
    run = benchmark.pedantic(lambda: _measure(argv, setup["root"]), rounds=1, iterations=1)
    assert run["result"]["n_images"] == count
    results[count] = run
    benchmark.extra_info.update({k: v for k, v in run.items() if k != "result"})
    assert run["peak_rss_mb"] <= 1024 and run["peak_tree_pss_mb"] <= 1024
