"""Progress of the long steps (training epochs, export, validation, compare) on stderr: the stage a
user waits on and how far it is, shown only while a terminal watches, in lines that fit 80 columns
(numbers wrap onto a second line rather than being cut)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["bar", "note", "say", "shown", "stage"]

_live = None  # the Progress of the command that shows its stages, while it runs


def _console():
    from rich.console import Console

    return Console(stderr=True)


def bar(enabled: bool):
    """A rich Progress on stderr: description, a short bar, a count, the elapsed time and a
    `metrics` field that wraps; disabled unless `enabled` and stderr is a terminal."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Column

    console = _console()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(bar_width=10),
        TextColumn("{task.fields[count]}"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[metrics]}", table_column=Column(overflow="fold")),
        console=console,
        disable=not (enabled and console.is_terminal),
    )


@contextlib.contextmanager
def shown(enabled: bool = True) -> Iterator[None]:
    """Show the stages the library enters while the block runs (when `enabled` and stderr is a
    terminal: `--json` or a pipe stays quiet)."""
    global _live
    progress = bar(enabled)
    if progress.disable or _live is not None:
        yield
        return
    _live = progress
    try:
        with progress:
            yield
    finally:
        _live = None


@contextlib.contextmanager
def stage(description: str, total: int | None = None, unit: str = "") -> Iterator[Callable[[int], None]]:
    """One step a user waits on, a line from its start (kept, with its time, once done); yields
    `advance(n)`, which counts `n` more of its `total` `unit`s (images)."""
    from rich.markup import escape

    live = _live
    if live is None:
        yield lambda n=1: None
        return
    label = f" {unit}" if unit else ""
    task = live.add_task(escape(description), total=total, count="", metrics="")
    done = 0

    def advance(n: int = 1) -> None:
        nonlocal done
        done += n
        live.update(task, completed=done, count=f"{done}/{total}{label}" if total else f"{done}{label}")

    try:
        yield advance
    finally:
        live.update(task, total=total or max(1, done), completed=total or max(1, done))
        live.stop_task(task)


def say(line: str) -> None:
    """One line on stderr when a terminal watches (a heading between progress bars)."""
    console = _console()
    if console.is_terminal:
        from rich.markup import escape

        console.print(escape(line))


def note(line: str) -> None:
    """One line on stderr, terminal or not: something the user should know that is not a failure."""
    import sys

    print(line, file=sys.stderr, flush=True)
