"""edgeft compare: three real runs of one backbone on the same data, one table, one plot."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from conftest import one_line_error, run_edgeft

pytestmark = pytest.mark.slow


def test_compare_trains_three_ways_and_reports_them(digits_checkpoint, image_folder, tmp_path):
    # fine-tuning weights trained on other data (digits, 1 channel) for a 3-class RGB folder
    proc = run_edgeft(
        [
            "compare",
            "--weights",
            str(digits_checkpoint),
            "--data",
            str(image_folder),
            "--epochs",
            "3",
            "--freeze-epochs",
            "1",
            "--img-size",
            "16",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "runs"),
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    (folder,) = (tmp_path / "runs").iterdir()
    histories = {}
    for name in ("scratch", "frozen", "finetune"):
        with open(folder / name / "history.csv") as f:
            histories[name] = list(csv.DictReader(f))
        assert [int(r["epoch"]) for r in histories[name]] == [1, 2, 3]
        config = json.loads((folder / name / "config.json").read_text())
        assert config["weights"] == ("none" if name == "scratch" else str(digits_checkpoint))
    assert [r["phase"] for r in histories["frozen"]] == ["head", "all", "all"]
    assert [r["phase"] for r in histories["finetune"]] == ["all", "all", "all"]
    assert histories["scratch"][0]["train_loss"] != histories["finetune"][0]["train_loss"]  # different runs
    table = (folder / "compare.md").read_text()
    for name in ("scratch", "frozen", "finetune"):
        best = max(float(r["val_acc"]) for r in histories[name])
        assert f"| {name} |" in table and f"{100 * best:.2f} %" in table
    with Image.open(folder / "compare.png") as png:
        assert png.size[0] > 600


def test_compare_needs_weights(tmp_path):
    proc = run_edgeft(["compare", "--weights", "none", "--epochs", "2"], cwd=tmp_path)
    assert proc.returncode == 2 and "needs --weights" in proc.stderr


def test_compare_checks_the_weights_before_training(tmp_path):
    proc = run_edgeft(
        ["compare", "--weights", str(tmp_path / "nonexistent.pt"), "--epochs", "3", "--img-size", "16"], cwd=tmp_path
    )
    assert proc.returncode == 2 and "nonexistent.pt" in one_line_error(proc.stderr)
    assert not (tmp_path / "runs").exists()  # nothing trained, no partial folder
