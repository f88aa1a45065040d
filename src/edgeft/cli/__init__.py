"""The `edgeft` command: a thin Typer layer over the library; it parses, calls and renders."""

from __future__ import annotations

import logging
import signal
import sys
from typing import NoReturn

import typer

from edgeft import __version__, interrupts
from edgeft.errors import EdgeftError

from .helptext import WorkflowGroup

__all__ = ["THREADS_HELP", "app", "format_choices", "interrupt_note", "load_note", "main"]

app = typer.Typer(
    name="edgeft",
    cls=WorkflowGroup,
    help="Fine-tune an image classifier, export it, prove the export, ship it to the edge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_verbose = False
# what Ctrl-C says was kept; a command may say more with `interrupt_note`
_interrupt_note = (
    "interrupted; nothing half-written was kept: checkpoints and exported files already written are intact"
)


def format_choices() -> dict[str, str]:
    """Help texts built from the format registry (markup escaped: `[extra]` is shown as written); the
    extras named are those that install each format's writer (`export --format`)."""
    from rich.markup import escape

    from edgeft import formats

    every = formats.all_formats()
    extras = "; ".join(f'{f.name}: pip install "edgeft[{f.extra_to_write or f.extra}]"' for f in every if f.extra)
    return {
        "formats": escape(" | ".join((*formats.names(), "all", "auto")) + (f" ({extras})" if extras else "")),
        "precisions": escape("; ".join(f"{f.name} {'/'.join(f.precisions)}" for f in every)),
        "files": ", ".join(s for f in every for s in f.suffixes[:1]),
        "runtimes": ", ".join(("eager", *(f.runtime for f in every))),
        "deployable": ",".join(f.name for f in every if f.deployable),
    }


THREADS_HELP = "Intra-op threads (default: the runtime's, one per core); results depend on it (README: Threads)."


def load_note() -> None:
    """One line on a terminal when the machine is busier than its cores (speed and timings suffer)."""
    from edgeft.cpu import load_note as note
    from edgeft.progress import say

    line = note()
    if line:
        say(line)


def interrupt_note(text: str) -> None:
    """What Ctrl-C from now on says was kept (a command's own, more precise line)."""
    global _interrupt_note
    _interrupt_note = text


def _version(value: bool) -> None:
    if value:
        print(f"edgeft {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log details, and show tracebacks on errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    global _verbose
    _verbose = verbose
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


from . import bench, compare, export, models, predict, train  # noqa: E402, F401 - each registers its commands


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and an exit code;
    SIGINT and SIGTERM one line saying what was kept, and 130 or 143."""
    interrupts.install_handlers()
    try:
        app()
    except EdgeftError as exc:  # exit 0 (nothing to do) is said without "error"
        if interrupts.received() is not None:  # a signal whose exception became an EdgeftError on its way up
            _interrupted(exc)
        _fail(exc, f"edgeft: error: {exc}" if exc.exit_code else f"edgeft: {exc}", exc.exit_code)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
    except SystemExit as exc:  # Typer turns Ctrl-C into a silent exit 130: say what was kept
        interrupt = _interrupt_behind(exc)
        if interrupt is None:
            raise
        _interrupted(interrupt)
    except Exception as exc:  # noqa: BLE001 - anything else is a bug; one line unless --verbose
        if interrupts.received() is not None:  # a signal whose exception a C++ layer turned into this one
            _interrupted(exc)
        _fail(exc, f"edgeft: unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)", 1)


def _interrupted(exc: BaseException) -> NoReturn:
    """Exit 128 + the signal (130 SIGINT, 143 SIGTERM) with the line saying what was kept."""
    signum = interrupts.received() or (signal.SIGTERM if isinstance(exc, interrupts.Terminated) else signal.SIGINT)
    _fail(exc, f"edgeft: {_interrupt_note}", 128 + signum)


def _interrupt_behind(exc: BaseException) -> KeyboardInterrupt | None:
    """The KeyboardInterrupt this exception was raised from, if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, KeyboardInterrupt):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _fail(exc: BaseException, line: str, code: int) -> NoReturn:
    if _verbose:
        import traceback

        traceback.print_exception(exc)
    print(" ".join(line.split()), file=sys.stderr)
    sys.exit(code)
