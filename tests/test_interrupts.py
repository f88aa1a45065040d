"""edgeft.interrupts: a write that SIGINT or SIGTERM meets is finished first; `edgeft train`
then exits 130 or 143 with one line, and `--resume` continues the run."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from edgeft.checkpoint import load_checkpoint
from edgeft.interrupts import atomic_write, atomic_write_text, deferred_interrupts

from conftest import offline_env, run_edgeft, time_limit

KEPT = "edgeft: interrupted; nothing half-written was kept: checkpoints and exported files already written are intact"


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --- the critical section, in this process ----------------------------------------------------


def test_sigint_inside_a_section_arrives_when_the_outermost_ends():
    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("inner")
        done.append("outer")  # the inner section's end delivers nothing yet
    assert done == ["inner", "outer"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_is_delivered_to_the_handler_in_place_before():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with deferred_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            assert seen == []
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_interrupted_atomic_write_is_completed_then_raises(tmp_path):
    path = tmp_path / "history.csv"
    atomic_write_text(path, "old\n")
    with pytest.raises(KeyboardInterrupt), atomic_write(path) as f:
        f.write(b"new, ")
        os.kill(os.getpid(), signal.SIGINT)
        f.write(b"complete\n")
    assert path.read_text() == "new, complete\n"
    assert temporaries(tmp_path) == []


def test_failed_atomic_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_text(path, "{}\n")
    with pytest.raises(OSError), atomic_write(path) as f:
        f.write(b'{"half": ')
        raise OSError("no space left on device")
    assert path.read_text() == "{}\n"
    assert temporaries(tmp_path) == []


def test_atomic_write_works_outside_the_main_thread(tmp_path):
    errors = []

    def write():
        try:
            atomic_write_text(tmp_path / "config.json", "{}\n")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=write)
    thread.start()
    thread.join()
    assert errors == [] and (tmp_path / "config.json").read_text() == "{}\n"


# --- the real CLI, signalled at a chosen point --------------------------------------------------

# `python -c HOOK TARGET N SIGNAL <edgeft arguments>`: the real `edgeft` main in this process, after
# wrapping TARGET so that its Nth call sends SIGNAL to the process. "torch.save write" counts the
# writes torch.save's C++ writer makes to its file, so the signal lands inside the writer.
HOOK = r"""
import os, signal, sys
import matplotlib.figure, torch, torch.nn.functional
target, at, signame = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = ["edgeft", *sys.argv[4:]]
calls = 0

def tick():
    global calls
    calls += 1
    if calls == at:
        os.kill(os.getpid(), getattr(signal, signame))

def wrap(owner, name):
    real = getattr(owner, name)
    def wrapper(*args, **kwargs):
        tick()
        return real(*args, **kwargs)
    setattr(owner, name, wrapper)

class Writes:
    def __init__(self, f):
        self.f = f
    def write(self, data):
        written = self.f.write(data)
        tick()  # the bytes are in the file, the writer has not counted them yet
        return written
    def __getattr__(self, name):
        return getattr(self.f, name)

if target == "torch.save write":
    real_save = torch.save
    torch.save = lambda obj, f, *args, **kwargs: real_save(obj, Writes(f), *args, **kwargs)
else:
    owner, name = {"os.replace": (os, "replace"), "cross_entropy": (torch.nn.functional, "cross_entropy"),
                   "savefig": (matplotlib.figure.Figure, "savefig")}[target]
    wrap(owner, name)
from edgeft.cli import main
main()
"""
TRAIN = ["train", "--epochs", "2", "--img-size", "16", "--batch-size", "64", "--patience", "0", "--name", "run"]
# resnet18 on digits, 2 epochs: 25 cross_entropy calls an epoch (23 steps, then 2 validation batches);
# torch.save makes 644 writes for best.pt and 1579 for last.pt; os.replace: config.json, then best.pt
CASES = {  # name -> target, N, signal, epochs complete when it stops (0: no last.pt to resume)
    "inside best.pt": ("torch.save write", 2, "SIGINT", 1),
    "sigterm placing best.pt": ("os.replace", 2, "SIGTERM", 1),
    "training step": ("cross_entropy", 5, "SIGINT", 0),
    "validation": ("cross_entropy", 24, "SIGINT", 0),
    "inside last.pt": ("torch.save write", 1000, "SIGINT", 1),
    "sigterm inside last.pt": ("torch.save write", 1000, "SIGTERM", 1),
    "curves": ("savefig", 1, "SIGINT", 1),
    "epoch 2 step": ("cross_entropy", 30, "SIGINT", 1),
    "inside best.pt of epoch 2": ("torch.save write", 2500, "SIGINT", 2),
}
FAST = ("inside best.pt", "sigterm placing best.pt")


def epochs_in(run_dir: Path) -> list[int]:
    with (run_dir / "history.csv").open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize(
    "case", [case if case in FAST else pytest.param(case, marks=pytest.mark.slow) for case in CASES]
)
def test_signalled_run_keeps_a_resumable_run_folder(tmp_path, case):
    target, at, signame, complete = CASES[case]
    env = offline_env(tmp_path / ".torch_home", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", HOOK, target, str(at), signame, *TRAIN],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=time_limit(300),
        check=False,
    )
    assert proc.returncode == 128 + getattr(signal, signame), proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == KEPT
    assert all(line.startswith("epoch ") for line in lines[:-1]), proc.stderr  # the progress bar, nothing else
    run_dir = tmp_path / "runs" / "run"
    assert temporaries(run_dir) == []
    if not complete:
        assert not (run_dir / "last.pt").exists()
        return
    last = load_checkpoint(run_dir / "last.pt")
    assert last["resume"]["epoch"] == complete and epochs_in(run_dir) == list(range(1, complete + 1))
    assert load_checkpoint(run_dir / "best.pt")["metrics"]["epoch"] <= complete
    assert (run_dir / "curves.png").read_bytes().startswith(b"\x89PNG")
    resumed = run_edgeft(["train", "--resume", str(run_dir)], cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert epochs_in(run_dir) == [1, 2] and (run_dir / "summary.json").is_file()
