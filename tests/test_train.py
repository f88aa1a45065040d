"""edgeft.train and `edgeft train`: the run folder, checkpoints that reproduce their accuracy,
freezing, fine-tuning across class counts, early stopping, optimizers and schedules, resume."""

from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from PIL import Image

import edgeft.train as train_module
from edgeft.checkpoint import load_checkpoint, save_checkpoint
from edgeft.data import iterate_batches, load_data
from edgeft.errors import InputError
from edgeft.models import get_model
from edgeft.preprocess import Preprocess
from edgeft.train import LearningRate, TrainConfig, resume, train

from conftest import edgeft_command, make_image_folder, offline_env, one_line_error, run_edgeft, time_limit

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
    resolved = {  # found from anywhere; no default left unresolved
        **asdict(config),
        "data_root": str(Path(config.data_root).resolve()),
        "lr": config.resolved_lr(),
        "amp": False,
        "channels_last": False,
        "threads": torch.get_num_threads(),
    }
    assert json.loads((run_dir / "config.json").read_text()) == resolved
    assert json.loads((run_dir / "summary.json").read_text())["threads"] == torch.get_num_threads()

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
    bundle = load_data(
        config.data, img_size=spec.size, channels=spec.channels, val_split=config.val_split, seed=config.seed
    )
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
        resume(run_dir / "best.pt")
    with pytest.raises(InputError):
        resume(run_dir / "nothing-here")


def test_run_folders_are_numbered_not_overwritten(tmp_path):
    config = tiny_config(tmp_path, epochs=1, name="same", data=str(make_image_folder(tmp_path / "d", {"a": 4, "b": 4})))
    first = Path(train(config).run_dir)
    second = Path(train(config).run_dir)
    assert first.name == "same" and second.name == "same-2"
    assert (first / "best.pt").is_file() and (second / "best.pt").is_file()


def test_a_finished_run_leaves_no_data_workers(tmp_path, image_folder):
    """The processes that read a folder live as long as the run: several runs in one process
    (as `edgeft compare` trains) do not pile them up."""
    before = set(multiprocessing.active_children())
    train(tiny_config(tmp_path, data=str(image_folder), epochs=1, batch_size=8, workers=2))
    assert set(multiprocessing.active_children()) - before == set()


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
    config = tiny_config(
        tmp_path,
        data=str(data),
        weights=str(source_dir / "best.pt"),
        epochs=2,
        freeze_epochs=1,
        batch_size=8,
        name="ft",
    )
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
    config = tiny_config(
        tmp_path,
        data=str(data),
        weights=str(source_dir / "best.pt"),
        epochs=6,
        freeze_epochs=5,
        lr=0.0,
        patience=2,
        batch_size=8,
        name="stop",
    )
    result = train(config)
    assert result.stopped_early is True
    assert result.epochs == 3 and len(read_history(Path(result.run_dir))) == 3
    losses = [row["val_loss"] for row in result.history]
    assert all(later >= losses[0] for later in losses[1:])
    summary = json.loads((Path(result.run_dir) / "summary.json").read_text())
    assert summary["epochs"] == 3 and summary["stopped_early"] is True
    saved = load_checkpoint(Path(result.run_dir) / "last.pt")["resume"]
    assert saved["epoch"] == 3 and saved["stopped_early"] is True
    assert resume(result.run_dir).epochs == 3  # resuming does not continue a stopped run ...


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
        {"lr": -1.0},
        {"lr": float("nan")},
        {"optimizer": "sgd", "momentum": -1.0},
        {"workers": -1},
        {"max_bad_fraction": -1.0},
        {"plateau_patience": 0},
        {"plateau_factor": 1.5},
        {"warmup_epochs": -1.0},
        {"patience": -1},
        {"weights": "/nonexistent.pt"},
        {"data": "no-such-folder"},
        {"device": "cuda"} if not torch.cuda.is_available() else {"device": "cuda:99"},
        {"device": "tpu"},
    ],
)
def test_bad_config_is_an_input_error_before_any_output(tmp_path, overrides):
    with pytest.raises(InputError):
        train(tiny_config(tmp_path, **overrides))
    assert not (tmp_path / "runs").exists()


# --- the CLI --------------------------------------------------------------------------------------


