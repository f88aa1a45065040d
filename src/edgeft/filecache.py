"""Converted files kept between runs of `edgeft bench`, keyed by what produced them.

Lowering a program or calibrating an int8 file takes longer than timing it, so a bench keeps each
file it writes in `<cache>/<key>/`, where the key is a digest of everything that decides the
file's content: the model's weights (a checkpoint's SHA-256, or the architecture and seed of
random weights), the format and precision, the image size, the device, the int8 settings, the
versions of edgeft, torch and the format's libraries, and a digest of edgeft's code that writes the
file (a changed writer under the same version number makes new files). A second run with the same key reuses the
file; any change makes a new one. An entry is written in a temporary folder and renamed into
place whole, so an interrupted write never leaves a half entry; temporaries of dead processes
are removed. The cache is plain files: delete the folder to empty it.

Most of a cold bench is lowering and converting, which is single-threaded Python: `FileCache.files`
makes the missing files of a run two (or more) at a time, each in its own spawned process.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from edgeft import jsonio
from edgeft.interrupts import remove_dead_temporaries, temporary_name

__all__ = ["FileCache", "default_cache_folder"]

log = logging.getLogger(__name__)

_MANIFEST = "made.json"  # written last into an entry: {"file": name, "key": {...}}
_GRACE_S = 10.0  # how long a stopped maker may take to exit as Python does before it is killed


def default_cache_folder() -> Path:
    """$EDGEFT_CACHE, else $XDG_CACHE_HOME/edgeft, else ~/.cache/edgeft; bench files go in `bench/`."""
    root = os.environ.get("EDGEFT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeft"
    return Path(root) / "bench"


class FileCache:
    """Files made once per key. Without a folder (caching off) every file is made in `scratch`."""

    def __init__(self, folder: Path | None, scratch: Path):
        self.folder, self.scratch = folder, scratch
        self.hits = self.made = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)
            remove_dead_temporaries(folder)

    def file(self, key: dict, make: Callable[[Path], Path]) -> Path:
        """The file `make(empty_folder)` writes (it returns the file's path), made once per `key`."""
        digest = _digest(key)
        if self.folder is None:
            self.made += 1
            return make(_empty(self.scratch / digest[:16]))
        entry = self.folder / digest
        found = _read_entry(entry)
        if found is not None:
            self.hits += 1
            log.info("cached: %s", found)
            return found
        temporary = _empty(self.folder / temporary_name(digest))
        try:
            made = make(temporary)
            (temporary / _MANIFEST).write_text(jsonio.dumps({"file": made.name, "key": key}, indent=2) + "\n")
            shutil.rmtree(entry, ignore_errors=True)  # an entry that did not read as one
            os.replace(temporary, entry)
        except BaseException:  # a failed or interrupted make leaves no temporary behind
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        self.made += 1
        return entry / made.name

    def files(
        self, requests: Sequence[tuple[dict, Callable[[Path], Path]]], workers: int = 1, setup=None, done=None
    ) -> list[Path]:
        """`file` for each (key, make). With `workers` > 1 and more than one file missing, the
        missing ones are made `workers` at a time, each in a spawned process that ran `setup()`
        first (`make` and `setup` must pickle); `done()` is called as each is ready. An error or
        interrupt stops the other makes and leaves no temporary behind."""
        missing = [i for i, (key, _) in enumerate(requests) if self._missing(key)]
        if workers < 2 or len(missing) < 2:
            return [self.file(key, make) for key, make in requests]
        made: dict[int, Path] = {}
        tasks = [(i, self.folder, self.scratch, *requests[i]) for i in missing]
        pool = multiprocessing.get_context("spawn").Pool(min(workers, len(missing)), _start_worker, (setup,))
        try:
            for i, path in pool.imap_unordered(_make_in_worker, tasks):
                made[i] = path
                self.made += 1
                if done:
                    done()
            pool.close()
        except BaseException:
            _terminate(pool)  # the makes still running
            raise
        finally:
            pool.join()
            if self.folder is not None:
                remove_dead_temporaries(self.folder)
        return [made[i] if i in made else self.file(key, make) for i, (key, make) in enumerate(requests)]

    def _missing(self, key: dict) -> bool:
        return self.folder is None or _read_entry(self.folder / _digest(key)) is None


def _start_worker(setup) -> None:
    """A making process leaves interrupts to the bench that started it, and when that stops it
    (SIGTERM) it exits as Python does, removing its temporary and what its libraries registered."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    if setup is not None:
        setup()


def _terminate(pool) -> None:
    """`pool.terminate()`, and SIGKILL for a maker not gone within _GRACE_S. SIGTERM reaches the
    process, and any of its threads may take it: when a library's thread does, a maker's main thread
    blocked waiting for work never runs the handler, and `terminate` would wait for it for ever."""
    killer = threading.Timer(_GRACE_S, lambda: [child.kill() for child in multiprocessing.active_children()])
    killer.start()
    try:
        pool.terminate()
    finally:
        killer.cancel()


def _make_in_worker(task: tuple) -> tuple[int, Path]:
    index, folder, scratch, key, make = task
    return index, FileCache(folder, scratch).file(key, make)


def _digest(key: dict) -> str:
    return hashlib.sha256(jsonio.dumps(key, sort_keys=True).encode()).hexdigest()


def _read_entry(entry: Path) -> Path | None:
    """The file of a complete entry, or None when there is none (or it does not read as one)."""
    try:
        name = jsonio.loads((entry / _MANIFEST).read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    path = entry / str(name)
    return path if Path(name).name == name and path.exists() else None


def _empty(folder: Path) -> Path:
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder
