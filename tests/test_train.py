"""edgeft.train and `edgeft train`: the run folder, checkpoints that reproduce their accuracy,
freezing, fine-tuning across class counts, early stopping, optimizers and schedules, resume."""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import edgeft.train as train_module
from conftest import edgeft_command, make_image_folder, offline_env, run_edgeft
from edgeft.checkpoint import load_checkpoint
from edgeft.data import iterate_batches, load_data
from edgeft.errors import InputError
from edgeft.models import get_model
from edgeft.preprocess import Preprocess
from edgeft.train import TrainConfig, train

HISTORY_COLUMNS = ["epoch", "phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc", "seconds", "images_per_s"]
SUMMARY_KEYS = {"best_val_acc", "best_epoch", "epochs", "train_images_per_s", "wall_s", "skipped_files"}
CPU = torch.device("cpu")


def read_history(run_dir: Path) -> list[dict]:
    with (run_dir / "history.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def model_of(checkpoint: dict) -> torch.nn.Module:
    model = get_model(checkpoint["arch"], num_classes=checkpoint["num_classes"], in_chans=checkpoint["in_chans"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval()


def accuracy(model: torch.nn.Module, bundle) -> float:
    """Top-1 accuracy on the validation split, counted here rather than by edgeft.train."""
    correct = 0
    with torch.no_grad():
        for x, y in iterate_batches(bundle.val, batch_size=100, preprocess=bundle.preprocess, device=CPU):
            correct += int((model(x).argmax(1) == y).sum())
    return correct / len(bundle.val)


def backbone(state: dict, head: str = "fc.") -> dict:
    return {k: v for k, v in state.items() if not k.startswith(head)}


def tiny_config(tmp_path: Path, **overrides) -> TrainConfig:
    values = dict(img_size=16, epochs=2, batch_size=64, patience=0, workers=0, out=str(tmp_path / "runs"))
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """resnet18 on digits at 16 px for 2 epochs, through the library."""
    tmp = tmp_path_factory.mktemp("tiny")
    config = tiny_config(tmp, name="tiny")
    result = train(config)
    return config, result, Path(result.run_dir)


# --- a run and its folder -----------------------------------------------------------------------


def test_run_folder_holds_every_artifact(tiny_run):
    config, result, run_dir = tiny_run
    assert run_dir == Path(config.out) / "tiny"
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(
        ["config.json", "history.csv", "curves.png", "best.pt", "last.pt", "summary.json"]
    )
    assert json.loads((run_dir / "config.json").read_text()) == asdict(config)

    history = read_history(run_dir)
    assert list(history[0]) == HISTORY_COLUMNS
    assert [int(row["epoch"]) for row in history] == [1, 2]
    for row in history:
        assert row["phase"] == "all"
        assert 0 <= float(row["train_acc"]) <= 1 and 0 <= float(row["val_acc"]) <= 1
        assert float(row["seconds"]) > 0 and float(row["images_per_s"]) > 0
        assert math.isfinite(float(row["train_loss"])) and math.isfinite(float(row["val_loss"]))

    with Image.open(run_dir / "curves.png") as img:
        assert img.format == "PNG" and img.width > 200 and img.height > 100
        img.verify()


def test_summary_agrees_with_history(tiny_run):
    _, result, run_dir = tiny_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    history = read_history(run_dir)
    val_accs = [float(row["val_acc"]) for row in history]
    assert summary["best_val_acc"] == pytest.approx(max(val_accs), abs=1e-12)
    assert float(history[summary["best_epoch"] - 1]["val_acc"]) == pytest.approx(summary["best_val_acc"], abs=1e-12)
    assert summary["epochs"] == len(history) == 2
    assert summary["skipped_files"] == 0
    # all images over all training time: the harmonic mean of equal-sized epochs
    assert summary["train_images_per_s"] == pytest.approx(2 / sum(1 / float(r["images_per_s"]) for r in history))
    assert summary["wall_s"] >= sum(float(r["seconds"]) for r in history)
    assert summary["best_val_acc"] == result.best_val_acc and summary["best_epoch"] == result.best_epoch
    assert result.best_val_acc > 0.3  # learned something: chance is 0.1


def test_best_checkpoint_reproduces_the_reported_accuracy(tiny_run):
    config, result, run_dir = tiny_run
    raw = torch.load(run_dir / "best.pt", map_location="cpu", weights_only=True)
    assert raw["format"].startswith("edgeft.checkpoint")
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["arch"] == "resnet18" and checkpoint["num_classes"] == 10 and checkpoint["in_chans"] == 1
    assert checkpoint["classes"] == [str(d) for d in range(10)]
    assert checkpoint["metrics"]["epoch"] == result.best_epoch

    spec = Preprocess.from_dict(checkpoint["preprocess"])
    bundle = load_data(config.data, img_size=spec.size, channels=spec.channels, val_split=config.val_split,
                       seed=config.seed)  # fmt: skip
    assert bundle.preprocess == spec
    assert accuracy(model_of(checkpoint), bundle) == pytest.approx(result.best_val_acc, abs=1e-12)


def test_last_checkpoint_holds_the_resume_state(tiny_run):
    _, _, run_dir = tiny_run
    last = load_checkpoint(run_dir / "last.pt")
    resume = last["resume"]
    assert resume["epoch"] == 2
    assert [row["epoch"] for row in resume["history"]] == [1, 2]
    assert isinstance(resume["rng_cpu"], torch.Tensor)
    assert resume["optimizer"]["state"]  # Adam moments were saved


def test_resume_needs_a_last_checkpoint(tiny_run):
    _, _, run_dir = tiny_run
    with pytest.raises(InputError):
        train(TrainConfig(), resume=run_dir / "best.pt")
    with pytest.raises(InputError):
        train(TrainConfig(), resume=run_dir / "nothing-here")


def test_run_folders_are_numbered_not_overwritten(tmp_path):
    config = tiny_config(tmp_path, epochs=1, name="same", data=str(make_image_folder(tmp_path / "d", {"a": 4, "b": 4})))
    first = Path(train(config).run_dir)
    second = Path(train(config).run_dir)
    assert first.name == "same" and second.name == "same-2"
    assert (first / "best.pt").is_file() and (second / "best.pt").is_file()


# --- folders: 1 and 3 channels ------------------------------------------------------------------


@pytest.mark.parametrize(("modes", "channels"), [(("L",), 1), (("RGB", "L"), 3)])
def test_folder_runs_with_the_data_channel_count(tmp_path, modes, channels):
    data = make_image_folder(tmp_path / "shapes", {"a": 10, "b": 10, "c": 10}, modes=modes)
    result = train(tiny_config(tmp_path, data=str(data), epochs=2, batch_size=8, name="folder"))
    checkpoint = load_checkpoint(result.best_checkpoint)
    assert checkpoint["in_chans"] == channels and checkpoint["classes"] == ["a", "b", "c"]
    assert checkpoint["state_dict"]["conv1.weight"].shape[1] == channels
    bundle = load_data(str(data), img_size=16)  # the channels are the data's own
    assert bundle.preprocess.channels == channels
    assert accuracy(model_of(checkpoint), bundle) == pytest.approx(result.best_val_acc, abs=1e-12)


# --- fine-tuning ----------------------------------------------------------------------------------


def test_frozen_epoch_changes_only_the_head(tmp_path, tiny_run, monkeypatch):
    """Fine-tune the 10-class, 1-channel digits checkpoint on a 3-class RGB folder with one frozen
    epoch: during it the backbone (weights and BatchNorm statistics) stays as loaded."""
    _, _, source_dir = tiny_run
    source = load_checkpoint(source_dir / "best.pt")["state_dict"]
    built, saved = [], []
    real_get_model, real_save = train_module.get_model, train_module.save_checkpoint

    def spy_get_model(*args, **kwargs):
        model = real_get_model(*args, **kwargs)
        built.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return model

    def spy_save(path, content):
        if Path(path).name == "last.pt":
            saved.append({k: v.detach().clone() for k, v in content["state_dict"].items()})
        return real_save(path, content)

    monkeypatch.setattr(train_module, "get_model", spy_get_model)
    monkeypatch.setattr(train_module, "save_checkpoint", spy_save)
    data = make_image_folder(tmp_path / "shapes", {"a": 10, "b": 10, "c": 10})
    config = tiny_config(tmp_path, data=str(data), weights=str(source_dir / "best.pt"), epochs=2, freeze_epochs=1,
                         batch_size=8, name="ft")  # fmt: skip
    result = train(config)

    assert [row["phase"] for row in result.history] == ["head", "all"]
    assert len(built) == 1 and len(saved) == 2
    initial, after_frozen, after_all = built[0], saved[0], saved[1]
    assert initial["fc.weight"].shape == (3, 512)  # a new head for the new classes
    assert initial["conv1.weight"].shape[1] == 3  # the 1-channel stem widened for RGB
    for key, value in backbone(source).items():  # the backbone came from the checkpoint
        if key != "conv1.weight":
            assert torch.equal(initial[key], value), key
    for key in backbone(initial):  # ... and the frozen epoch left all of it alone
        assert torch.equal(after_frozen[key], initial[key]), key
    assert not torch.equal(after_frozen["fc.weight"], initial["fc.weight"])  # while the head learned
    assert not torch.equal(after_all["layer4.1.conv2.weight"], after_frozen["layer4.1.conv2.weight"])
    assert not torch.equal(after_all["bn1.running_mean"], after_frozen["bn1.running_mean"])

    checkpoint = load_checkpoint(result.best_checkpoint)
    assert checkpoint["num_classes"] == 3 and checkpoint["in_chans"] == 3
    assert accuracy(model_of(checkpoint), load_data(str(data), img_size=16)) == pytest.approx(
        result.best_val_acc, abs=1e-12
    )


def test_early_stopping(tmp_path, tiny_run):
    """With lr 0 and a frozen backbone the model cannot change, so the val loss never gets lower:
    patience 2 stops after epoch 3 of 6."""
    _, _, source_dir = tiny_run
    data = make_image_folder(tmp_path / "shapes", {"a": 6, "b": 6})
    config = tiny_config(tmp_path, data=str(data), weights=str(source_dir / "best.pt"), epochs=6, freeze_epochs=5,
                         lr=0.0, patience=2, batch_size=8, name="stop")  # fmt: skip
    result = train(config)
    assert result.stopped_early is True
    assert result.epochs == 3 and len(read_history(Path(result.run_dir))) == 3
    losses = [row["val_loss"] for row in result.history]
    assert all(later >= losses[0] for later in losses[1:])
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["stopped_early"] is True
    assert load_checkpoint(Path(result.run_dir) / "last.pt")["resume"]["epoch"] == 6  # resume will not continue


def test_sgd_learns(tmp_path):
    result = train(tiny_config(tmp_path, optimizer="sgd", name="sgd"))
    assert result.best_val_acc > 0.3  # chance is 0.1
    groups = load_checkpoint(Path(result.run_dir) / "last.pt")["resume"]["optimizer"]["param_groups"]
    assert all(group["nesterov"] and group["momentum"] == 0.9 for group in groups)  # really SGD


# --- bad configurations ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {"model": "resnet19"},
        {"optimizer": "lamb"},
        {"scheduler": "step"},
        {"augment": "heavy"},
        {"epochs": 0},
        {"batch_size": 0},
        {"freeze_epochs": 2, "epochs": 2, "weights": "x.pt"},
        {"freeze_epochs": 1},  # freezing a random backbone
        {"label_smoothing": 1.0},
        {"device": "cuda"} if not torch.cuda.is_available() else {"device": "cuda:99"},
        {"device": "tpu"},
    ],
)
def test_bad_config_is_an_input_error_before_any_output(tmp_path, overrides):
    config = tiny_config(tmp_path, **overrides)
    with pytest.raises(InputError):
        train(config)
    assert not (tmp_path / "runs").exists()


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_plateau_scheduler_learns(tmp_path):
    proc = run_edgeft(["train", "--scheduler", "plateau", "--epochs", "2", "--img-size", "16", "--name", "plateau"],
                      cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "plateau"
    assert "runs/plateau" in proc.stdout and "best val accuracy" in proc.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] > 0.3
    history = read_history(run_dir)
    expected_lr = TrainConfig(scheduler="plateau").resolved_lr()
    assert [float(row["lr"]) for row in history] == pytest.approx([expected_lr] * 2)  # no cosine, no drop yet
    assert json.loads((run_dir / "config.json").read_text())["scheduler"] == "plateau"


def test_cli_fine_tunes_a_checkpoint_on_a_folder(tmp_path, tiny_run):
    _, _, source_dir = tiny_run
    data = make_image_folder(tmp_path / "shapes", {"a": 8, "b": 8, "c": 8, "d": 8})
    proc = run_edgeft(["train", "--data", str(data), "--weights", str(source_dir / "best.pt"), "--freeze-epochs", "1",
                       "--epochs", "2", "--img-size", "16", "--batch-size", "8", "--name", "ft"], cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "ft"
    assert [row["phase"] for row in read_history(run_dir)] == ["head", "all"]
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["classes"] == ["a", "b", "c", "d"] and checkpoint["in_chans"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_files"] == 0 and summary["classes"] == ["a", "b", "c", "d"]


RESUME_ARGS = ["train", "--epochs", "4", "--img-size", "16", "--batch-size", "32", "--patience", "0"]


def last_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")["state_dict"]


@pytest.mark.slow
def test_cli_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    env = offline_env(tmp_path / ".torch_home")
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([*edgeft_command(), *RESUME_ARGS, "--name", "killed"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        rows: list[dict] = []
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "history.csv").is_file():
                rows = read_history(run_dir)
                if len(rows) >= 2:
                    break
            time.sleep(0.05)
        assert len(rows) == 2, f"epoch 2 did not finish: {proc.poll()} {proc.stderr.read() if proc.poll() else ''}"
        time.sleep(0.4 * float(rows[1]["seconds"]))  # well inside epoch 3
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [int(r["epoch"]) for r in read_history(run_dir)] == [1, 2], "the kill came after epoch 3 ended"
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(run_dir / "last.pt")["resume"]["epoch"] == 2
    load_checkpoint(run_dir / "best.pt")

    resumed = run_edgeft(["train", "--resume", "runs/killed"], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    history = read_history(run_dir)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["epochs"] == 4
    assert load_checkpoint(run_dir / "last.pt")["resume"]["epoch"] == 4
    load_checkpoint(run_dir / "best.pt")
    assert not (tmp_path / "runs" / "killed-2").exists()  # continued in place

    reference = run_edgeft([*RESUME_ARGS, "--name", "reference"], cwd=tmp_path, env=env)
    assert reference.returncode == 0, reference.stderr
    ref_dir = tmp_path / "runs" / "reference"
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr"):
        assert [r[key] for r in read_history(ref_dir)] == [r[key] for r in history], key
    ours, theirs = last_state(run_dir), last_state(ref_dir)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(tmp_path):
    """--compile trains through torch.compile; the checkpoint holds the plain module's weights."""
    from edgeft.config import ExportConfig
    from edgeft.export import export

    result = train(TrainConfig(model="mobilenet_v3_small", img_size=16, epochs=1, compile=True,
                               out=str(tmp_path / "runs"), name="compiled"))  # fmt: skip
    state = load_checkpoint(result.best_checkpoint)["state_dict"]
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in state)
    assert export(ExportConfig(checkpoint=result.best_checkpoint, out=str(tmp_path / "exported"))).passed
