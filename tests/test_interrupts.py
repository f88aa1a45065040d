"""edgeft.interrupts: a write that SIGINT or SIGTERM meets is finished first; `edgeft train`
then exits 130 or 143 with one line, and `--resume` continues the run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgeft import formats
from edgeft.artifact import read_metadata
from edgeft.checkpoint import load_checkpoint
from edgeft.interrupts import atomic_write, atomic_write_text, deferred_interrupts

from conftest import formats_here, offline_env, run_edgeft, time_limit

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
# wrapping TARGET so that its Nth call sends SIGNAL to the process. TARGET is "module:attribute.path";
# "inside module:attribute.path" counts the Python calls made inside its first call instead, so the
# signal lands deep in a library's code (an exporter, a converter); "torch.save write" counts the
# writes torch.save's C++ writer makes to its file, so the signal lands inside the writer.
HOOK = r"""
import functools, importlib, os, signal, sys
import torch
target, at, signame = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.argv = ["edgeft", *sys.argv[4:]]
calls = 0

def tick():
    global calls
    calls += 1
    if calls == at:
        os.kill(os.getpid(), getattr(signal, signame))

def counting_inside(real):
    @functools.wraps(real)  # the same signature for code that inspects it
    def wrapper(*args, **kwargs):
        def profile(frame, event, arg):
            if event == "call":
                tick()
                if calls >= at:
                    sys.setprofile(None)
        if calls < at:
            sys.setprofile(profile)
        try:
            return real(*args, **kwargs)
        finally:
            sys.setprofile(None)
    return wrapper

def counting_calls(real):
    @functools.wraps(real)
    def wrapper(*args, **kwargs):
        tick()
        return real(*args, **kwargs)
    return wrapper

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
    inside = target.startswith("inside ")
    module, path = target.removeprefix("inside ").split(":")
    *owners, name = path.split(".")
    owner = importlib.import_module(module)
    for attribute in owners:
        owner = getattr(owner, attribute)
    setattr(owner, name, (counting_inside if inside else counting_calls)(getattr(owner, name)))
