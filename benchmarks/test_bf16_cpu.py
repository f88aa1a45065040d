"""bf16 autocast against fp32 for CPU training: images/s and final accuracy on digits.

`--amp` on a CPU uses bf16 autocast only where the CPU computes bf16 natively (AVX-512 BF16 or
AMX, `edgeft.cpu.has_bf16()`); elsewhere it trains in fp32, so this suite skips on such CPUs.
Each round trains resnet18 on the embedded digits (32 px, batch 64, AdamW, cosine, `standard`
augmentation) for EDGEFT_BENCH_EPOCHS epochs (default 5) once in fp32 and once with `--amp`,
interleaved so both see the same machine load. It reports the median training images/s of each,
their ratio, and the final and best validation accuracy; bf16 should become the CPU default only
where it is faster at the same accuracy (within 0.5 points).

Run (about 6 minutes on an idle 2-core machine with bf16):
    python -m pytest benchmarks/test_bf16_cpu.py --benchmark-only \\
        --benchmark-json benchmarks/results/bf16_cpu.pytest-benchmark.json
It writes benchmarks/results/bf16_cpu.json. EDGEFT_BENCH_ROUNDS (default 3) sets the rounds.
"""

from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import torch

from edgeft.cpu import cpu_description, has_bf16
from edgeft.train import TrainConfig, autocast_dtype, train

ROUNDS = int(os.environ.get("EDGEFT_BENCH_ROUNDS", "3"))
EPOCHS = int(os.environ.get("EDGEFT_BENCH_EPOCHS", "5"))
SUMMARY = Path(__file__).parent / "results" / "bf16_cpu.json"
SAME_ACCURACY_POINTS = 0.5

pytestmark = pytest.mark.skipif(not has_bf16(), reason="this CPU has no native bf16 (AVX-512 BF16 or AMX)")


def fit(out: Path, *, amp: bool) -> dict:
    config = TrainConfig(
        data="digits",
        img_size=32,
        epochs=EPOCHS,
        batch_size=64,
        amp=amp,
        device="cpu",
        patience=0,
        out=str(out),
        name="bf16" if amp else "fp32",
    )
    result = train(config)
    return {
        "images_per_s": result.train_images_per_s,
        "final_val_acc": result.history[-1]["val_acc"],
        "best_val_acc": result.best_val_acc,
        "wall_s": result.wall_s,
    }


def test_bf16_vs_fp32_cpu(benchmark, machine, tmp_path):
    assert autocast_dtype(torch.device("cpu"), True) == torch.bfloat16
    pairs: list[dict] = []

    def round_() -> None:
        out = tmp_path / str(len(pairs))
        pairs.append({"fp32": fit(out, amp=False), "bf16": fit(out, amp=True)})

    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    if benchmark.disabled:
        return
    median = {
        name: {key: statistics.median(p[name][key] for p in pairs) for key in pairs[0][name]}
        for name in ("fp32", "bf16")
    }
    speedup = statistics.median(p["bf16"]["images_per_s"] / p["fp32"]["images_per_s"] for p in pairs)
    same_accuracy = median["bf16"]["final_val_acc"] >= median["fp32"]["final_val_acc"] - SAME_ACCURACY_POINTS / 100
    summary = {
        "benchmark": "bf16_cpu",
        "command": "python -m pytest benchmarks/test_bf16_cpu.py --benchmark-only "
        "--benchmark-json benchmarks/results/bf16_cpu.pytest-benchmark.json",
        "machine": {**machine, **cpu_description()},
        "setup": {"model": "resnet18", "data": "digits 32 px", "epochs": EPOCHS, "batch_size": 64, "rounds": ROUNDS},
        "median": median,
        "speedup_bf16_over_fp32": speedup,
        "same_accuracy": same_accuracy,
        "bf16_should_be_cpu_default": speedup > 1.0 and same_accuracy,
        "pairs": pairs,
    }
    benchmark.extra_info.update(speedup_bf16_over_fp32=speedup, same_accuracy=same_accuracy)
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=2) + "\n")
