"""Training on one CUDA GPU: edgeft's fit loop against the tutorial loop (skips without a GPU).

Both train resnet18 (10 classes, 1 channel, `torch.manual_seed(0)`) on the embedded digits at
64 px for EPOCHS epochs, batch 256, Adam lr 1e-3 without decay:
- `tutorial`: the loop of most fine-tuning tutorials moved to the GPU: PIL images through
  torchvision transforms (RandomAffine, ColorJitter, ToTensor, Normalize) in a
  `DataLoader(num_workers=4, pin_memory=True)`, fp32, `loss.item()` and accuracy `.item()` per
  batch, `.to("cuda")` per batch.
- `edgeft`: `edgeft.train.train(TrainConfig(device="cuda"))` with its CUDA defaults: the uint8
  dataset on the GPU, batched augmentation there, bf16 autocast, channels_last.
The headline is training images/s over all epochs and the final validation accuracy of each.

Run on the GPU machine:
    python -m pytest benchmarks/test_gpu_train.py --benchmark-only \\
        --benchmark-json benchmarks/results/gpu_train.pytest-benchmark.json
It writes benchmarks/results/gpu_train-<GPU name>.json.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from edgeft.data import load_data
from edgeft.models import get_model
from edgeft.train import TrainConfig, train
from test_train_throughput import TutorialDigits, tutorial_transforms

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

EPOCHS, IMG_SIZE, BATCH, LR, ROUNDS = 3, 64, 256, 1e-3, 2
RESULTS = Path(__file__).parent / "results"


def tutorial_fit(out: Path) -> dict:
    bundle = load_data("digits", img_size=IMG_SIZE)
    train_tf, eval_tf = tutorial_transforms(bundle)
    train_set = TutorialDigits(bundle.train.images, bundle.train.labels, train_tf)
    val_set = TutorialDigits(bundle.val.images, bundle.val.labels, eval_tf)
    torch.manual_seed(0)
    model = get_model("resnet18", num_classes=10, in_chans=1).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    criterion = nn.CrossEntropyLoss()
    loader = torch.utils.data.DataLoader(train_set, batch_size=BATCH, shuffle=True, num_workers=4, pin_memory=True)
    seen, correct, running_loss, train_s = 0, 0, 0.0, 0.0
    for _ in range(EPOCHS):
        model.train()
        start = time.perf_counter()
        for images, labels in loader:
            images, labels = images.cuda(), labels.cuda()
            optimizer.zero_grad()
            outputs = model(images)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item() * len(labels)  # the per-batch host syncs of the tutorial
            correct += (outputs.argmax(1) == labels).sum().item()
            seen += len(labels)
        torch.cuda.synchronize()
        train_s += time.perf_counter() - start
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val_set, batch_size=BATCH, num_workers=4):
            correct += (model(images.cuda()).argmax(1).cpu() == labels).sum().item()
    torch.save(model.state_dict(), out / "model.pth")
    return {"images_per_s": seen / train_s, "final_val_acc": correct / len(val_set)}


def edgeft_fit(out: Path) -> dict:
    config = TrainConfig(
        data="digits",
        img_size=IMG_SIZE,
        epochs=EPOCHS,
        batch_size=BATCH,
        optimizer="adam",
        lr=LR,
        weight_decay=0.0,
        scheduler="none",
        warmup_epochs=0.0,
        label_smoothing=0.0,
        device="cuda",
        patience=0,
        out=str(out),
    )
    result = train(config)
    return {"images_per_s": result.train_images_per_s, "final_val_acc": result.history[-1]["val_acc"]}


def test_gpu_train_vs_tutorial(benchmark, machine, tmp_path):
    pairs: list[dict] = []

    def round_() -> None:
        out = tmp_path / str(len(pairs))
        out.mkdir()
        pairs.append({"tutorial": tutorial_fit(out), "edgeft": edgeft_fit(out)})

    benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    if benchmark.disabled:
        return
    gpu = torch.cuda.get_device_name()
    summary = {
        "benchmark": "gpu_train",
        "device": gpu,
        "machine": machine,
        "setup": {"model": "resnet18", "data": f"digits {IMG_SIZE} px", "epochs": EPOCHS, "batch": BATCH},
        "median": {
            name: {k: statistics.median(p[name][k] for p in pairs) for k in pairs[0][name]}
            for name in ("tutorial", "edgeft")
        },
        "ratio_edgeft_over_tutorial": statistics.median(
            p["edgeft"]["images_per_s"] / p["tutorial"]["images_per_s"] for p in pairs
        ),
        "pairs": pairs,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"gpu_train-{re.sub(r'[^A-Za-z0-9]+', '-', gpu).strip('-')}.json").write_text(
        json.dumps(summary, indent=2) + "\n"
    )