from edgeft.cli import main
main()
"""
TRAIN = ["train", "--epochs", "2", "--img-size", "16", "--batch-size", "64", "--patience", "0", "--name", "run"]
# resnet18 on digits, 2 epochs: 25 cross_entropy calls an epoch (23 steps, then 2 validation batches);
# torch.save makes 644 writes for best.pt and 1579 for last.pt; os.replace: config.json, then best.pt
CROSS_ENTROPY = "torch.nn.functional:cross_entropy"
CASES = {  # name -> target, N, signal, epochs complete when it stops (0: no last.pt to resume)
    "inside best.pt": ("torch.save write", 2, "SIGINT", 1),
    "sigterm placing best.pt": ("os:replace", 2, "SIGTERM", 1),
    "training step": (CROSS_ENTROPY, 5, "SIGINT", 0),
    "validation": (CROSS_ENTROPY, 24, "SIGINT", 0),
    "inside last.pt": ("torch.save write", 1000, "SIGINT", 1),
    "sigterm inside last.pt": ("torch.save write", 1000, "SIGTERM", 1),
    "curves": ("matplotlib.figure:Figure.savefig", 1, "SIGINT", 1),
    "epoch 2 step": (CROSS_ENTROPY, 30, "SIGINT", 1),
    "inside best.pt of epoch 2": ("torch.save write", 2500, "SIGINT", 2),
}
FAST = ("inside best.pt", "sigterm placing best.pt")


def signalled(args: list[str], target: str, at: int, signame: str, *, cwd: Path, env: dict, progress: str = "") -> None:
    """Run `edgeft <args>` under HOOK; it must exit 128 + the signal with KEPT as its last line
    of stderr, after nothing but progress-bar lines (starting with `progress`), and no traceback."""
    proc = subprocess.run(
        [sys.executable, "-c", HOOK, target, str(at), signame, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=time_limit(300),
        check=False,
    )
    assert proc.returncode == 128 + getattr(signal, signame), proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == KEPT
    assert all(progress and line.startswith(progress) for line in lines[:-1]), proc.stderr
    assert "Traceback" not in proc.stderr and "unexpected" not in proc.stderr


def epochs_in(run_dir: Path) -> list[int]:
    with (run_dir / "history.csv").open(newline="") as f:
        return [int(row["epoch"]) for row in csv.DictReader(f)]


@pytest.mark.parametrize(
    "case", [case if case in FAST else pytest.param(case, marks=pytest.mark.slow) for case in CASES]
)
def test_signalled_run_keeps_a_resumable_run_folder(tmp_path, case):
    target, at, signame, complete = CASES[case]
    env = offline_env(tmp_path / ".torch_home", OMP_NUM_THREADS="1")
    signalled(TRAIN, target, at, signame, cwd=tmp_path, env=env, progress="epoch ")
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


# --- edgeft export and edgeft bench, signalled at a chosen point ---------------------------------


def _writer(fmt) -> str:
    """HOOK's target for the 300th Python call inside the format's writer: deep in its exporter."""
    return f"inside {type(fmt).__module__}:FORMAT.write"


INT8 = ["--precision", "int8", "--calib-size", "16"]
EXPORT_CASES = {  # name -> target, N, signal, export options (the format's own writer: test_every_format_...)
    "sealing": ("edgeft.export:write_metadata", 1, "SIGTERM", []),
    "the gate": ("edgeft.export:gate", 1, "SIGINT", []),
    "placing the file": ("os:replace", 1, "SIGTERM", []),
    "quantizing": ("inside edgeft.formats.onnx_int8:quantize_onnx", 300, "SIGINT", INT8),
    "timing an int8 file": ("subprocess:Popen.communicate", 1, "SIGINT", INT8),
}


def interrupted_export(fmt, digits_checkpoint, digits_exports, tmp_path, hook: tuple, options: list[str]) -> Path:
    """`edgeft export` of the digits checkpoint to `fmt` under HOOK, into a folder that holds an
    earlier good file of the same name; checks the exit and that nothing else was left there.
    Returns the file at the final place."""
    target, at, signame = hook
    out = tmp_path / "exported"
    out.mkdir()
    earlier = Path(digits_exports[fmt.name].path)
    for source in fmt.files(earlier):
        shutil.copy(source, out / source.name)
    before = sorted(p.name for p in out.iterdir())
    args = ["export", str(digits_checkpoint), "--format", fmt.name, "--out", str(out), "--name", earlier.stem]
    signalled([*args, *options], target, at, signame, cwd=tmp_path, env=offline_env(tmp_path))
    assert sorted(p.name for p in out.iterdir()) == before  # no temporary, no scratch folder, no other file
    return out / earlier.name


WRITERS = [
    p if p.id == "onnx" else pytest.param(*p.values, id=p.id, marks=[*p.marks, pytest.mark.slow])
    for p in formats_here()
]


@pytest.mark.parametrize("fmt", WRITERS)
def test_every_format_interrupted_inside_its_writer_keeps_the_earlier_file(
    fmt, digits_checkpoint, digits_exports, tmp_path
):
    final = interrupted_export(
        fmt, digits_checkpoint, digits_exports, tmp_path, (_writer(fmt), 300, "SIGINT"), ["--no-validate"]
    )
    for kept, earlier in zip(fmt.files(final), fmt.files(Path(digits_exports[fmt.name].path))):
        assert kept.read_bytes() == earlier.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_interrupted_export_keeps_the_earlier_file_or_places_the_new_one_whole(
    case, digits_checkpoint, digits_exports, tmp_path
):
    *hook, options = EXPORT_CASES[case]
    onnx = formats.get("onnx")
    final = interrupted_export(onnx, digits_checkpoint, digits_exports, tmp_path, tuple(hook), options)
    if case == "placing the file":  # the signal waited until the new file was in place
        assert read_metadata(final)["created"] >= read_metadata(digits_exports["onnx"].path)["created"]
        assert final.read_bytes() != Path(digits_exports["onnx"].path).read_bytes()
    else:
        assert final.read_bytes() == Path(digits_exports["onnx"].path).read_bytes()


BENCH = ["bench", "--models", "resnet18", "--img-size", "32", "--runtimes", "onnxruntime", "--precisions", "fp32"]
BENCH_CASES = {  # name -> target, N, signal
    "writing a timed file": ("onnx:load", 1, "SIGINT"),  # between the exporter's write and edgeft's rewrite
    "timing the row": ("subprocess:Popen.communicate", 3, "SIGTERM"),  # after `uname -p` and the matmul peak
    "drawing the report": ("PIL.ImageFile:_save", 1, "SIGINT"),  # the PNG's header written, not its pixels
}


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c != "drawing the report" else c for c in BENCH_CASES]
)
def test_interrupted_bench_leaves_complete_files_only(case, tmp_path):
    """`edgeft bench --keep-files` signalled while it writes a file to time, times a row, or draws
    its report: what it leaves is complete, an earlier report untouched."""
    out = tmp_path / "reports"
    out.mkdir()
    earlier = {out / "bench-20000101-000000.md": "# an earlier report\n", out / "bench-20000101-000000.json": "{}\n"}
    for path, text in earlier.items():
        path.write_text(text)
    cache = tmp_path / "cache"  # its own, empty: every file is made in this run
    args = [*BENCH, "--batch-sizes", "1", "--quick", "--keep-files", "--out", str(out), "--cache-dir", str(cache)]
    signalled(args, *BENCH_CASES[case], cwd=tmp_path, env=offline_env(tmp_path), progress="resnet18: ")
    assert all(path.read_text() == text for path, text in earlier.items())
    assert list(cache.glob(".*")) == []  # no temporary in the cache
    left = [p for p in out.rglob("*") if p.is_file() and p not in earlier]
    assert [p.name for p in left if p.name.startswith(".")] == []  # no temporary
    for path in left:
        if path.suffix == ".png":
            with Image.open(path) as png:
                png.load()  # every pixel there
        elif path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".pt":
            load_checkpoint(path)
        elif path.suffix != ".md":
            formats.for_path(path).open(path).infer(np.zeros((1, 3, 32, 32), np.float32))  # a whole model


def test_bench_interrupted_while_making_files_in_parallel_leaves_no_temporary(tmp_path):
    """SIGINT after the first of four files made in other processes: the makers are stopped, and
    the cache holds complete entries only."""
    cache = tmp_path / "cache"
    runtimes_and_precisions = ["--runtimes", "onnxruntime,openvino", "--precisions", "fp32,int8"]
    args = [*BENCH[:5], *runtimes_and_precisions, "--batch-sizes", "1", "--quick", "--cache-dir", str(cache)]
    hook = ("multiprocessing.pool:IMapIterator.__next__", 2, "SIGINT")
    signalled(args, *hook, cwd=tmp_path, env=offline_env(tmp_path), progress="resnet18: ")
    entries = list(cache.iterdir())
    assert [e.name for e in entries if e.name.startswith(".")] == []  # no temporary
    assert all((entry / "made.json").is_file() for entry in entries)
    assert len(entries) < 1 + 4  # the random-weights checkpoint and fewer than the four files
