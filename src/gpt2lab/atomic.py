"""Every file and folder gpt2lab writes in place of another: whole, old or new, at every instant.

A foundation module (standard library only; nothing of gpt2lab), used by every writer: checkpoints,
training checkpoints and records, evaluation and review outputs, data caches.

* :func:`write_file` (text, bytes, or a callable that streams into a binary file): a temporary file
  beside the target, flushed and ``fsync``-ed, renamed over the target (``rename(2)`` is atomic), then
  the folder is ``fsync``-ed so the rename survives a power cut.
* :func:`write_dir`: ``fill(tmp)`` fills a temporary folder beside the target, every file and folder
  in it is ``fsync``-ed, then :func:`swap_dir` puts it in place.
* :func:`replace_files`: the same for the files of a folder that also holds other things (the model
  at the top of a training run's ``--out``): each file is replaced atomically, one after another.
* :func:`swap_dir`: the crash-safe directory swap. Where the kernel and file system offer it (Linux
  ``renameat2(RENAME_EXCHANGE)``: ext4, xfs, btrfs, tmpfs, ...) the complete new folder and the old one
  trade names in ONE atomic step, so the target names a complete folder at every instant, old then
  new; the old one, now under the temporary name, is removed afterwards. Elsewhere two renames are the
  best a file system offers: the old folder is moved aside to ``.NAME.old-TAG`` (only once the new one
  is complete and synced), then ``.NAME.tmp-TAG`` is renamed to ``NAME``. A kill between the two leaves
  no ``NAME`` but both complete copies under one ``TAG``; :func:`recover_dir` (run by the next write to
  the same place) renames the new one into place. Chosen over a pointer scheme (``NAME`` a symlink to a
  versioned folder, the link replaced atomically) because a saved model must stay a plain folder that
  ``cp``, ``rsync`` and upload tools copy as it is, and an existing real folder cannot be turned into a
  link atomically. (The training checkpoints do use a pointer, ``latest``, over new step folders:
  see ``training/checkpoint.py``.)

Temporary names are ``.NAME.KIND-PID-RANDOM`` (KIND ``tmp``, ``old`` or ``del``). A save killed half-way
leaves such copies; :func:`clean_stale` removes those of a name whose writing process is no longer
running (a live one may be a concurrent save of the same path), and every write calls it first, so
the next save to the same place removes what a killed one left.

Permissions are those of a plain ``open()`` / ``mkdir()``: ``0o666`` / ``0o777`` less the umask (not
``tempfile``'s ``0o600`` / ``0o700``), and a replaced file or folder keeps its own mode.

Crash points (tests): ``GPT2LAB_CRASH_AT=STAGE[@N]`` makes :func:`crash_point` kill the process with
SIGKILL the N-th time (default: the first) it reaches STAGE. Every write names its stages
``SCOPE.STEP`` with the caller's ``scope``: :data:`FILE_STAGES` for files, :data:`DIR_STAGES` for
folders (``moved_aside`` only on the two-rename path), :data:`REMOVE_STAGES` for :func:`remove_dir`.
``GPT2LAB_NO_RENAME_EXCHANGE=1`` (tests) makes :func:`swap_dir` take the two-rename path here too.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

FILE_STAGES = ("writing", "synced", "replaced")
DIR_STAGES = ("filled", "synced", "moved_aside", "placed")
REMOVE_STAGES = ("removing",)
CRASH_ENV = "GPT2LAB_CRASH_AT"
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|del)-(?P<pid>\d+)-(?P<tag>[0-9a-f]{8})$")
_hits: dict[str, int] = {}


# -- crash points --------------------------------------------------------------------------------------
def crash_point(stage: str) -> None:
    """Fault injection for tests: SIGKILL this process when ``GPT2LAB_CRASH_AT`` names ``stage`` and
    this is the N-th time the process reaches it (``STAGE@N``, default N=1). A no-op otherwise."""
    want = os.environ.get(CRASH_ENV)
    if not want:
        return
    name, _, nth = want.partition("@")
    if name != stage:
        return
    _hits[stage] = _hits.get(stage, 0) + 1
    if _hits[stage] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


# -- names and housekeeping ----------------------------------------------------------------------------
def temp_path(target: str | os.PathLike[str], kind: str = "tmp", tag: str | None = None) -> Path:
    """``.NAME.KIND-PID-TAG`` beside ``target``: hidden, and telling :func:`clean_stale` who made it."""
    target = Path(target)
    tag = tag or os.urandom(4).hex()
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{tag}"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # ours is in progress; on Windows signal 0 is not a probe
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except OSError:
            pass


def _dead_copies(folder: Path, name: str | None = None, kind: str | None = None) -> list[tuple[Path, re.Match]]:
    """The temporary copies in ``folder`` (of ``name``, of ``kind``, when given) whose writer is gone."""
    try:
        entries = sorted(e.name for e in os.scandir(folder))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        m = _TEMP.match(entry)
        if m and (name is None or m["name"] == name) and (kind is None or m["kind"] == kind) \
                and not _alive(int(m["pid"])):
            found.append((folder / entry, m))
    return found


def clean_stale(folder: str | os.PathLike[str], name: str | None = None) -> list[Path]:
    """Remove the temporary copies in ``folder`` (of ``name`` only, when given) that a killed write
    left: those whose process is gone. Returns what was removed."""
    removed = []
    for path, _ in _dead_copies(Path(folder), name):
        _remove(path)
        removed.append(path)
    return removed


def recover_dir(target: str | os.PathLike[str]) -> Path | None:
    """Finish a two-rename swap of ``target`` that a kill cut between its renames (see the module doc).

    When ``target`` is missing and a dead writer's ``.NAME.old-TAG`` exists, the complete new folder
    ``.NAME.tmp-TAG`` is renamed into place (the old one is moved aside only once the new one is
    complete and synced), or the old one back when the new one is gone. Returns ``target`` when it
    recovered it, else None.
    """
    target = Path(target)
    if os.path.lexists(target):
        return None
    for old, m in _dead_copies(target.parent, target.name, "old"):
        new = target.parent / f".{target.name}.tmp-{m['pid']}-{m['tag']}"
        os.rename(new if new.is_dir() else old, target)
        fsync_path(target.parent)
        return target
    return None


# -- errors --------------------------------------------------------------------------------------------
def _os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc``: itself, or the one a plain ``RuntimeError`` wraps (``torch.save``
    into a file object on a full disk raises ``RuntimeError`` with the ``ENOSPC`` as its context)."""
    if isinstance(exc, OSError):
        return exc
    if type(exc) is RuntimeError:
        inner = exc.__cause__ if exc.__cause__ is not None else (
            None if exc.__suppress_context__ else exc.__context__)
        return inner if isinstance(inner, OSError) else None
    return None


