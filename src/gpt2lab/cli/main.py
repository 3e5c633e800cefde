"""Entry point of the ``gpt2lab`` command. Subcommand modules import torch and friends lazily."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="gpt2lab",
    help="Explore, control, fine-tune, evaluate and serve GPT-2-family text generation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)



@app.callback()
def _root() -> None:
    """Explore, control, fine-tune, evaluate and serve GPT-2-family text generation."""


# (command name, module, function) -- each module under gpt2lab.cli
COMMANDS: list[tuple[str, str, str]] = [
    ("info", "info", "info"),
    ("generate", "generate", "generate"),
    ("story", "story", "story"),
    ("chat", "chat", "chat"),
    ("augment", "augment", "augment"),
]
# (group name, module) -- modules exposing a typer.Typer named ``app``
GROUPS: list[tuple[str, str]] = []


def _register() -> None:
    for name, module, func in COMMANDS:
        mod = importlib.import_module(f"gpt2lab.cli.{module}")
        app.command(name)(getattr(mod, func))
    for name, module in GROUPS:
        mod = importlib.import_module(f"gpt2lab.cli.{module}")
        app.add_typer(mod.app, name=name)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