def test_cli_fine_tunes_a_checkpoint_on_a_folder(tmp_path, tiny_run):
    _, _, source_dir = tiny_run
    data = make_image_folder(tmp_path / "shapes", {"a": 8, "b": 8, "c": 8, "d": 8})
    proc = run_edgeft(
        [
            "train",
            "--data",
            str(data),
            "--weights",
            str(source_dir / "best.pt"),
            "--freeze-epochs",
            "1",
            "--epochs",
            "2",
            "--img-size",
            "16",
            "--batch-size",
            "8",
            "--name",
            "ft",
        ],
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "ft"
    assert [row["phase"] for row in read_history(run_dir)] == ["head", "all"]
    checkpoint = load_checkpoint(run_dir / "best.pt")
    assert checkpoint["classes"] == ["a", "b", "c", "d"] and checkpoint["in_chans"] == 3
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["skipped_files"] == 0 and summary["classes"] == ["a", "b", "c", "d"]


def last_state(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "last.pt")["state_dict"]


def descendants(pid: int) -> list[int]:
    """The processes below `pid` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            children.setdefault(int(stat.read_text().rsplit(")", 1)[1].split()[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def running(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def run_killed_and_resumed(args: list[str], cwd: Path, *, launcher: list[str] | None = None, env=None) -> Path:
    """Run `edgeft <args> --name killed`, SIGKILL it (the whole process group) during its second
    epoch or later, resume it with `--resume`, and return the run folder."""
    env = env or offline_env(cwd / ".torch_home", OMP_NUM_THREADS="1")
    launcher = launcher or edgeft_command()
    run_dir = cwd / "runs" / "killed"
    proc = subprocess.Popen(
        [*launcher, *args, "--name", "killed"],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + time_limit(300)
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "history.csv").is_file() and read_history(run_dir):
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.3 * float(read_history(run_dir)[0]["seconds"]))  # inside epoch 2
        workers = descendants(proc.pid)  # torchrun's ranks run in sessions of their own
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=time_limit(30))
        ended = time.monotonic() + time_limit(10)
        while time.monotonic() < ended and any(map(running, workers)):
            time.sleep(0.05)
        assert not any(map(running, workers)), "a process of the killed run trains on"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (run_dir / "summary.json").exists(), "the kill came after the run ended"
    left = [p.name for p in run_dir.iterdir() if p.name.startswith(".")]
    assert all(".edgeft-tmp" in name for name in left), left  # a killed write leaves only a temporary
    resumed = subprocess.run(
        [*launcher, "train", "--resume", str(run_dir)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=time_limit(600),
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # the resume removed them
    return run_dir


def assert_same_run(ours: Path, theirs: Path) -> None:
    """Bit for bit: every history column but timings, and every tensor of last.pt."""
    for key in ("phase", "lr", "train_loss", "train_acc", "val_loss", "val_acc"):
        assert [r[key] for r in read_history(ours)] == [r[key] for r in read_history(theirs)], key
    mine, reference = last_state(ours), last_state(theirs)
    assert mine.keys() == reference.keys()
    for key in mine:
        assert torch.equal(mine[key], reference[key]), key


def small_weights(tmp_path: Path) -> Path:
    """A resnet18 state_dict (10 classes, RGB) to fine-tune from, made here."""
    torch.manual_seed(1)
    path = tmp_path / "weights.pt"
    torch.save(get_model("resnet18", num_classes=10).state_dict(), path)
    return path


KILL_CASES = {  # name -> options of a run killed in its second epoch (folder data: 2 x 16 images, 16 px)
    "folder with workers": ["--workers", "2", "--epochs", "3"],
    "frozen phase": ["--weights", "{weights}", "--freeze-epochs", "2", "--epochs", "3", "--workers", "0"],
    "plateau": [
        "--scheduler",
        "plateau",
        "--plateau-patience",
        "1",
        "--warmup-epochs",
        "0",
        "--epochs",
        "4",
        "--workers",
        "0",
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(KILL_CASES))
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, case):
    data = make_image_folder(tmp_path / "shapes", {"a": 16, "b": 16}, size=20, ext=".jpg")
    weights = small_weights(tmp_path) if "{weights}" in KILL_CASES[case] else ""
    options = [arg.replace("{weights}", str(weights)) for arg in KILL_CASES[case]]
    args = ["train", "--data", str(data), "--img-size", "16", "--batch-size", "8", "--patience", "0", *options]
    run_dir = run_killed_and_resumed(args, tmp_path)
    reference = run_edgeft(
        [*args, "--name", "reference"], cwd=tmp_path, env=offline_env(tmp_path / ".torch_home", OMP_NUM_THREADS="1")
    )
    assert reference.returncode == 0, reference.stderr
    assert_same_run(run_dir, tmp_path / "runs" / "reference")
    assert not (tmp_path / "runs" / "killed-2").exists()  # continued in place


@pytest.mark.slow
def test_compiled_training_saves_plain_weights(tmp_path):
    """--compile trains through torch.compile; the checkpoint holds the plain module's weights."""
    from edgeft.config import ExportConfig
    from edgeft.export import export

    result = train(
        TrainConfig(model="resnet18", img_size=16, epochs=1, compile=True, out=str(tmp_path / "runs"), name="compiled")
    )
    state = load_checkpoint(result.best_checkpoint)["state_dict"]
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in state)
    assert export(ExportConfig(checkpoint=result.best_checkpoint, out=str(tmp_path / "exported"))).passed