def _renamed(exc: BaseException, tmp: Path, target: Path) -> OSError | None:
    """``exc`` as an ``OSError`` naming the path the caller asked for instead of the temporary one (a
    file inside a temporary folder is named inside ``target``), or None to re-raise ``exc`` as it is."""
    err = _os_error(exc)
    if err is None or err.errno is None:
        return None
    name = err.filename
    if name is None or str(name) == str(tmp):
        name = str(target)
    elif str(name).startswith(str(tmp) + os.sep):
        name = str(target) + str(name)[len(str(tmp)):]
    elif err is exc:
        return None
    return OSError(err.errno, err.strerror, name)


@contextlib.contextmanager
def naming(path: str | os.PathLike[str]) -> Iterator[None]:
    """Give an ``OSError`` raised inside without a file name (``write``, ``fsync`` on a full disk)
    ``path`` as its name, so the one-line error says which file could not be written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


@contextlib.contextmanager
def _undone_on_error(tmp: Path, target: Path) -> Iterator[None]:
    """On any error inside: remove the temporary ``tmp`` and raise an ``OSError`` as naming ``target``
    (see :func:`_renamed`), anything else as it is."""
    try:
        yield
    except BaseException as exc:
        _remove(tmp)
        err = _renamed(exc, tmp, target)
        if err is not None:
            raise err from None
        raise


# -- durability ----------------------------------------------------------------------------------------
def fsync_path(path: str | os.PathLike[str]) -> None:
    """``fsync`` a file, or a folder (so that the renames and new names in it are on disk), through a
    read-only descriptor: no write access is needed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike[str]) -> None:
    """``fsync`` every file and folder under ``root``, deepest first, then ``root``."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                fsync_path(path)
        fsync_path(folder)


def _keep_mode(replaced: Path, new: Path) -> None:
    """Give ``new`` the permission bits of the file or folder it replaces (as writing in place would)."""
    try:
        mode = stat.S_IMODE(os.stat(replaced).st_mode)
    except FileNotFoundError:
        return
    os.chmod(new, mode)


# -- files ---------------------------------------------------------------------------------------------
def write_file(path: str | os.PathLike[str], content: str | bytes | Callable[[BinaryIO], Any], *,
               scope: str = "file") -> Path:
    """Write ``content`` to ``path`` atomically: a crash leaves the old file or the new one, never a part.

    ``content``: text (written as UTF-8, line endings untouched), bytes, or a callable that writes into
    the binary file it is given (``lambda fh: fig.savefig(fh, format="png")``). The parent folder is
    created. Raises ``OSError`` naming the path (a full disk, a read-only file system; the temporary
    file is removed), ``IsADirectoryError`` when ``path`` is a folder. Crash stages: ``scope`` +
    :data:`FILE_STAGES`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    tmp = temp_path(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    with _undone_on_error(tmp, path):
        with os.fdopen(fd, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            crash_point(f"{scope}.writing")
            fh.flush()
            os.fsync(fh.fileno())
        _keep_mode(path, tmp)
        crash_point(f"{scope}.synced")
        os.replace(tmp, path)
    crash_point(f"{scope}.replaced")
    fsync_path(path.parent)
    return path


# -- folders -------------------------------------------------------------------------------------------
def make_temp_dir(target: str | os.PathLike[str], kind: str = "tmp") -> Path:
    """A new empty hidden folder beside ``target`` (``mkdir`` with the umask, or ``target``'s mode)."""
    tmp = temp_path(target, kind)
    os.mkdir(tmp, 0o777)
    _keep_mode(Path(target), tmp)
    return tmp


def write_dir(target: str | os.PathLike[str], fill: Callable[[Path], Any], *, scope: str = "dir") -> Path:
    """Create or replace folder ``target`` with what ``fill(tmp)`` writes into an empty temporary folder.

    At every instant ``target`` is the previous folder or the complete new one (see the module doc;
    on the two-rename path it is missing for the instant between them, and the next write recovers
    it). A half-written temporary folder is removed on an error, and by the next write to ``target``
    after a kill. Raises what ``fill`` raises, ``OSError`` for a full disk and the like, and
    ``NotADirectoryError`` when ``target`` is a file. Crash stages: ``scope`` + :data:`DIR_STAGES`.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(target))
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(target)
    clean_stale(target.parent, target.name)
    tmp = make_temp_dir(target)
    with _undone_on_error(tmp, target):
        fill(tmp)
        crash_point(f"{scope}.filled")
        fsync_tree(tmp)
        crash_point(f"{scope}.synced")
        old = swap_dir(tmp, target, scope=scope)
    fsync_path(target.parent)
    crash_point(f"{scope}.placed")
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target


def swap_dir(new: str | os.PathLike[str], target: str | os.PathLike[str], *, scope: str = "dir") -> Path | None:
    """Put the complete folder ``new`` (a :func:`temp_path` beside ``target``) at ``target``.

    Returns where the previous ``target`` now is (to be removed by the caller), or None when there was
    none. The exchange, or the two renames, are explained in the module doc.
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.rename(new, target)
        return None
    if _exchange(new, target):
        return new
    aside = target.parent / new.name.replace(".tmp-", ".old-", 1)  # the same tag: recover_dir pairs them
    os.rename(target, aside)
    crash_point(f"{scope}.moved_aside")
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    return aside


_RENAME_EXCHANGE = 2  # linux/fs.h
_renameat2: Any = None  # resolved on first use: None unknown, False unavailable


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names ``a`` and ``b`` in one atomic step; False where the system cannot."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = False
        if os.environ.get("GPT2LAB_NO_RENAME_EXCHANGE") != "1":  # tests of the two-rename path
            try:
                import ctypes

                fn = ctypes.CDLL(None, use_errno=True).renameat2
                fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
                fn.restype = ctypes.c_int
                _renameat2 = (fn, ctypes)
            except (OSError, AttributeError):  # not Linux, or a C library without renameat2
                pass
    if not _renameat2:
        return False
    fn, ctypes = _renameat2
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):  # this file system cannot
        return False
    raise OSError(err, os.strerror(err), str(b))


def remove_dir(path: str | os.PathLike[str], *, scope: str = "dir") -> None:
    """Remove folder ``path``: renamed to a hidden ``.NAME.del-...`` name first (atomic), so a removal
    cut short never leaves a half-deleted folder under its real name. Crash stage: ``scope.removing``."""
    path = Path(path)
    doomed = temp_path(path, "del")
    os.rename(path, doomed)
    fsync_path(path.parent)
    crash_point(f"{scope}.removing")
    shutil.rmtree(doomed, ignore_errors=True)


def replace_files(folder: str | os.PathLike[str], fill: Callable[[Path], Any], *, scope: str = "files"
                  ) -> list[Path]:
    """Write files into ``folder``, which holds other things too (the model at the top of a training
    run's ``--out``): ``fill(tmp)`` writes them into a temporary folder inside it (``.SCOPE.tmp-...``),
    every one is synced, then each is renamed over its namesake (each rename atomic; a kill between two
    leaves some files new and the rest old, every one whole). Returns the paths written. Crash stages:
    ``scope`` + ``filled``, ``synced``, ``placed``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean_stale(folder, scope)
    tmp = make_temp_dir(folder / scope)
    written = []
    with _undone_on_error(tmp, folder):
        fill(tmp)
        crash_point(f"{scope}.filled")
        fsync_tree(tmp)
        crash_point(f"{scope}.synced")
        for entry in sorted(tmp.iterdir()):
            os.replace(entry, folder / entry.name)
            written.append(folder / entry.name)
        fsync_path(folder)
    crash_point(f"{scope}.placed")
    shutil.rmtree(tmp, ignore_errors=True)
    return written
