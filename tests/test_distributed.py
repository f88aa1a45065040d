"""torchrun DDP on CPU (gloo): two ranks train as one, write once, and resume after a kill."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest

from test_train import assert_same_run, run_killed_and_resumed

from conftest import offline_env, run_edgeft, time_limit

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgeft"]


def _torchrun(args: list[str], cwd, **kwargs):
    env = offline_env(cwd / ".torch_home", OMP_NUM_THREADS="1")
    return subprocess.run(
        [*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=time_limit(600), **kwargs
    )


def _epochs(run_dir) -> list[int]:
    with open(run_dir / "history.csv") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


def test_two_ranks_match_one_process_and_write_once(tmp_path):
    ddp = _torchrun(["train", "--name", "ddp"], tmp_path)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    single = run_edgeft(["train", "--name", "single"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["ddp", "single"]  # rank 1 made no folder
    summary = json.loads((tmp_path / "runs/ddp/summary.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_identical"] is True
    reference = json.loads((tmp_path / "runs/single/summary.json").read_text())
    assert abs(summary["best_val_acc"] - reference["best_val_acc"]) <= 0.005
    assert _epochs(tmp_path / "runs/ddp") == list(range(1, summary["epochs"] + 1))  # one row per epoch, not two
    assert ddp.stdout.count("best val accuracy") == 1  # only rank 0 reports


def test_killed_torchrun_run_resumes_bit_for_bit(tmp_path):
    """SIGKILL of torchrun and both ranks during epoch 2, `--resume` under torchrun: the same
    history and weights as an uninterrupted 2-process run."""
    args = ["train", "--img-size", "16", "--epochs", "3", "--batch-size", "64", "--patience", "0"]
    env = offline_env(tmp_path / ".torch_home", OMP_NUM_THREADS="1")
    run_dir = run_killed_and_resumed(args, tmp_path, launcher=TORCHRUN, env=env)
    assert _epochs(run_dir) == [1, 2, 3]
    assert json.loads((run_dir / "summary.json").read_text())["ranks_identical"] is True
    reference = _torchrun([*args, "--name", "reference"], tmp_path)
    assert reference.returncode == 0, reference.stderr[-2000:]
    assert_same_run(run_dir, tmp_path / "runs" / "reference")