# --- the learning rate: one owner, computed by hand -----------------------------------------------

SPE = 2  # steps per epoch of the tables below: 3 epochs, 6 steps, base rate 1.0


def cos_factor(progress: float) -> float:
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress))


# (scheduler, warm-up epochs, frozen epochs) -> the rate of each of the 6 steps
HAND_TABLES = {
    ("none", 0, 0): [1, 1, 1, 1, 1, 1],
    ("none", 1, 0): [1 / 3, 2 / 3, 1, 1, 1, 1],  # warm-up: 2 steps, (t + 1) / (2 + 1)
    ("none", 0, 1): [1, 1, 0.1, 0.1, 0.1, 0.1],  # unfrozen at 0.1 x
    ("none", 1, 1): [1 / 2, 1, 0.1 / 3, 0.2 / 3, 0.1, 0.1],  # warm-up capped at half the 2-step phase: 1 step
    ("cosine", 0, 0): [cos_factor(t / 6) for t in range(6)],
    ("cosine", 1, 0): [1 / 3, 2 / 3] + [cos_factor(t / 4) for t in range(4)],
    ("cosine", 0, 1): [cos_factor(0), cos_factor(1 / 2)] + [0.1 * cos_factor(t / 4) for t in range(4)],
    ("cosine", 1, 1): [1 / 2, cos_factor(0), 0.1 / 3, 0.2 / 3, 0.1 * cos_factor(0), 0.1 * cos_factor(1 / 2)],
    ("plateau", 0, 0): [1, 1, 1, 1, 1, 1],  # no cut without val losses
    ("plateau", 1, 0): [1 / 3, 2 / 3, 1, 1, 1, 1],
    ("plateau", 0, 1): [1, 1, 0.1, 0.1, 0.1, 0.1],
    ("plateau", 1, 1): [1 / 2, 1, 0.1 / 3, 0.2 / 3, 0.1, 0.1],
}


@pytest.mark.parametrize(("scheduler", "warmup", "frozen"), list(HAND_TABLES))
def test_rate_per_step_matches_the_hand_computed_table(scheduler, warmup, frozen):
    config = TrainConfig(
        lr=1.0,
        epochs=3,
        scheduler=scheduler,
        warmup_epochs=warmup,
        freeze_epochs=frozen,
        weights="w.pt" if frozen else "none",
        unfreeze_lr_scale=0.1,
    )
    rate = LearningRate(config, SPE)
    assert [rate.at(step) for step in range(6)] == pytest.approx(HAND_TABLES[scheduler, warmup, frozen], abs=1e-12)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    for step in range(6):  # what apply sets is what the optimizer steps with: nothing else touches it
        assert rate.apply(optimizer, step) == optimizer.param_groups[0]["lr"] == pytest.approx(rate.at(step))


