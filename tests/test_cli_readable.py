"""The CLI as read at 80 columns: help that says everything without cutting a name, output that
fits, progress a user can see, and words that are true. Real subprocesses throughout."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest
import typer.main

from edgeft import formats
from edgeft.cli import app
from edgeft.cli.helptext import WORKFLOW

from conftest import edgeft_command, make_image_folder, offline_env, one_line_error, run_edgeft, time_limit

COMMANDS = typer.main.get_command(app).commands


def _help_at_80(tmp_path) -> dict[str, str]:
    """Every command's `--help` (and the root's, under ""), as a piped 80-column console prints it."""
    env = offline_env(tmp_path / ".torch_home", COLUMNS="80")

    def one(command: str) -> str:
        proc = run_edgeft([*command.split(), "--help"], cwd=tmp_path, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    names = ["", *COMMANDS]
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(names, pool.map(one, names)))


@pytest.fixture(scope="module")
def helps(tmp_path_factory):
    return _help_at_80(tmp_path_factory.mktemp("help"))


def test_every_help_fits_80_columns_without_a_cut(helps):
    for command, text in helps.items():
        for line in text.splitlines():
            assert len(line) <= 80, f"{command} --help: {line!r}"
            assert "…" not in line, f"{command} --help cuts: {line!r}"


def test_every_option_is_described_and_named_whole(helps):
    for name, command in COMMANDS.items():
        text = helps[name]
        for param in command.params:
            assert (param.help or "").strip(), f"{name} {param.name}: no description"
            for opt in (*param.opts, *param.secondary_opts):
                if opt.startswith("--"):
                    assert re.search(rf"(^|[\s,]){re.escape(opt)}($|[\s,])", text, re.M), f"{name}: {opt} not shown"


def test_flags_take_no_value_and_values_have_one_notation(helps):
    for command, text in helps.items():
        assert not re.search(r"<(bool|str|int|float|path)>", text), f"{command} --help: typer's <type> notation"
    assert re.search(r"--force\s+Keep", helps["export"])  # a flag: name, then what it does
    assert re.search(r"--calib-size\s+INT\s", helps["export"])


def test_help_shows_choices_from_the_registries_with_markup_escaped(helps):
    export = " ".join(helps["export"].split())
    for f in formats.all_formats():
        assert f.name in export
        if f.extra_to_write or f.extra:  # the extra that writes its files
            assert f'"edgeft[{f.extra_to_write or f.extra}]"' in export  # not eaten as Rich markup
    for choice in ("fp32", "fp16", "int8", "auto", "minmax", "entropy", "qdq"):
        assert choice in export
    train = " ".join(helps["train"].split())
    for choice in ("adamw", "sgd", "cosine", "plateau", "cifar10", "fashion-mnist", "light"):
        assert choice in train


def test_export_options_are_grouped_and_commands_in_workflow_order(helps):
    for panel in ("What to write", "int8", "The gate", "Output"):
        assert f"─ {panel} ─" in helps["export"]
    listed = [line.split()[1] for line in helps[""].splitlines() if re.match(r"│ [a-z]+ ", line)]
    assert listed == list(WORKFLOW)


# --- progress -------------------------------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_on_a_terminal(args: list[str], *, cwd: Path, timeout: float = 300, **env_extra: str):
    """Run `edgeft` with stderr on a pseudo-terminal (stdout piped): exit code, stdout, and the
    distinct stderr lines in the order they were first drawn, escape codes removed."""
    master, slave = pty.openpty()
    env = offline_env(cwd / ".torch_home", COLUMNS="80", **env_extra)
    proc = subprocess.Popen([*edgeft_command(), *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    raw = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        raw += chunk
    os.close(master)
    stdout = proc.communicate(timeout=time_limit(timeout))[0].decode()
    drawn = _ANSI.sub("", raw.decode(errors="replace")).replace("\r", "\n").splitlines()
    return proc.returncode, stdout, list(dict.fromkeys(line.rstrip() for line in drawn if line.strip()))


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory) -> Path:
    """A resnet18 trained one epoch on three 16 px classes: runs/small/best.pt in its own folder."""
    from edgeft.train import TrainConfig, train

    cwd = tmp_path_factory.mktemp("progress")
    folder = make_image_folder(cwd / "shapes", {"a": 12, "b": 12, "c": 12}, size=16)
    config = TrainConfig(data=str(folder), img_size=16, epochs=1, batch_size=8, patience=0, workers=0)
    return Path(train(replace(config, out=str(cwd / "runs"), name="small")).best_checkpoint)


@pytest.fixture(scope="module")
def int8_export(small_checkpoint) -> tuple[Path, list[str]]:
    """`edgeft export --precision int8` on a terminal: the file and the lines its stderr drew."""
    cwd = small_checkpoint.parent.parent.parent
    code, _, lines = run_on_a_terminal(["export", str(small_checkpoint), "--precision", "int8"], cwd=cwd)
    assert code == 0, "\n".join(lines)
    return cwd / "exported" / "small-int8.onnx", lines


def test_export_shows_every_stage_on_a_terminal(int8_export):
    _, lines = int8_export
    stages = [line for line in lines if not line.startswith("edgeft: note:")]  # a busy machine is said first
    assert stages[0].startswith("starting (importing torch)")  # drawn before the slow imports
    text = "\n".join(lines)
    for stage in ("loading best.pt", "int8 rung 1/", "writing ONNX int8", "calibrating", "gating the int8 file"):
        assert stage in text, text
    assert re.search(r"gating the int8 file .* \d+/\d+ images", text), text
    assert re.search(r"calibrating .* \d+/\d+ images", text), text
    assert all(len(line) <= 80 for line in lines), text


def test_validate_shows_progress_on_a_terminal_and_is_quiet_with_json_or_a_pipe(small_checkpoint):
    cwd = small_checkpoint.parent.parent.parent
    assert run_edgeft(["export", str(small_checkpoint), "--name", "quiet"], cwd=cwd).stderr == ""  # piped: quiet
    code, _, lines = run_on_a_terminal(["validate", "exported/quiet.onnx"], cwd=cwd)
    assert code == 0 and re.search(r"gating the fp32 file .* \d+/\d+ images", "\n".join(lines)), lines
    code, stdout, lines = run_on_a_terminal(["validate", "exported/quiet.onnx", "--json", "--threads", "1"], cwd=cwd)
    record = json.loads(stdout)
    assert code == 0 and [line for line in lines if "load average" not in line] == [] and record["passed"]
    assert record["threads"] == 1  # honoured and recorded
    assert record["file"] == "exported/quiet.onnx" and record["reference"] == str(Path("runs/small/best.pt"))


# --- words that are true -------------------------------------------------------------------------


def test_threads_recorded_and_resume_of_a_finished_run_says_so(tmp_path):
    folder = make_image_folder(tmp_path / "shapes", {"a": 6, "b": 6}, size=16)
    args = ["train", "--data", str(folder), "--img-size", "16", "--epochs", "1", "--batch-size", "4"]
    proc = run_edgeft([*args, "--threads", "1", "--workers", "0", "--name", "one"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "runs" / "one"
    config = json.loads((run / "config.json").read_text())
    assert config["threads"] == 1 and json.loads((run / "summary.json").read_text())["threads"] == 1
    assert None not in (config["lr"], config["amp"], config["channels_last"])
    assert "1 threads" in proc.stdout or "1 thread" in proc.stdout
    assert "WARNING" not in proc.stderr  # routine information is not a warning

    before = (run / "summary.json").read_text()
    proc = run_edgeft(["train", "--resume", str(run)], cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert "already finished" in line and "--epochs" in line and "error" not in line
    assert (run / "summary.json").read_text() == before  # nothing was redone

    (run / "summary.json").unlink()  # stopped after its last checkpoint, before its summary
    dead_pid = int(subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout)
    dead, live = run / f".curves.png.{dead_pid}.edgeft-tmpab12", run / f".last.pt.{os.getpid()}.edgeft-tmpcd34"
    for temporary in (dead, live):
        temporary.write_bytes(b"half")
    proc = run_edgeft(["train", "--resume", str(run)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["epochs"] == json.loads(before)["epochs"] == 1
    assert not dead.exists() and live.exists()  # a killed writer's temporary goes, a live one's stays


def test_a_busy_machine_is_named_in_one_line_and_recorded(tmp_path):
    """The load average is read at start; a test-only sitecustomize makes the machine look busy."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import os\nos.getloadavg = lambda: (64.0, 64.0, 64.0)\n")
    path = os.pathsep.join(p for p in (str(hook), os.environ.get("PYTHONPATH")) if p)
    folder = make_image_folder(tmp_path / "shapes", {"a": 4, "b": 4}, size=8)
    args = ["train", "--data", str(folder), "--img-size", "8", "--epochs", "1", "--workers", "0", "--name", "busy"]
    code, _, lines = run_on_a_terminal(args, cwd=tmp_path, PYTHONPATH=path)
    assert code == 0, lines
    (line,) = [line for line in lines if "load average" in line]
    assert "64.0" in line and f"{os.cpu_count()} cores" in line and not any("WARNING" in x for x in lines)
    assert json.loads((tmp_path / "runs" / "busy" / "summary.json").read_text())["load_average"] == 64.0


