"""The `edgeft` command: a thin Typer layer over the library; it parses, calls and renders."""

from __future__ import annotations

import logging
import sys

import typer

from edgeft import __version__
from edgeft.errors import EdgeftError

__all__ = ["app", "main"]

app = typer.Typer(
    name="edgeft",
    help="Fine-tune an image classifier, export it, prove the export, ship it to the edge.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
_verbose = False


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
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


from . import bench as _bench, compare as _compare, export as _export, models as _models, predict as _predict, train as _train  # noqa: E402,F401 - registers the commands


def main() -> None:
    """Console-script entry point: user errors become one line on stderr and an exit code."""
    try:
        app()
    except EdgeftError as exc:
        _fail(exc, f"edgeft: error: {exc}", exc.exit_code)
    except KeyboardInterrupt as exc:
        _fail(exc, "edgeft: interrupted", 130)
    except Exception as exc:  # noqa: BLE001 - anything else is a bug; one line unless --verbose
        _fail(exc, f"edgeft: unexpected {type(exc).__name__}: {exc} (run with --verbose for the traceback)", 1)


def _fail(exc: BaseException, line: str, code: int) -> None:
    if _verbose:
        import traceback

        traceback.print_exception(exc)
    print(" ".join(line.split()), file=sys.stderr)
    sys.exit(code)