def test_plateau_cuts_after_patience_flat_epochs_and_restarts_at_unfreeze():
    config = TrainConfig(
        lr=1.0,
        epochs=8,
        scheduler="plateau",
        warmup_epochs=0,
        plateau_patience=2,
        plateau_factor=0.5,
        freeze_epochs=6,
        weights="w.pt",
        unfreeze_lr_scale=0.1,
    )
    rate = LearningRate(config, 1)
    used = []
    for epoch, val_loss in enumerate([1.0, 0.9, 0.9, 0.90001, 0.8, 0.8, 5.0, 5.0]):
        used.append(rate.at(epoch))
        rate.end_epoch(epoch, val_loss)
    # epochs 3 and 4 flat (0.90001 is within the 1e-4 threshold): cut after epoch 4; the unfrozen phase starts again
    assert used == pytest.approx([1, 1, 1, 1, 0.5, 0.5, 0.1, 0.1])
    restored = LearningRate(config, 1)
    restored.load_state_dict(rate.state_dict())
    assert restored.at(7) == rate.at(7)


def test_plateau_run_drops_the_rate_it_trains_with(tmp_path, tiny_run):
    """A flat val loss (backbone frozen, a tiny rate): history.csv shows the cut after
    `plateau_patience` flat epochs, and the optimizer holds the logged rate."""
    _, _, source_dir = tiny_run
    data = make_image_folder(tmp_path / "shapes", {"a": 6, "b": 6})
    config = tiny_config(
        tmp_path,
        data=str(data),
        weights=str(source_dir / "best.pt"),
        epochs=5,
        freeze_epochs=4,
        lr=1e-9,
        scheduler="plateau",
        plateau_patience=2,
        warmup_epochs=0,
        batch_size=8,
        name="plateau",
    )
    result = train(config)
    logged = [float(row["lr"]) for row in read_history(Path(result.run_dir))]
    assert logged == pytest.approx([1e-9, 1e-9, 1e-9, 0.2e-9, 0.1e-9], rel=1e-9)
    groups = load_checkpoint(Path(result.run_dir) / "last.pt")["resume"]["optimizer"]["param_groups"]
    assert all(group["lr"] == pytest.approx(logged[-1], rel=1e-12) for group in groups)


def test_logged_rate_is_the_rate_of_the_last_step(tiny_run):
    config, result, run_dir = tiny_run
    steps = math.ceil(len(load_data("digits", img_size=16).train) / config.batch_size)
    expected = LearningRate(TrainConfig(**json.loads((run_dir / "config.json").read_text())), steps)
    assert [row["lr"] for row in result.history] == [expected.at((e + 1) * steps - 1) for e in range(2)]


# --- extending a run with resume ------------------------------------------------------------------


def test_resume_extends_a_finished_run(tmp_path, tiny_run):
    _, _, source_dir = tiny_run
    run_dir = tmp_path / "extended"
    shutil.copytree(source_dir, run_dir)
    with pytest.raises(InputError):
        resume(run_dir, epochs=1)  # fewer than it has
    result = resume(run_dir, epochs=3)
    assert [int(row["epoch"]) for row in read_history(run_dir)] == [1, 2, 3] and result.epochs == 3
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
    assert resume(run_dir).epochs == 3  # finished: nothing more to do


@pytest.fixture(scope="module")
def other_run(tmp_path_factory) -> Path:
    """A second, shorter run (another name): its last.pt is foreign to `tiny_run`'s folder."""
    return Path(train(tiny_config(tmp_path_factory.mktemp("other"), epochs=1, name="other")).run_dir)


def _old_format(path: Path) -> None:
    """Rewrite a checkpoint as edgeft wrote it before run ids."""
    content = load_checkpoint(path)
    del content["run_id"]
    save_checkpoint(path, content)


@pytest.mark.parametrize("case", ["foreign", "foreign, no config.json", "foreign and old, alone in a folder"])
def test_resume_refuses_the_last_checkpoint_of_another_run(tmp_path, tiny_run, other_run, case):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[2], run_dir)
    shutil.copy(other_run / "last.pt", run_dir / "last.pt")  # used to resume, rewriting config.json and summary.json
    if case != "foreign":
        (run_dir / "config.json").unlink()
    if case == "foreign and old, alone in a folder":
        (run_dir / "best.pt").unlink()
        _old_format(run_dir / "last.pt")
    before = {path.name: path.read_bytes() for path in run_dir.iterdir()}
    for source in (run_dir, run_dir / "last.pt"):
        with pytest.raises(InputError, match="does not belong to the run in"):
            resume(source, epochs=3)
    assert {path.name: path.read_bytes() for path in run_dir.iterdir()} == before


