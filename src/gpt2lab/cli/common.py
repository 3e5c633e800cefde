"""Helpers shared by the subcommands: clean errors and exit codes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer

EXIT_USAGE = 2  # bad value or unusable input (what click uses for usage errors)
EXIT_FAILURE = 1
# the importable modules of each optional extra (pyproject.toml's [project.optional-dependencies])
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": ("fastapi", "uvicorn", "pydantic", "prometheus_client"),
    "eval": ("sacrebleu", "rouge_score", "matplotlib"),
    "train": ("matplotlib",),
    "ray": ("ray",),
    "structured": ("llguidance",),
}


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``gpt2lab: error: message`` on stderr (as text: see :mod:`gpt2lab.console`) and exit with
    ``code``."""
    from ..console import error

    error(message)
    raise typer.Exit(code)


def missing_modules(extra: str, modules: tuple[str, ...] | None = None) -> list[str]:
    """The modules of the optional ``extra`` (or ``modules`` of it) that are not installed, found without
    importing them."""
    import importlib.util

    return [m for m in (modules or EXTRAS[extra]) if importlib.util.find_spec(m) is None]


def require_extra(extra: str, command: str, modules: tuple[str, ...] | None = None) -> None:
    """Before any work: fail in one line, naming the extra to install, when ``command`` needs modules of
    the optional ``extra`` that are not installed."""
    missing = missing_modules(extra, modules)
    if missing:
        fail(f"{command} needs the optional '{extra}' dependencies ({', '.join(missing)} not installed); "
             f"install them with: pip install 'gpt2lab[{extra}]'")


def note_missing_extra(extra: str, what: str) -> None:
    """One line on stderr when the optional ``what`` is skipped because ``extra`` is not installed (the
    command goes on without it)."""
    missing = missing_modules(extra)
    if missing:
        from ..console import echo

        echo(f"gpt2lab: {', '.join(missing)} not installed: {what} is skipped; install it with: "
             f"pip install 'gpt2lab[{extra}]'", sys.stderr)


@contextmanager
def user_errors(extra: tuple[type[BaseException], ...] = ()) -> Iterator[None]:
    """Turn the errors a user can cause into a one-line message and exit code 2 (no traceback)."""
    from ..errors import CheckpointError, GenerationFailed, TokenizerError
    from ..outputs import describe_os_error

    try:
        yield
    except (ValueError, TypeError, CheckpointError, TokenizerError, GenerationFailed, FileNotFoundError,
            *extra) as exc:
        fail(str(exc))
    except OSError as exc:  # a full disk, a read-only file system ... while reading or writing
        fail(describe_os_error(exc))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise typer.Exit(130) from None


def check_output(path, option: str = "--out", kind: str = "dir") -> None:
    """Fail now, before any model loads, when ``path`` (a folder, or a file with ``kind="file"``)
    cannot be written: a read-only file system, a full disk, a parent that is a regular file."""
    from ..outputs import check_output_dir, check_output_file

    with user_errors():
        (check_output_file if kind == "file" else check_output_dir)(path, option)
