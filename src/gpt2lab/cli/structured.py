"""The structured-output flags (``--json-schema FILE``, ``--regex R``, ``--choice A --choice B``, ``--grammar FILE``)
and how they become one :class:`~gpt2lab.sampling.StructuredOutputsParams` (docs/structured-outputs.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from .common import fail, require_extra

PANEL = "Structured output"


def json_schema_option(help: str = "Every output is JSON valid under this JSON Schema (a .json file).") -> Any:  # noqa: A002
    return typer.Option(None, "--json-schema", help=help, rich_help_panel=PANEL)


def regex_option() -> Any:
    return typer.Option(None, "--regex", help="Every output matches this regular expression (whole).",
                        rich_help_panel=PANEL)


def choice_option() -> Any:
    return typer.Option(None, "--choice", help="Every output is one of these strings (repeatable).",
                        rich_help_panel=PANEL)


def grammar_option() -> Any:
    return typer.Option(None, "--grammar", help="Every output matches this grammar (a file: Lark, or llama.cpp's "
                        "GBNF).", rich_help_panel=PANEL)


def _read(path: Path, flag: str) -> str:
    from ..readers import decode

    try:
        return decode(path.read_bytes(), str(path))
    except (OSError, ValueError) as exc:
        fail(f"{flag} {path}: cannot read ({exc})")


def _read_schema(path: Path, flag: str) -> Any:
    """The JSON Schema file, parsed by the project's bounded reader (size and nesting capped: a schema nested
    thousands deep is one line naming the file, not a RecursionError)."""
    from ..readers import read_json

    try:
        return read_json(path)
    except OSError as exc:
        fail(f"{flag} {path}: cannot read ({exc})")
    except ValueError as exc:  # ReadError: names the file and what is wrong
        fail(f"{flag} {exc}")


def structured_outputs(command: str, *, json_schema: Path | None = None, regex: str | None = None,
                       choice: list[str] | None = None, grammar: Path | None = None) -> Any:
    """The :class:`~gpt2lab.sampling.StructuredOutputsParams` the flags ask for (None: none), checked before any
    model loads: one line naming the flag and exit 2 for a file that cannot be read, an invalid schema, regex or
    grammar, or two flags at once; one line naming the ``structured`` extra when llguidance is not installed."""
    from .options import process_escapes_all

    given = {"--json-schema": json_schema, "--regex": regex, "--choice": choice or None, "--grammar": grammar}
    flags = [flag for flag, value in given.items() if value is not None]
    if not flags:
        return None
    if len(flags) > 1:
        fail(f"give one of --json-schema, --regex, --choice, --grammar, not {' and '.join(flags)}")
    require_extra("structured", command, ("llguidance",))
    from ..sampling import StructuredOutputsParams

    flag = flags[0]
    try:
        if flag == "--json-schema":
            spec = StructuredOutputsParams(json=_read_schema(json_schema, flag))
        elif flag == "--grammar":
            spec = StructuredOutputsParams(grammar=_read(grammar, flag))
        elif flag == "--choice":
            spec = StructuredOutputsParams(choice=process_escapes_all(choice))
        else:
            spec = StructuredOutputsParams(regex=regex)
        spec.validate()
    except ValueError as exc:
        message = str(exc)
        head, _, rest = message.partition(" ")
        where = f"{flag} {given[flag]}" if flag in ("--json-schema", "--grammar") else flag
        fail(f"{where}: {rest}" if head.startswith("structured_outputs") and head.endswith(":") else
             f"{where}: {message}")
    return spec
