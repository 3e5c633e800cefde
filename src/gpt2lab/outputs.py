"""Checks that an output location can be written, made before any long work starts.

A read-only file system, a full disk or a path under a regular file should fail in the first second
with one line naming the path and the reason, not after an hour of training or generation. (The
writes themselves are :mod:`gpt2lab.atomic`'s; a write that fails later says the same, through
:func:`describe_os_error`.)
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output location that cannot be written; the message names the option, the path and why."""


def describe_os_error(exc: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """``path: reason`` for an ``OSError``, e.g. ``out/model.safetensors: No space left on device``."""
    where = exc.filename if exc.filename is not None else path
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EFBIG:
        reason += " (a file size limit, or the disk is full)"
    return f"{where}: {reason}" if where is not None else reason


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Create ``path`` (and its parents) if needed and prove a file can be written and synced in it.

    Raises :class:`OutputError` naming ``option`` and the reason (a parent is a file, read-only file
    system, no space left, permission denied).
    """
    path = Path(path).expanduser()
    try:
        if path.exists() and not path.is_dir():
            raise OutputError(f"{option} {path}: cannot write there ({path} is a file: Not a directory)")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gpt2lab-write-test-", dir=path)
        try:
            os.write(fd, b"\0" * 4096)  # a page: on a full disk even this fails
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OutputError:
        raise
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write there ({describe_os_error(exc, path)})") from None
    return path


def check_output_file(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Like :func:`check_output_dir` for the folder of an output file; the file itself must not be a folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a directory, expected a file name")
    check_output_dir(path.parent if str(path.parent) else Path("."), option)
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{option} {path}: cannot write there (permission denied)")
    return path
