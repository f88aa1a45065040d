"""Training throughput on CPU: edgeft's fit loop against the plain loop of most fine-tuning tutorials.

Both contenders train the same model (resnet18 from `edgeft.models.get_model`, 10 classes, 1 input
channel, initialized after `torch.manual_seed(0)`) on the same images (edgeft's embedded `digits`
at 32 x 32, the same train/val split) with the same batch size (64) and optimizer (Adam, lr 1e-3,
no weight decay), fp32, plain cross-entropy, on the CPU:

- `tutorial`: a `torch.utils.data.Dataset` that hands out PIL images (built from the same uint8
  arrays, the way `torchvision.datasets.MNIST` does), a torchvision PIL transform pipeline
  (RandomAffine + ColorJitter matching edgeft's `standard` preset, ToTensor, Normalize), a
  `DataLoader(num_workers=2, shuffle=True)`, and `loss.item()` / accuracy `.item()` every batch;
  then a validation pass and `torch.save(model.state_dict())`.
- `edgeft`: the product itself, `edgeft.train.train(TrainConfig(epochs=1, ...))` (batched
  augmentation on the training device, no per-batch host sync, validation, checkpoints, history,
  curves).

One round is one fresh one-epoch run of a contender (fresh model, optimizer and data pipeline).
The rounds are interleaved: before each timed round of one contender, pytest-benchmark's untimed
`setup` runs one round of the other, so both sample the same machine load (the CI box is shared).
pytest-benchmark times the whole run (end to end, so edgeft's per-epoch checkpoints and plot are
in it); the headline number is the training throughput, images/s over the training epoch only
(from the first batch request to the end of the last optimizer step): edgeft's own
`history[0]["images_per_s"]` and the same span timed around the tutorial's loop. The ratio is the
median of the per-pair ratios edgeft / tutorial over both tests' rounds.

Run: python -m pytest benchmarks/test_train_throughput.py --benchmark-only \
         --benchmark-json benchmarks/results/train_throughput-cpu.pytest-benchmark.json
It also writes benchmarks/results/train_throughput-cpu.json (medians, ratio, every round, machine).
EDGEFT_BENCH_ROUNDS sets the timed rounds per test (default 5, after 1 warm-up round), so each
contender runs 2 x (rounds + 1) epochs.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from edgeft.data import DataBundle, load_data
from edgeft.models import get_model
from edgeft.train import TrainConfig, train

ROUNDS = int(os.environ.get("EDGEFT_BENCH_ROUNDS", "5"))
WARMUP_ROUNDS = 1
MODEL = "resnet18"
IMG_SIZE = 32
BATCH_SIZE = 64
LR = 1e-3
SEED = 0
TUTORIAL_WORKERS = 2  # the DataLoader setting of most tutorials
SUMMARY = Path(__file__).parent / "results" / "train_throughput-cpu.json"
GROUP = f"train-throughput-cpu: {MODEL}, digits {IMG_SIZE}x{IMG_SIZE}, batch {BATCH_SIZE}, one epoch per round"


# --- the tutorial baseline ------------------------------------------------------------------


class TutorialDigits(torch.utils.data.Dataset):
    """uint8 images served as PIL images through a transform, as torchvision.datasets.MNIST does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.images = images[:, 0]  # (N, H, W) uint8: edgeft's arrays, one channel
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        img = Image.fromarray(self.images[index].numpy(), mode="L")
        return self.transform(img), int(self.labels[index])


