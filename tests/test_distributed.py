"""torchrun DDP on CPU (gloo): two ranks train as one, write once, and resume after a kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import offline_env, run_edgeft

from edgeft.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "edgeft"]


def _torchrun(args: list[str], cwd, **kwargs):
    env = offline_env(cwd / ".torch_home", OMP_NUM_THREADS="1")
    return subprocess.run([*TORCHRUN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600, **kwargs)


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


def test_killed_torchrun_run_resumes(tmp_path):
    args = ["train", "--img-size", "16", "--epochs", "4", "--patience", "0", "--name", "killed"]
    env = offline_env(tmp_path / ".torch_home", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([*TORCHRUN, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    run_dir = tmp_path / "runs/killed"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ((run_dir / "history.csv").exists() and len(_epochs(run_dir)) >= 2):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks, mid-epoch 3
    proc.wait()
    done = _epochs(run_dir)
    assert 2 <= len(done) < 4
    assert not list(run_dir.glob("*.tmp")) and load_checkpoint(run_dir / "last.pt")["resume"]["epoch"] == len(done)
    resumed = _torchrun(["train", "--resume", str(run_dir)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _epochs(run_dir) == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["ranks_identical"] is True
    assert load_checkpoint(run_dir / "best.pt")["metrics"]["epoch"] in (1, 2, 3, 4)
