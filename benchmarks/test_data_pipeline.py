"""The folder data pipeline at scale: start-up time and images/s of the data pipeline alone (no
model), on a generated folder of JPEGs the size of a cats-vs-dogs photo (500 x 375, two classes).

- start-up: `edgeft.data.load_data(folder)`: listing, the stratified split, and reading every
  file's header (format, mode, size; no pixels) to skip non-images and choose the input size.
  Goal: <= 10 s for 20,000 files on 2 cores.
- training pipeline: `iterate_batches` over the training split with the `standard` augmentation,
  `workers` DataLoader processes (persistent), batch 64, at the size chosen from the data (224),
  images/s over the first EDGEFT_BENCH_PIPELINE_IMAGES images after one warm-up batch.
- evaluation pipeline: the same over the validation split with the eval transform.

Run (a 2-core AMD EPYC, idle; about 5 minutes on 2 cores, most of it writing the JPEGs):
    python -m pytest benchmarks/test_data_pipeline.py --benchmark-only \\
        --benchmark-json benchmarks/results/data_pipeline-cpu.pytest-benchmark.json
It writes benchmarks/results/data_pipeline-cpu.json. EDGEFT_BENCH_IMAGES (default 20000) sets the
folder's size, EDGEFT_BENCH_PIPELINE_IMAGES (default 2048) the images timed per pipeline run,
EDGEFT_BENCH_WORKERS (default 2) the DataLoader workers, EDGEFT_BENCH_ROUNDS (default 3) the rounds.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edgeft.cpu import cpu_description
from edgeft.data import FolderLoaders, iterate_batches, load_data

N_IMAGES = int(os.environ.get("EDGEFT_BENCH_IMAGES", "20000"))
PIPELINE_IMAGES = int(os.environ.get("EDGEFT_BENCH_PIPELINE_IMAGES", "2048"))
WORKERS = int(os.environ.get("EDGEFT_BENCH_WORKERS", "2"))
ROUNDS = int(os.environ.get("EDGEFT_BENCH_ROUNDS", "3"))
WIDTH, HEIGHT, BATCH = 500, 375, 64
STARTUP_GOAL_S = 10.0
SUMMARY = Path(__file__).parent / "results" / "data_pipeline-cpu.json"
CPU = torch.device("cpu")


def _write_jpegs(job: tuple[str, int, int]) -> None:
    """`count` photo-like JPEGs (smooth colour fields plus grain) into `folder`."""
    folder, start, count = job
    rng = np.random.default_rng(start)
    for i in range(start, start + count):
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((WIDTH, HEIGHT), Image.BICUBIC)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (HEIGHT, WIDTH, 1), dtype=np.int16)
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(Path(folder) / f"{i:06d}.jpg", quality=85)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """N_IMAGES JPEGs, 500 x 375, half cats, half dogs."""
    root = tmp_path_factory.mktemp("photos")
    jobs = []
    for label, name in enumerate(("cat", "dog")):
        (root / name).mkdir()
        first, last = label * (N_IMAGES // 2), (label + 1) * (N_IMAGES // 2)
        jobs += [(str(root / name), start, min(500, last - start)) for start in range(first, last, 500)]
    with ProcessPoolExecutor(max_workers=os.cpu_count()) as pool:
        list(pool.map(_write_jpegs, jobs))
    return root


@pytest.fixture(scope="module")
def measured(machine):
    results: dict = {}
    yield results
    if {"startup", "train_pipeline", "eval_pipeline"} <= set(results):
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        summary = {
            "benchmark": "data_pipeline-cpu",
            "command": "python -m pytest benchmarks/test_data_pipeline.py --benchmark-only "
            "--benchmark-json benchmarks/results/data_pipeline-cpu.pytest-benchmark.json",
            "machine": {**machine, **cpu_description()},
            "setup": {
                "images": N_IMAGES,
                "size": f"{WIDTH}x{HEIGHT} JPEG q85",
                "classes": 2,
                "batch": BATCH,
                "workers": WORKERS,
                "timed_images_per_pipeline_run": PIPELINE_IMAGES,
                "rounds": ROUNDS,
            },
            "startup_goal_s": STARTUP_GOAL_S,
            **results,
        }
        SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")


def test_startup(benchmark, folder, measured):
    """load_data on the whole folder: headers only."""
    bundle = benchmark.pedantic(lambda: load_data(str(folder)), rounds=ROUNDS, iterations=1)
    assert len(bundle.train) + len(bundle.val) == N_IMAGES and bundle.skipped_files == 0
    if benchmark.disabled:
        return
    median = benchmark.stats.stats.median
    measured["startup"] = {
        "median_s": median,
        "rounds_s": list(benchmark.stats.stats.data),
        "meets_goal": median <= STARTUP_GOAL_S,
        "img_size_chosen": bundle.preprocess.size,
    }


def pipeline_rate(split, bundle, *, augment: str, seed: int, loaders: FolderLoaders) -> float:
    """Images/s of `iterate_batches` over PIPELINE_IMAGES images, after one warm-up batch."""
    batches = iterate_batches(
        split,
        batch_size=BATCH,
        preprocess=bundle.preprocess,
        device=CPU,
        shuffle=True,
        augment=augment,
        flips=True,
        seed=seed,
        workers=WORKERS,
        loaders=loaders,
    )
    next(batches)
    seen, started = 0, time.perf_counter()
    for x, _ in batches:
        seen += len(x)
        if seen >= PIPELINE_IMAGES:
            break
    rate = seen / (time.perf_counter() - started)
    batches.close()
    return rate


@pytest.mark.parametrize(("split", "augment"), [("train", "standard"), ("val", "none")])
def test_pipeline_images_per_s(benchmark, folder, measured, split, augment):
    bundle = load_data(str(folder))
    rates: list[float] = []
    with FolderLoaders() as loaders:  # the workers persist across rounds, as across a run's epochs
        benchmark.pedantic(
            lambda: rates.append(
                pipeline_rate(getattr(bundle, split), bundle, augment=augment, seed=len(rates), loaders=loaders)
            ),
            rounds=ROUNDS,
            iterations=1,
        )
    if benchmark.disabled:
        return
    benchmark.extra_info.update(images_per_s=rates)
    measured[f"{split if split == 'train' else 'eval'}_pipeline"] = {
        "augment": augment,
        "img_size": bundle.preprocess.size,
        "images_per_s_median": float(np.median(rates)),
        "images_per_s_rounds": rates,
    }