def tutorial_transforms(bundle: DataBundle):
    """PIL transforms equivalent to edgeft's `standard` preset (shift 8 %, rotation 12 deg, scale
    +-10 %, brightness/contrast +-20 %; no flips for digits), then ToTensor and edgeft's Normalize."""
    normalize = transforms.Normalize(bundle.preprocess.mean, bundle.preprocess.std)
    train_tf = transforms.Compose(
        [
            transforms.RandomAffine(degrees=12, translate=(0.08, 0.08), scale=(0.9, 1.1)),
            transforms.ColorJitter(brightness=0.2, contrast=0.2),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose([transforms.ToTensor(), normalize])
    return train_tf, eval_tf


def tutorial_fit_one_epoch(train_set, val_set, out_dir: Path) -> dict:
    """One epoch of the loop found in most fine-tuning tutorials (then validate and save)."""
    torch.manual_seed(SEED)
    model = get_model(MODEL, num_classes=10, in_chans=1)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    train_loader = torch.utils.data.DataLoader(
        train_set, batch_size=BATCH_SIZE, shuffle=True, num_workers=TUTORIAL_WORKERS
    )
    val_loader = torch.utils.data.DataLoader(
        val_set, batch_size=BATCH_SIZE, shuffle=False, num_workers=TUTORIAL_WORKERS
    )

    model.train()
    running_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for images, labels in train_loader:
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * labels.size(0)
        correct += (outputs.argmax(1) == labels).sum().item()
        seen += labels.size(0)
    train_seconds = time.perf_counter() - start

    model.eval()
    val_correct = 0
    with torch.no_grad():
        for images, labels in val_loader:
            val_correct += (model(images).argmax(1) == labels).sum().item()
    torch.save(model.state_dict(), out_dir / "model.pth")
    return {
        "images": seen,
        "train_seconds": train_seconds,
        "images_per_s": seen / train_seconds,
        "train_loss": running_loss / seen,
        "train_acc": correct / seen,
        "val_acc": val_correct / len(val_set),
    }


# --- edgeft: the product --------------------------------------------------------------------


def edgeft_config(out_dir: Path) -> TrainConfig:
    """The same recipe as the tutorial: Adam 1e-3 without decay, constant lr, plain
    cross-entropy, fp32 on the CPU; everything else (augmentation `standard`, ...) edgeft's own."""
    return TrainConfig(
        model=MODEL,
        data="digits",
        img_size=IMG_SIZE,
        epochs=1,
        batch_size=BATCH_SIZE,
        optimizer="adam",
        lr=LR,
        weight_decay=0.0,
        scheduler="none",
        warmup_epochs=0.0,
        label_smoothing=0.0,
        augment="standard",
        amp=False,
        channels_last=False,
        device="cpu",
        seed=SEED,
        patience=0,
        out=str(out_dir),
    )


def edgeft_fit_one_epoch(out_dir: Path, n_train: int) -> dict:
    """One epoch through `edgeft.train.train`; the throughput is the one edgeft reports."""
    result = train(edgeft_config(out_dir))
    row = result.history[0]
    return {
        "images": n_train,
        "train_seconds": n_train / row["images_per_s"],
        "images_per_s": row["images_per_s"],
        "train_loss": row["train_loss"],
        "train_acc": row["train_acc"],
        "val_acc": row["val_acc"],
    }


# --- the suite ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DataBundle:
    """The images both contenders train on (edgeft's train() loads the same split itself)."""
    return load_data("digits", img_size=IMG_SIZE, seed=SEED)


@pytest.fixture(scope="module")
def contenders(digits):
    """name -> function(out_dir) running one fresh one-epoch fit and returning its numbers."""
    train_tf, eval_tf = tutorial_transforms(digits)
    train_set = TutorialDigits(digits.train.images, digits.train.labels, train_tf)
    val_set = TutorialDigits(digits.val.images, digits.val.labels, eval_tf)
    return {
        "tutorial": lambda out: tutorial_fit_one_epoch(train_set, val_set, out),
        "edgeft": lambda out: edgeft_fit_one_epoch(out, len(digits.train)),
    }


@pytest.fixture(scope="module")
def measured(machine):
    """Every measured round of both contenders, in pairs; once both tests ran, the summary JSON."""
    results = {"pairs": [], "loadavg_1min": [os.getloadavg()[0]]}
    yield results
    results["loadavg_1min"].append(os.getloadavg()[0])
    ran = [results.get(name) for name in ("tutorial", "edgeft")]
    if all(ran) and not any(r.get("disabled") for r in ran):
        SUMMARY.parent.mkdir(parents=True, exist_ok=True)
        SUMMARY.write_text(json.dumps(summary(results, machine), indent=2) + "\n")


def medians(pairs: list[dict]) -> dict:
    """Median training images/s of each contender over `pairs`, and the median paired ratio."""
    edgeft = statistics.median(p["edgeft"]["images_per_s"] for p in pairs)
    tutorial = statistics.median(p["tutorial"]["images_per_s"] for p in pairs)
    ratio = statistics.median(p["edgeft"]["images_per_s"] / p["tutorial"]["images_per_s"] for p in pairs)
    return {"edgeft_images_per_s": edgeft, "tutorial_images_per_s": tutorial, "ratio_edgeft_over_tutorial": ratio}


def summary(results: dict, machine: dict) -> dict:
    pairs = results["pairs"]
    headline = medians(pairs)
    return {
        "benchmark": "train_throughput-cpu",
        "what": "training images/s over one epoch, edgeft.train.train vs a tutorial loop; medians over all "
        "rounds, ratio = median of the per-pair ratios (each pair: adjacent rounds of both)",
        "command": "python -m pytest benchmarks/test_train_throughput.py --benchmark-only "
        "--benchmark-json benchmarks/results/train_throughput-cpu.pytest-benchmark.json",
        "machine": machine,
        "loadavg_1min_start_end": results["loadavg_1min"],
        "setup": {
            "model": MODEL,
            "in_chans": 1,
            "num_classes": 10,
            "init_seed": SEED,
            "data": "digits (edgeft embedded)",
            "img_size": IMG_SIZE,
            "train_images": pairs[0]["edgeft"]["images"],
            "batch_size": BATCH_SIZE,
            "optimizer": f"Adam lr={LR}, no weight decay",
            "precision": "fp32",
            "device": "cpu",
            "tutorial": "PIL Dataset + torchvision.transforms (RandomAffine, ColorJitter, ToTensor, Normalize), "
            f"DataLoader(num_workers={TUTORIAL_WORKERS}), loss.item() and accuracy .item() per batch",
            "edgeft": "edgeft.train.train(TrainConfig(epochs=1, optimizer='adam', lr=1e-3, weight_decay=0, "
            "scheduler='none', label_smoothing=0, augment='standard', device='cpu'))",
            "rounds_per_test": ROUNDS,
            "warmup_rounds_per_test": WARMUP_ROUNDS,
            "pairs": len(pairs),
        },
        **headline,
        "edgeft_no_slower": headline["ratio_edgeft_over_tutorial"] >= 1.0,
        "median_run_s_end_to_end": {
            name: statistics.median(p[name]["run_s"] for p in pairs) for name in ("edgeft", "tutorial")
        },
        "pairs": pairs,
    }


@pytest.mark.parametrize("contender", ["tutorial", "edgeft"])
def test_train_throughput_cpu(benchmark, contender, contenders, measured, tmp_path):
    """Times one fresh one-epoch run of `contender` per round; before each round, pytest-benchmark's
    untimed setup runs one round of the other contender, so the two sample the same machine load."""
    partner = "edgeft" if contender == "tutorial" else "tutorial"
    rounds: list[dict] = []

    def run(name: str) -> None:
        out = tmp_path / f"{len(rounds)}-{name}"
        out.mkdir()
        start = time.perf_counter()
        row = contenders[name](out)
        rounds.append({"contender": name, **row, "run_s": time.perf_counter() - start})

    benchmark.group = GROUP
    benchmark.pedantic(
        lambda: run(contender), setup=lambda: run(partner), rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1
    )
    if benchmark.disabled:
        measured[contender] = {"disabled": True}
        return

    pairs = [{r["contender"]: r for r in rounds[i : i + 2]} for i in range(0, len(rounds), 2)][WARMUP_ROUNDS:]
    assert all(r["images"] == pairs[0]["edgeft"]["images"] for p in pairs for r in p.values())  # whole epochs
    measured[contender] = {"timed_rounds": ROUNDS}
    measured["pairs"] += pairs
    mine = [p[contender]["images_per_s"] for p in pairs]
    benchmark.extra_info.update(
        contender=contender,
        images_per_s_median=statistics.median(mine),
        images_per_s_rounds=mine,
        **{f"this_test_{k}": v for k, v in medians(pairs).items()},
        **{f"suite_{k}": v for k, v in medians(measured["pairs"]).items()},
        loadavg_1min=os.getloadavg()[0],
    )
