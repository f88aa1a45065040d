"""The CLI as read at 80 columns: help that says everything without cutting a name, output that
fits, progress a user can see, and words that are true. Real subprocesses throughout."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest
import typer.main

from edgeft import formats
from edgeft.cli import app
from edgeft.cli.helptext import WORKFLOW

from conftest import offline_env, run_edgeft

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
        if f.extra:
            assert f'"edgeft[{f.extra}]"' in export  # not eaten as Rich markup
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
