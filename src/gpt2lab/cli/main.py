"""Entry point of the ``gpt2lab`` command.

Start-up time matters here (``gpt2lab generate`` should cost little more than importing torch): a
subcommand's module is imported only when that subcommand runs, or when help or shell completion
lists every command (:class:`LazyGroup`), and the modules import torch and friends lazily.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Iterator, MutableMapping
from typing import TYPE_CHECKING, NoReturn

import typer
from typer.core import TyperGroup

if TYPE_CHECKING:
    from typer import _click as click  # the click typer vendors: its Command type

# (command name, module, function) -- each module under gpt2lab.cli
COMMANDS: list[tuple[str, str, str]] = [
    ("info", "info", "info"),
    ("explore", "explore", "explore"),
    ("generate", "generate", "generate"),
    ("story", "story", "story"),
    ("chat", "chat", "chat"),
    ("augment", "augment", "augment"),
    ("finetune", "train", "finetune"),
    ("train", "train", "train"),
    ("serve", "serve", "serve"),
]
# (group name, module) -- modules exposing a typer.Typer named ``app``
GROUPS: list[tuple[str, str]] = [
    ("eval", "eval"),
    ("review", "review"),
]


def _build_command(name: str) -> click.Command:
    """The click command of subcommand ``name``, its module imported now; typer converts the function
    (or the module's Typer, for a group) exactly as ``app.command`` / ``app.add_typer`` would."""
    holder = typer.Typer(add_completion=False)
    functions = {command: (module, func) for command, module, func in COMMANDS}
    if name in functions:
        module, func = functions[name]
        holder.command(name)(getattr(importlib.import_module(f"gpt2lab.cli.{module}"), func))
    else:
        holder.add_typer(importlib.import_module(f"gpt2lab.cli.{dict(GROUPS)[name]}").app, name=name)
    return typer.main.get_group(holder).commands[name]


class _LazyCommands(MutableMapping):
    """The root group's ``commands`` mapping (name -> click command) that builds each command the first
    time it is looked up: listing names imports nothing, ``get`` imports only that command's module."""

    def __init__(self, names: list[str]) -> None:
        self._names = names
        self._built: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._built:
            self._built[name] = _build_command(name)
        return self._built[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        if name not in self._names:
            self._names.append(name)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        self._names.remove(name)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:  # without building it (Mapping's would)
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LazyGroup(TyperGroup):
    """The ``gpt2lab`` group: subcommands load on demand (click's "lazily loading subcommands" pattern),
    so ``gpt2lab generate`` never imports the server, training, review or evaluation commands.

    A usage error (a mistyped option, a value of the wrong type, a missing argument) is one line,
    ``gpt2lab: error: ...`` and exit code 2, as every other bad value: typer would draw a usage line, a
    hint and a box around the message."""

    def __init__(self, **kwargs) -> None:  # noqa: ANN003 - TyperGroup's
        super().__init__(**kwargs)
        lazy = _LazyCommands([name for name, _, _ in COMMANDS] + [name for name, _ in GROUPS])
        for name, command in self.commands.items():  # any registered on ``app`` directly
            lazy[name] = command
        self.commands = lazy

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):  # noqa: ANN001, ANN003, ANN201 - click's
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            # not standalone: click's errors come here instead of being drawn; Exit(code) returns code
            result = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as exc:  # click's ClickException and UsageError (typer vendors click)
            if type(exc).__name__ != "NoArgsIsHelpError":  # `gpt2lab review` alone: the help was printed
                from ..console import error

                error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:
            from ..console import echo

            echo("Aborted!", sys.stderr)
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)


app = typer.Typer(
    name="gpt2lab",
    help="Explore, control, fine-tune, evaluate and serve GPT-2-family text generation.",
    cls=LazyGroup,
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        print(f"gpt2lab {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", help="Print gpt2lab's version and exit.", callback=_version,
                                 is_eager=True),
) -> None:
    """Explore, control, fine-tune, evaluate and serve GPT-2-family text generation."""


# Commands that may leave work to interpreter shutdown (DataLoader workers, DDP process groups,
# server sockets) exit the normal way.
_NORMAL_EXIT = {"train", "finetune", "serve"}


def _one_line_warnings() -> None:
    """gpt2lab's own warnings (:class:`gpt2lab.errors.GPT2LabWarning`, about the user's input) as one line
    ``gpt2lab: warning: ...`` on stderr, like its errors; other libraries' warnings as Python shows them."""
    import warnings

    from ..errors import GPT2LabWarning

    shown = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
             line: str | None = None) -> None:
        if issubclass(category, GPT2LabWarning):
            print(f"gpt2lab: warning: {message}", file=sys.stderr if file is None else file)
        else:
            shown(message, category, filename, lineno, file, line)

    warnings.showwarning = show


def main() -> None:
    from .distributed import optional_value

    sys.argv = optional_value(sys.argv)  # a bare --ray: a local cluster
    _one_line_warnings()
    try:
        app()  # typer ends with sys.exit in standalone mode
    except SystemExit as exc:
        _exit(exc.code)
    _exit(0)


def _exit(code: int | str | None) -> NoReturn:
    """Exit with ``code``, skipping the interpreter's teardown once torch is loaded.

    Tearing torch down takes 1 to 1.5 s on a 2-core machine, longer than generating a paragraph with
    the bundled model. Output is flushed and logging shut down first; gpt2lab's commands write their
    files atomically before returning and register no exit handlers.
    """
    if "torch" not in sys.modules or (len(sys.argv) > 1 and sys.argv[1] in _NORMAL_EXIT):
        sys.exit(code)
    if isinstance(code, str):
        from ..console import echo

        echo(code, sys.stderr)
        code = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken pipe: nothing more can be written anyway
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    main()