def test_resume_accepts_its_own_checkpoints_of_before_run_ids(tmp_path, tiny_run):
    run_dir = tmp_path / "tiny"
    shutil.copytree(tiny_run[2], run_dir)
    for name in ("last.pt", "best.pt"):
        _old_format(run_dir / name)
    assert resume(run_dir).epochs == 2
    renamed = run_dir.rename(tmp_path / "renamed")  # and an old last.pt is judged by its folder name too
    with pytest.raises(InputError, match="trained in a folder named 'tiny'"):
        resume(renamed)
    assert load_checkpoint(tiny_run[2] / "best.pt")["run_id"] == load_checkpoint(tiny_run[2] / "last.pt")["run_id"]


def test_relative_data_path_is_stored_absolute(tmp_path, monkeypatch):
    from edgeft.data import load_checkpoint_data

    make_image_folder(tmp_path / "data" / "tiny", {"a": 4, "b": 4})
    monkeypatch.chdir(tmp_path)
    result = train(tiny_config(Path("."), data="data/tiny", epochs=1, batch_size=4, out="runs", name="rel"))
    checkpoint = load_checkpoint(tmp_path / "runs" / "rel" / "best.pt")
    assert checkpoint["config"]["data"] == str(tmp_path / "data" / "tiny")
    monkeypatch.chdir(tmp_path / "runs")  # export and validate find the data from anywhere
    assert len(load_checkpoint_data(checkpoint).val) == 2
    assert result.img_size == 16


# --- the CLI: bad values, bad folders, the image size --------------------------------------------


@pytest.mark.parametrize(
    "option",
    [
        ["--lr", "-1"],
        ["--optimizer", "sgd", "--momentum", "-1"],
        ["--workers", "-1"],
        ["--max-bad-fraction", "-1"],
        ["--plateau-patience", "0"],
    ],
)
def test_cli_bad_values_exit_2_before_any_folder(tmp_path, option):
    proc = run_edgeft(["train", *option], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert option[-2] in one_line_error(proc.stderr)
    assert not (tmp_path / "runs").exists()


def test_cli_all_corrupt_folder_exits_2(tmp_path):
    for name in ("a", "b"):
        (tmp_path / "bad" / name).mkdir(parents=True)
        for i in range(3):
            (tmp_path / "bad" / name / f"{i}.png").write_bytes(b"not an image")
    proc = run_edgeft(["train", "--data", "bad", "--epochs", "1"], cwd=tmp_path)
    assert proc.returncode == 2 and "not readable images" in one_line_error(proc.stderr)
    assert not (tmp_path / "runs").exists()


def test_cli_resume_extends_and_refuses_other_options(tmp_path, tiny_run):
    _, _, source_dir = tiny_run
    run_dir = tmp_path / "[red]run"
    shutil.copytree(source_dir, run_dir)
    refused = run_edgeft(["train", "--resume", str(run_dir), "--lr", "0.1"], cwd=tmp_path)
    assert refused.returncode == 2 and "--lr" in one_line_error(refused.stderr)
    proc = run_edgeft(["train", "--resume", str(run_dir), "--epochs", "3"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert [int(row["epoch"]) for row in read_history(run_dir)] == [1, 2, 3]
    assert "[red]run" in proc.stdout  # the user's path, printed as given


def test_cli_shows_the_image_size_chosen_from_the_data(tmp_path):
    make_image_folder(tmp_path / "small", {"a": 4, "b": 4}, size=25, modes=("L",))
    proc = run_edgeft(
        ["train", "--data", "small", "--epochs", "1", "--batch-size", "4", "--workers", "0"], cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert "32 px" in proc.stdout
    config = json.loads(next((tmp_path / "runs").glob("*/config.json")).read_text())
    assert config["img_size"] == 32 and config["data"] == str(tmp_path / "small")


def test_amp_on_a_cpu_is_bf16_only_where_native():
    from edgeft.cpu import has_bf16
    from edgeft.train import autocast_dtype

    assert autocast_dtype(CPU, None) is None and autocast_dtype(CPU, False) is None  # off by default on CPUs
    assert autocast_dtype(CPU, True) == (torch.bfloat16 if has_bf16() else None)
