"""The bench's file cache: a file is made once per key, an interrupted entry is made again,
temporaries of dead processes are removed, and a second bench reuses every file."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgeft.bench
from edgeft.bench import run_bench
from edgeft.config import BenchConfig
from edgeft.errors import InputError
from edgeft.filecache import FileCache, default_cache_folder


def maker(calls: list[str], text: str):
    def make(folder: Path) -> Path:
        calls.append(text)
        path = folder / "model.onnx"
        path.write_text(text)
        return path

    return make


def test_a_file_is_made_once_per_key(tmp_path):
    cache, calls = FileCache(tmp_path / "cache", tmp_path / "scratch"), []
    first = cache.file({"weights": "a", "precision": "int8"}, maker(calls, "a-int8"))
    again = cache.file({"precision": "int8", "weights": "a"}, maker(calls, "other"))  # same key, any order
    other = cache.file({"weights": "b", "precision": "int8"}, maker(calls, "b-int8"))
    assert first == again and first.read_text() == "a-int8" and other.read_text() == "b-int8"
    assert calls == ["a-int8", "b-int8"] and (cache.hits, cache.made) == (1, 2)
    assert (
        FileCache(tmp_path / "cache", tmp_path / "s2").file({"weights": "a", "precision": "int8"}, maker(calls, "x"))
        == first
    )
    assert calls == ["a-int8", "b-int8"]  # a new run (a new cache object) finds it too


def test_an_entry_without_its_manifest_is_made_again(tmp_path):
    cache, calls = FileCache(tmp_path / "cache", tmp_path / "scratch"), []
    path = cache.file({"k": 1}, maker(calls, "one"))
    (path.parent / "made.json").unlink()  # as if the entry had been torn
    path.write_text("torn")
    assert cache.file({"k": 1}, maker(calls, "two")).read_text() == "two" and calls == ["one", "two"]


def test_temporaries_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    folder = tmp_path / "cache"
    dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = folder / f".{'a' * 64}.{int(dead_pid.stdout)}.edgeft-tmp"
    live = folder / f".{'b' * 64}.{__import__('os').getpid()}.edgeft-tmp"
    for temporary in (dead, live):
        temporary.mkdir(parents=True)
    FileCache(folder, tmp_path / "scratch")
    assert not dead.exists() and live.exists()


def test_without_a_folder_every_file_is_made_in_the_scratch_folder(tmp_path):
    cache, calls = FileCache(None, tmp_path / "scratch"), []
    first, second = (cache.file({"k": 1}, maker(calls, text)) for text in ("one", "two"))
    assert calls == ["one", "two"] and first.is_relative_to(tmp_path / "scratch") and cache.hits == 0


def write_pid(text: str, folder: Path) -> Path:
    """A make for spawned processes (it pickles): the file holds its text and its maker's pid."""
    path = folder / "model.onnx"
    path.write_text(f"{text} {os.getpid()}")
    return path


def fail_or_wait(seconds: float, folder: Path) -> Path:
    (folder / "model.onnx").write_text("half")
    if seconds == 0:
        raise InputError("cannot make this one")
    time.sleep(seconds)
    return folder / "model.onnx"


def test_missing_files_are_made_in_other_processes_and_found_ones_reused(tmp_path):
    cache = FileCache(tmp_path / "cache", tmp_path / "scratch")
    found = cache.file({"k": 0}, functools.partial(write_pid, "zero"))
    requests = [({"k": k}, functools.partial(write_pid, text)) for k, text in enumerate(["again", "one", "two"])]
    paths = cache.files(requests, workers=2)
    texts = [path.read_text().split() for path in paths]
    assert paths[0] == found and texts[0] == ["zero", str(os.getpid())]
    assert [t[0] for t in texts[1:]] == ["one", "two"] and all(int(t[1]) != os.getpid() for t in texts[1:])
    assert (cache.hits, cache.made) == (1, 3)


def test_a_failed_make_stops_the_others_and_leaves_no_temporary(tmp_path):
    cache = FileCache(tmp_path / "cache", tmp_path / "scratch")
    requests = [({"k": k}, functools.partial(fail_or_wait, seconds)) for k, seconds in (("slow", 120), ("bad", 0))]
    started = time.monotonic()
    with pytest.raises(InputError, match="cannot make"):
        cache.files(requests, workers=2)
    assert time.monotonic() - started < 60  # the slow make was stopped, not waited for
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no entry, no temporary


def deaf_to_sigterm() -> None:
    """A maker's setup (it pickles) as a library can leave it: SIGTERM's exit swallowed (raised
    inside a finalizer, or caught), so a stopped maker goes on."""
    signal.signal(signal.SIGTERM, lambda signum, frame: None)


def test_a_failed_make_stops_makers_that_do_not_exit_on_sigterm(tmp_path):
    cache = FileCache(tmp_path / "cache", tmp_path / "scratch")
    requests = [({"k": k}, functools.partial(fail_or_wait, seconds)) for k, seconds in (("slow", 120), ("bad", 0))]
    started = time.monotonic()
    with pytest.raises(InputError, match="cannot make"):
        cache.files(requests, workers=2, setup=deaf_to_sigterm)
    assert time.monotonic() - started < 60  # killed after a grace period, not waited for
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no entry, no temporary


def test_the_default_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEFT_CACHE", str(tmp_path / "mine"))
    assert default_cache_folder() == tmp_path / "mine" / "bench"
    monkeypatch.delenv("EDGEFT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_folder() == tmp_path / "xdg" / "edgeft" / "bench"


@pytest.mark.slow
def test_a_second_bench_reuses_every_file_and_a_new_precision_or_writer_makes_its_own(tmp_path, monkeypatch):
    def bench(precisions: tuple[str, ...]):
        config = BenchConfig(
            models=("resnet18",),
            runtimes=("eager", "onnxruntime"),
            precisions=precisions,
            batch_sizes=(1,),
            img_size=32,
            quick=True,
            out=str(tmp_path / "reports"),
            cache_dir=str(tmp_path / "cache"),
        )
        return run_bench(config)

    first = bench(("fp32",))
    second = bench(("fp32",))
    third = bench(("fp32", "int8"))
    assert first.settings["cache"]["made"] == 2 and first.settings["cache"]["reused"] == 0  # random weights + onnx
    assert second.settings["cache"]["made"] == 0 and second.settings["cache"]["reused"] == 2
    assert third.settings["cache"]["made"] == 1 and third.settings["cache"]["reused"] == 2  # only the int8 file
    measured = {(row.runtime, row.precision) for row in third.rows if row.status == "ok" and row.p50_ms > 0}
    assert measured == {("eager", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    monkeypatch.setattr(edgeft.bench, "_writers_digest", lambda: "a changed writer, the same version number")
    fourth = bench(("fp32", "int8"))
    assert fourth.settings["cache"]["made"] == 3 and fourth.settings["cache"]["reused"] == 0