def test_compare_with_one_epoch_names_the_option_the_user_set(tmp_path):
    proc = run_edgeft(["compare", "--weights", "imagenet", "--epochs", "1"], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "--epochs" in line and "--freeze-epochs" not in line


def test_nproc_beyond_the_devices_is_refused_with_the_reason(tmp_path):
    too_many = (os.cpu_count() or 1) + 1
    proc = run_edgeft(["train", "--device", "cpu", "--nproc", str(too_many), "--epochs", "1"], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert f"--nproc {too_many}" in line and f"{os.cpu_count()} CPU cores" in line
    assert not (tmp_path / "runs").exists()


def test_offline_dataset_error_names_the_archive_and_leaves_no_folder(tmp_path):
    proc = run_edgeft(["train", "--data", "cifar10", "--data-root", "datasets", "--epochs", "1"], cwd=tmp_path)
    assert proc.returncode == 2
    line = one_line_error(proc.stderr)
    assert "cifar-10-python.tar.gz" in line and str(tmp_path / "datasets") in line
    assert not (tmp_path / "datasets").exists()


def test_info_shows_everything_the_file_records_at_80_columns(int8_export):
    path, _ = int8_export
    metadata = json.loads(run_edgeft(["info", str(path), "--json"], cwd=path.parent).stdout)
    proc = run_edgeft(["info", str(path)], cwd=path.parent, env=offline_env(path.parent, COLUMNS="80"))
    assert proc.returncode == 0, proc.stderr
    assert all(len(line) <= 80 and "…" not in line for line in proc.stdout.splitlines()), proc.stdout
    text = "".join(proc.stdout.split()).replace("│", "")  # folded values joined again
    for label in ("opset", "output", "int8settings", "calibrate_methodminmax", "metadataformat"):
        assert label in text, proc.stdout
    assert metadata["content_sha256"] in text and metadata["output"]["name"] in text


def test_a_checkpoint_loaded_into_another_channel_count_says_so(tmp_path):
    gray = make_image_folder(tmp_path / "gray", {"a": 6, "b": 6}, size=16, modes=("L",))
    rgb = make_image_folder(tmp_path / "rgb", {"a": 6, "b": 6}, size=16)
    tiny = ["--img-size", "16", "--epochs", "1", "--batch-size", "4", "--workers", "0"]
    proc = run_edgeft(["train", "--data", str(gray), *tiny, "--name", "gray"], cwd=tmp_path)
    assert proc.returncode == 0 and "adapted" not in proc.stderr, proc.stderr
    weights = str(tmp_path / "runs" / "gray" / "best.pt")
    proc = run_edgeft(["train", "--data", str(rgb), "--weights", weights, *tiny, "--name", "rgb"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "1-channel stem adapted to 3 channels" in proc.stderr


def test_compare_heads_each_run_and_its_table_fits_80_columns(tmp_path):
    folder = make_image_folder(tmp_path / "shapes", {"a": 6, "b": 6}, size=16)
    tiny = ["--data", str(folder), "--img-size", "16", "--batch-size", "4"]
    proc = run_edgeft(["train", *tiny, "--epochs", "1", "--workers", "0", "--name", "source"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    weights = tmp_path / "runs" / "source" / "best.pt"
    args = ["compare", "--weights", str(weights), *tiny, "--epochs", "2"]
    code, stdout, lines = run_on_a_terminal(args, cwd=tmp_path)
    assert code == 0, "\n".join(lines)
    assert lines[0].startswith("edgeft compare: three runs")  # before the slow imports
    for k, name in enumerate(("scratch", "frozen", "finetune"), 1):
        assert any(line.startswith(f"run {k}/3: {name}") for line in lines), lines
    assert all(len(line) <= 80 and "…" not in line for line in stdout.splitlines()), stdout
    rows = [cells for cells in map(str.split, stdout.splitlines()) if cells[:1] == ["frozen"] and len(cells) == 9]
    assert rows and rows[0][1] == "best.pt", stdout  # the weights by name, whole
    assert str(tmp_path) not in stdout.split("table:")[0]
