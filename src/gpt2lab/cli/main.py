"""Entry point of the ``gpt2lab`` command. Subcommand modules import torch and friends lazily."""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import NoReturn

import typer

app = typer.Typer(
    name="gpt2lab",
    help="Explore, control, fine-tune, evaluate and serve GPT-2-family text generation.",
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


def _register() -> None:
    for name, module, func in COMMANDS:
        mod = importlib.import_module(f"gpt2lab.cli.{module}")
        app.command(name)(getattr(mod, func))
    for name, module in GROUPS:
        mod = importlib.import_module(f"gpt2lab.cli.{module}")
        app.add_typer(mod.app, name=name)


_register()


# Commands that may leave work to interpreter shutdown (DataLoader workers, DDP process groups,
# server sockets) exit the normal way.
_NORMAL_EXIT = {"train", "finetune", "serve"}


def main() -> None:
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
        print(code, file=sys.stderr)
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
