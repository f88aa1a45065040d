"""How `--help` reads: commands in workflow order, one argument notation (upper-case names, flags
without one), every option described. One place, applied to every command when the app is built."""

from __future__ import annotations

from typer._click import Context
from typer.core import TyperArgument, TyperGroup

from edgeft.config import BUILTIN_DATASETS

__all__ = ["DATA_CHOICES", "WORKFLOW", "WorkflowGroup", "one_of"]

# the order a user runs the commands in; `--help` lists them so
WORKFLOW = ("train", "export", "validate", "predict", "bench", "compare", "info", "models")
# the value notation of each parameter type (typer would show `<int>`, `<str>`, `<bool>`)
_VALUE_NAMES = {"int": "INT", "float": "FLOAT", "str": "TEXT", "Path": "PATH", "list[str]": "TEXT"}


class WorkflowGroup(TyperGroup):
    """The `edgeft` group: lists its commands in workflow order and gives every parameter of every
    command one notation."""

    def __init__(self, **attrs) -> None:
        super().__init__(**attrs)
        for command in (self, *self.commands.values()):
            for param in (*command.params, command.get_help_option(Context(command))):
                _name_value(param)

    def list_commands(self, ctx) -> list[str]:
        rank = {name: i for i, name in enumerate(WORKFLOW)}
        return sorted(self.commands, key=lambda name: rank.get(name, len(WORKFLOW)))


def _name_value(param) -> None:
    """Flags show no value; arguments their upper-case name; an option
    that says its own value name (`metavar=`) keeps it; any other its type, upper case."""
    if getattr(param, "is_flag", False):
        param.metavar = ""
    elif isinstance(param, TyperArgument):  # named once, in upper case: no second `<path>` column
        param.metavar = param.name.upper()
        param.display_type_rich = lambda ctx: None
    elif param.metavar is None:
        param.metavar = _VALUE_NAMES.get(param.bare_type(), "VALUE")


def one_of(choices) -> str:
    """A fixed list of values as `--help` shows it: `a | b | c`."""
    return " | ".join(choices)


DATA_CHOICES = f"{one_of(BUILTIN_DATASETS)} | an ImageFolder path."
