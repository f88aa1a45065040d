"""The errors a user can cause; the CLI prints them on one line and exits with `exit_code`."""

__all__ = ["EdgeftError", "InputError", "RunError", "GateError", "NothingToDo"]


class EdgeftError(Exception):
    """Base class: a failure with a message that says what to do."""

    exit_code = 1


class InputError(EdgeftError):
    """Bad input: a missing file, an unknown model, an unusable option value (exit 2)."""

    exit_code = 2


class RunError(EdgeftError):
    """A run that started and could not finish (exit 1)."""

    exit_code = 1


class GateError(EdgeftError):
    """An accuracy gate that failed (exit 1)."""

    exit_code = 1


class NothingToDo(EdgeftError):
    """A request already fulfilled (resuming a finished run): said in one line, exit 0."""

    exit_code = 0
