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


def load_generator(model: str | None, runtime=None, *, load: Callable | None = None):  # noqa: ANN001
    """Load a model for a command (``runtime``: its ``--device``/``--dtype``/``--quantization``, a
    :class:`~gpt2lab.cli.options.Runtime`), with the user-facing error handling."""
    from ..generation import load as default_load

    loader = load or default_load
    kwargs = load_kwargs(runtime, loader)
    with user_errors():
        return loader(model, **kwargs)


def load_kwargs(runtime, loader: Callable | None = None) -> dict:  # noqa: ANN001 - a cli.options.Runtime
    """``runtime``'s keyword arguments for ``loader`` (default :func:`gpt2lab.load`); fails in one line when
    ``--quantization`` asks for what this ``loader`` cannot do."""
    import inspect

    from .options import Runtime

    if loader is None:
        from ..generation import load as loader
    kwargs = (runtime or Runtime()).load_kwargs()
    if "quantization" in kwargs and "quantization" not in inspect.signature(loader).parameters:
        if kwargs["quantization"] is not None:
            fail(f"--quantization {kwargs['quantization']} is not available in this version of gpt2lab")
        del kwargs["quantization"]  # "none" is what it does anyway
    return kwargs
