"""Signals and writes: a SIGINT or SIGTERM that arrives while a file is being written waits
until the write is complete (or its temporary removed), then acts as it would have; every file
edgeft writes in place goes through `atomic_write`. Standard library only (the CLI imports it)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "Terminated",
    "atomic_write",
    "atomic_write_text",
    "deferred_interrupts",
    "install_handlers",
    "process_alive",
    "received",
    "remove_dead_temporaries",
    "temporary_name",
]

TEMP_TAG = "edgeft-tmp"  # a temporary is .<name>.<pid>.edgeft-tmp<anything>, beside what it becomes

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_depth = 0  # critical sections entered and not yet left (main thread only)
_pending: list[int] = []  # signals held by the outermost section, in order of arrival
_received: list[int] = []  # signals the handlers of `install_handlers` have acted on


class Terminated(KeyboardInterrupt):
    """SIGTERM under the CLI: raised where SIGINT raises KeyboardInterrupt, so the same cleanup
    runs; the CLI exits 143 instead of 130."""


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def deferred_interrupts() -> Iterator[None]:
    """A critical section: SIGINT and SIGTERM arriving inside it are held until the outermost
    section ends, then delivered to the handlers that were in place before it. Nested sections
    are one; outside the main thread (where handlers cannot be set) it defers nothing."""
    global _depth
    if not _in_main_thread():
        yield
        return
    previous = _hold() if _depth == 0 else None
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if previous is not None:
            _release(previous)


def _hold() -> dict[int, Callable | int]:
    previous = {}
    for signum in _SIGNALS:
        handler = signal.getsignal(signum)
        if handler is not None:  # None: set outside Python, so it cannot be put back; left alone
            previous[signum] = handler
            signal.signal(signum, _hold_signal)
    return previous


def _hold_signal(signum: int, frame) -> None:
    if signum not in _pending:
        _pending.append(signum)


def _release(previous: dict[int, Callable | int]) -> None:
    """Put the handlers back, then deliver what arrived meanwhile (the first one that raises wins)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    held = list(_pending)
    _pending.clear()
    for signum in held:
        signal.raise_signal(signum)  # its handler runs before this returns


def install_handlers() -> None:
    """The CLI's handlers: SIGINT raises KeyboardInterrupt and SIGTERM `Terminated`, each noted
    for `received` (main thread only; a signal ignored when the process started stays ignored)."""
    if _in_main_thread():
        for signum in _SIGNALS:
            if signal.getsignal(signum) not in (signal.SIG_IGN, None):  # ignored (nohup, `&`): stays ignored
                signal.signal(signum, _raise_for_signal)


def _raise_for_signal(signum: int, frame) -> None:
    _received.append(signum)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def received() -> int | None:
    """The first signal the CLI's handlers acted on (also when a C++ layer then turned its
    exception into another), or None."""
    return _received[0] if _received else None


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """A binary file that becomes `path` when the block ends: a temporary in the same folder,
    flushed to disk and moved into place with `os.replace`, inside `deferred_interrupts`. `path`
    is always the old or the new complete file; a failure removes the temporary."""
    path = Path(path)
    with deferred_interrupts():
        fd, tmp = tempfile.mkstemp(prefix=temporary_name(path.name) + ".", dir=path.parent)
        try:
            os.chmod(tmp, 0o644)
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """`atomic_write` of UTF-8 text."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (its temporaries are in use)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def temporary_name(name: str) -> str:
    """The name of this process's temporary for `name` (add to it, never in front): one that
    `remove_dead_temporaries` tells from a live process's."""
    return f".{name}.{os.getpid()}.{TEMP_TAG}"


def remove_dead_temporaries(folder: Path) -> list[Path]:
    """Remove the temporaries in `folder` (files or folders) whose writing process is gone: what a
    SIGKILL or a power cut left. Returns what was removed."""
    removed = []
    for stale in folder.glob(f".*.{TEMP_TAG}*"):
        owner = re.search(rf"\.(\d+)\.{TEMP_TAG}", stale.name)
        if owner and process_alive(int(owner.group(1))):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)
        removed.append(stale)
    return removed
