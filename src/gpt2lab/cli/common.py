"""Helpers shared by the subcommands: clean errors and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

EXIT_USAGE = 2  # bad value or unusable input (what click uses for usage errors)
EXIT_FAILURE = 1


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``gpt2lab: error: message`` on stderr and exit with ``code``."""
    print(f"gpt2lab: error: {message}", file=sys.stderr)
    raise typer.Exit(code)


@contextmanager
def user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn the errors a user can cause into a one-line message and exit code 2 (no traceback)."""
    from ..errors import CheckpointError, TokenizerError

    try:
        yield
    except (ValueError, TypeError, CheckpointError, TokenizerError, FileNotFoundError, *extra) as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise typer.Exit(130) from None


def load_generator(model: str | None, device: str = "cpu", dtype: str | None = None,
                   load: Callable | None = None, quantization: str | None = None):
    """Load a model for a command, with the user-facing error handling (``quantization`` as
    :func:`gpt2lab.load`'s; passed on only when set, so a custom ``load`` need not accept it)."""
    from ..generation import load as default_load

    extra = {"quantization": quantization} if quantization is not None else {}
    with user_errors():
        return (load or default_load)(model, device=device, dtype=dtype, **extra)
