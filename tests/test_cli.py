"""The `edgeft` command as a user runs it: real subprocesses, real exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import torchvision

import edgeft

from conftest import edgeft_command, make_image_folder, offline_env, one_line_error, run_edgeft, time_limit

REQUIRED_MODELS = [
    "resnet18",
    "resnet34",
    "resnet50",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "densenet121",
    "densenet169",
    "densenet201",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
]
TINY = ["--epochs", "1", "--img-size", "16", "--batch-size", "8"]


def prepare(case: str, cwd: Path) -> tuple[list[str], list[str]]:
    """The arguments of one bad-input case (files prepared under cwd) and words the error must name."""
    if case == "unknown model":
        return ["train", "--model", "resnet19", *TINY], ["resnet19", "resnet18", "densenet121"]
    if case == "missing folder":
        return ["train", "--data", str(cwd / "no-such-folder"), *TINY], ["no-such-folder"]
    if case == "empty folder":
        (cwd / "empty").mkdir()
        return ["train", "--data", str(cwd / "empty"), *TINY], ["empty"]
    if case == "one class":
        make_image_folder(cwd / "single", {"only": 6}, size=8)
        return ["train", "--data", str(cwd / "single"), *TINY], ["single", "2"]
    if case == "bad val split":
        return ["train", "--val-split", "1.5", *TINY], ["--val-split", "1.5"]
    if case == "cuda on a cpu machine":
        return ["train", "--device", "cuda", *TINY], ["cuda"]
    if case == "cifar10 offline":
        return ["train", "--data", "cifar10", "--data-root", str(cwd / "datasets"), *TINY], [str(cwd / "datasets")]
    if case == "imagenet offline":
        make_image_folder(cwd / "shapes", {"a": 3, "b": 3}, size=8)
        folder = str(cwd / ".torch_home" / "hub" / "checkpoints")
        return ["train", "--data", str(cwd / "shapes"), "--weights", "imagenet", *TINY], [
            "resnet18-f37072fd.pth",
            folder,
        ]
    if case == "resume from a text file":
        (cwd / "last.pt").write_text("not a checkpoint")
        return ["train", "--resume", str(cwd / "last.pt")], ["last.pt"]
    return prepare_values(case, cwd)


def prepare_values(case: str, cwd: Path) -> tuple[list[str], list[str]]:
    """Values refused before any work or output ("!word": a word the error must not say)."""
    if case == "long run name":
        return ["train", "--name", "n" * 235, *TINY], ["--name", "200 bytes"]
    if case == "long export name":
        return ["export", "best.pt", "--name", "é" * 101], ["--name", "200 bytes"]
    if case == "huge batch size":
        make_image_folder(cwd / "shapes", {"a": 3, "b": 3}, size=8)
        return ["train", "--data", str(cwd / "shapes"), "--epochs", "1", "--batch-size", str(2**63)], ["--batch-size"]
    if case == "one image per class":
        make_image_folder(cwd / "tiny", {"a": 1, "b": 1}, size=8)
        return ["train", "--data", str(cwd / "tiny"), *TINY], ["at least 2 images", "!--val-split"]
    if case == "negative validate workers":
        return ["validate", "model.onnx", "--workers", "-5"], ["--workers", "-5"]
    if case == "missing calibration folder":
        return ["export", "best.pt", "--precision", "int8", "--calib-data", "nope"], ["nope", "does not exist"]
    if case == "folder as checkpoint":
        (cwd / "best.pt").mkdir()
        return ["export", "best.pt"], ["best.pt", "is a folder", "!does not exist"]
    if case == "fifo as checkpoint":
        os.mkfifo(cwd / "best.pt")
        return ["export", "best.pt"], ["best.pt", "not a regular file", "!does not exist"]
    if case == "random bytes as a model":
        (cwd / "x.pt").write_bytes(os.urandom(64).replace(b"\x80", b"").replace(b"PK", b""))
        return ["info", "x.pt"], ["x.pt", "not an exported model", "!PyTorch"]
    raise AssertionError(case)


BAD_CASES = [
    "unknown model",
    "missing folder",
    "empty folder",
    "one class",
    "bad val split",
    "cifar10 offline",
    "imagenet offline",
    "resume from a text file",
    "long run name",
    "long export name",
    "huge batch size",
    "one image per class",
    "negative validate workers",
    "missing calibration folder",
    "folder as checkpoint",
    "fifo as checkpoint",
    "random bytes as a model",
]
if not torch.cuda.is_available():
    BAD_CASES.append("cuda on a cpu machine")


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory) -> dict:
    """Every bad-input case run as its own `edgeft` process, a few at a time (each mostly waits
    on importing torch)."""
    root = tmp_path_factory.mktemp("bad")

    def run(case: str):
        cwd = root / case.replace(" ", "_")
        cwd.mkdir()
        args, words = prepare(case, cwd)
        return cwd, words, run_edgeft(args, cwd=cwd, timeout=180)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(BAD_CASES, pool.map(run, BAD_CASES)))


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_exits_2_with_one_line(bad_runs, case):
    cwd, words, proc = bad_runs[case]
    assert proc.returncode == 2, proc.stderr
    line = one_line_error(proc.stderr)
    for word in words:
        assert (word[1:] not in line) if word.startswith("!") else (word in line), word
    assert not (cwd / "runs").exists()  # nothing written for a run that never started
    assert not (cwd / "exported").exists()


def test_verbose_shows_the_traceback(tmp_path):
    proc = run_edgeft(["--verbose", "train", "--model", "resnet19"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("edgeft: error:")


def test_models_lists_params_and_gmacs_in_80_columns(tmp_path):
    home = tmp_path / ".torch_home"
    cached = home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")  # only its presence is shown
    proc = run_edgeft(["models"], cwd=tmp_path, env=offline_env(home, COLUMNS="80"))
    assert proc.returncode == 0, proc.stderr
    rows = {}
    for line in proc.stdout.splitlines():
        cells = line.split()
        if len(cells) == 5 and cells[0] in REQUIRED_MODELS:
            rows[cells[0]] = cells
        assert "…" not in line and (len(line) <= 80 or line.endswith("/checkpoints/")), line  # a path: whole
    for name in REQUIRED_MODELS:
        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        assert name in rows, f"{name} missing from:\n{proc.stdout}"
        assert rows[name][1] == f"{meta['num_params'] / 1e6:.1f}"
        assert rows[name][2] == f"{meta['_ops']:.2f}"
        assert rows[name][4] == Path(torchvision.models.get_model_weights(name).DEFAULT.url).name  # whole
    assert "GMACs" in proc.stdout and "GFLOP" not in proc.stdout
    assert rows["resnet18"][3] == "cached" and rows["resnet34"][3] == "missing"
    assert f"{home / 'hub' / 'checkpoints'}/" in proc.stdout.splitlines()  # whole, on its own line


def test_version_and_help(tmp_path):
    proc = run_edgeft(["--version"], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"edgeft {edgeft.__version__}"
    proc = run_edgeft(["--help"], cwd=tmp_path)
    assert proc.returncode == 0
    assert "train" in proc.stdout and "models" in proc.stdout
    proc = run_edgeft(["train", "--help"], cwd=tmp_path, env=offline_env(tmp_path, COLUMNS="200"))
    for option in ("--model", "--data", "--weights", "--img-size", "--val-split", "--freeze-epochs", "--resume"):
        assert option in proc.stdout


def test_cli_import_does_not_load_torch():
    code = "import sys, edgeft.cli; print(sorted(m for m in ('torch', 'torchvision', 'onnx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_console_script_is_installed():
    script = shutil.which("edgeft")
    assert script is not None and edgeft_command() == [script]


@pytest.mark.slow
def test_quickstart_default_train_reaches_the_documented_accuracy(tmp_path):
    """`edgeft train` with every default: resnet18 on the embedded digits, 10 epochs."""
    proc = run_edgeft(["train"], cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "runs" / "resnet18-digits"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["best_val_acc"] >= 0.985
    assert summary["model"] == "resnet18" and summary["data"] == "digits"
    assert (run_dir / "best.pt").is_file()
    assert f"edgeft export {os.path.join('runs', 'resnet18-digits', 'best.pt')}" in " ".join(proc.stdout.split())


@pytest.mark.slow
def test_readme_chain_train_export_predict_on_the_sample_pngs(tmp_path):
    """The README's main line, with defaults for everything but size: each step finds the last one's output."""
    examples = Path(__file__).resolve().parents[1] / "examples" / "digits"
    assert run_edgeft(["train", "--img-size", "16", "--epochs", "3"], cwd=tmp_path).returncode == 0
    export = run_edgeft(["export"], cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    assert (tmp_path / "exported" / "resnet18-digits.onnx").is_file()
    predict = run_edgeft(["predict", str(examples), "--json"], cwd=tmp_path)
    assert predict.returncode == 0, predict.stderr
    assert "exported/resnet18-digits.onnx" in predict.stderr
    records = [json.loads(line) for line in predict.stdout.splitlines()]
    assert len(records) == 10
    correct = sum(r["top_k"][0]["label"] == Path(r["file"]).stem for r in records)
    assert correct >= 7  # the samples are digits the model has learned (chance: 1)


@pytest.mark.slow
def test_ctrl_c_exits_130_and_says_what_was_kept(tmp_path):
    """Ctrl-C during training, right after best.pt appears: one line, exit 130, best.pt and the
    last.pt of its epoch intact, and `--resume` continues."""
    import signal
    import time

    from edgeft.checkpoint import load_checkpoint

    args = ["train", "--epochs", "100", "--img-size", "16", "--batch-size", "64", "--name", "stopped"]
    proc = subprocess.Popen(
        [*edgeft_command(), *args],
        cwd=tmp_path,
        env=offline_env(tmp_path / ".torch_home"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    best = tmp_path / "runs" / "stopped" / "best.pt"
    deadline = time.monotonic() + time_limit(240)
    while not best.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert best.exists() and proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=time_limit(120))
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        "edgeft: interrupted; nothing half-written was kept: checkpoints and exported files already written are intact"
    )
    assert "Traceback" not in err and "unexpected" not in err
    assert load_checkpoint(best)["arch"] == "resnet18"
    done = load_checkpoint(best.parent / "last.pt")["resume"]["epoch"]  # best.pt's epoch has its last.pt
    assert done >= load_checkpoint(best)["metrics"]["epoch"]
    resumed = run_edgeft(["train", "--resume", str(best.parent), "--epochs", str(done + 1)], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e309", "500", "-101"])
def test_validate_refuses_a_gate_that_cannot_fail_or_cannot_pass(tmp_path, value):
    (tmp_path / "model.onnx").write_bytes(b"never read")
    proc = run_edgeft(["validate", "model.onnx", "--max-acc-drop", value, "--json"], cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert "--max-acc-drop must be a number of points between -100 and 100" in one_line_error(proc.stderr)
