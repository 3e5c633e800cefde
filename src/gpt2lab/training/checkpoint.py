"""The resumable training checkpoint: numbered step folders and an atomically switched ``latest`` pointer.

Layout of ``OUT/trainer/``::

    step-00000040/       a complete checkpoint: model/ (HF layout) + state.pt
    step-00000050/       the newest one
    latest               "step-00000050": the checkpoint --resume uses

Saving writes the new checkpoint into a temporary folder beside the old one, fsyncs it, renames it to
its step name, then replaces ``latest`` (write a temporary file, fsync, rename): that rename is the one
atomic switch. Older step folders are removed after it, renamed to a temporary name first so that a
half-deleted folder is never taken for a checkpoint. So at every instant ``latest`` names a complete
checkpoint (or, before the first switch, there is none or one complete step folder). Temporary
folders a kill left behind are removed the next time the run starts.

``GPT2LAB_CRASH_AT=STAGE[@N]`` (tests only) kills the process with SIGKILL at that stage of the N-th
save (default the first); the stages are :data:`SAVE_STAGES`.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import tempfile
from collections.abc import Callable
from pathlib import Path

STATE_FILE = "state.pt"
MODEL_DIR = "model"
LATEST = "latest"
SAVE_STAGES = ("writing", "written", "renamed", "pointer_written", "switched", "pruning")
_STEP = re.compile(r"^step-(\d+)$")
_STALE = re.compile(r"^\.(step-\d+\.(tmp|del)-.*|latest\.tmp)$")
_saves = 0


def crash_point(stage: str) -> None:
    """Fault injection for tests: SIGKILL this process at ``stage`` when ``GPT2LAB_CRASH_AT`` asks."""
    want = os.environ.get("GPT2LAB_CRASH_AT")
    if not want:
        return
    name, _, nth = want.partition("@")
    if name == stage and _saves == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True):
        _fsync(path)
    _fsync(root)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    found = []
    if root.is_dir():
        for entry in root.iterdir():
            m = _STEP.match(entry.name)
            if m and entry.is_dir() and (entry / STATE_FILE).is_file():
                found.append((int(m.group(1)), entry))
    return sorted(found)


class CheckpointDir:
    """The ``trainer/`` folder of a run: find, save and prune checkpoints (rank 0 only)."""

    def __init__(self, root: str | os.PathLike[str], keep: int = 1) -> None:
        if keep < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def clean_stale(self) -> list[Path]:
        """Remove the temporary folders and files an interrupted save left; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if _STALE.match(entry.name):
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                    removed.append(entry)
        return removed

    def latest(self) -> Path | None:
        """The folder of the newest complete checkpoint (holding ``state.pt`` and ``model/``), or None."""
        pointer = self.root / LATEST
        if pointer.is_file():
            target = self.root / pointer.read_text(encoding="utf-8").strip()
            if _STEP.match(target.name) and (target / STATE_FILE).is_file():
                return target
        steps = _step_dirs(self.root)
        if steps:  # a step folder exists only once complete (it is renamed into place)
            return steps[-1][1]
        if (self.root / STATE_FILE).is_file():  # the layout before step folders
            return self.root
        return None

    def save(self, step: int, fill: Callable[[Path], None]) -> Path:
        """Write checkpoint ``step`` with ``fill(folder)`` and make it the latest; see the module doc."""
        global _saves
        _saves += 1
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        name = f"step-{step:08d}"
        final = self.root / name
        current = self.latest()
        if current is not None and current.resolve() == final.resolve():
            return final  # this very step is already the latest complete checkpoint
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=self.root))
        try:
            fill(tmp)
            _fsync_tree(tmp)
            crash_point("written")
            if final.exists():  # left by a save that died before its switch: not referenced
                self._discard(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _fsync(self.root)
        crash_point("renamed")
        pointer_tmp = self.root / f".{LATEST}.tmp"
        with open(pointer_tmp, "w", encoding="utf-8") as fh:
            fh.write(name + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("pointer_written")
        os.replace(pointer_tmp, self.root / LATEST)  # the switch
        _fsync(self.root)
        crash_point("switched")
        self._prune(final)
        return final

    def _discard(self, folder: Path) -> None:
        doomed = self.root / f".{folder.name}.del-{os.getpid()}"
        os.replace(folder, doomed)  # atomic: a half-deleted folder never keeps a checkpoint's name
        crash_point("pruning")
        shutil.rmtree(doomed, ignore_errors=True)

    def _prune(self, newest: Path) -> None:
        older = [path for _, path in _step_dirs(self.root) if path != newest]
        for path in older[:max(0, len(older) - (self.keep - 1))]:
            self._discard(path)
        if (self.root / STATE_FILE).is_file():  # a checkpoint of the old layout, now superseded
            (self.root / STATE_FILE).unlink()
            shutil.rmtree(self.root / MODEL_DIR, ignore_errors=True)
        _fsync(self.root)
