"""The resumable training checkpoint: numbered step folders and an atomically switched ``latest`` pointer.

Layout of ``OUT/trainer/``::

    step-00000040/       a complete checkpoint: model/ (HF layout) + state.pt
    step-00000050/       the newest one
    latest               "step-00000050": the checkpoint --resume uses

A save is built from :mod:`gpt2lab.atomic`'s writes: the new checkpoint is filled into a temporary
folder beside the old one, fsynced and renamed to its step name (:func:`~gpt2lab.atomic.write_dir`),
then ``latest`` is replaced (:func:`~gpt2lab.atomic.write_file`): that rename is the one atomic switch.
Older step folders are removed after it, renamed to a temporary name first
(:func:`~gpt2lab.atomic.remove_dir`) so that a half-deleted folder is never taken for a checkpoint.
So at every instant ``latest`` names a complete checkpoint (or, before the first switch, there is none
or one complete step folder). A pointer over new names, rather than one folder swapped in place, keeps
the previous checkpoint whole until the new one is referenced, without needing an atomic exchange.
Temporary folders a kill left behind are removed the next time the run starts.

``GPT2LAB_CRASH_AT=STAGE[@N]`` (tests only) kills the process with SIGKILL the N-th time it reaches
that stage (:func:`gpt2lab.atomic.crash_point`); the stages of a save, in order, are
:data:`SAVE_STAGES` (``checkpoint.removing`` is reached once per folder pruned, from the second save).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from ..atomic import DIR_STAGES, FILE_STAGES, clean_stale, fsync_path, remove_dir, write_dir, write_file

STATE_FILE = "state.pt"
MODEL_DIR = "model"
LATEST = "latest"
# "checkpoint.writing": the model is written, state.pt not yet (the trainer's fill reaches it)
SAVE_STAGES = ("checkpoint.writing", *(f"checkpoint.{s}" for s in DIR_STAGES if s != "moved_aside"),
               *(f"{LATEST}.{s}" for s in FILE_STAGES), "checkpoint.removing")
_STEP = re.compile(r"^step-(\d+)$")


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
        return clean_stale(self.root)

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
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        name = f"step-{step:08d}"
        final = self.root / name
        current = self.latest()
        if current is not None and current.resolve() == final.resolve():
            return final  # this very step is already the latest complete checkpoint
        # a folder of this step left by a save that died before its switch is not referenced: replaced
        write_dir(final, fill, scope="checkpoint")
        write_file(self.root / LATEST, name + "\n", scope=LATEST)  # the switch
        self._prune(final)
        return final

    def _prune(self, newest: Path) -> None:
        older = [path for _, path in _step_dirs(self.root) if path != newest]
        for path in older[:max(0, len(older) - (self.keep - 1))]:
            remove_dir(path, scope="checkpoint")
        if (self.root / STATE_FILE).is_file():  # a checkpoint of the old layout, now superseded
            (self.root / STATE_FILE).unlink()
            shutil.rmtree(self.root / MODEL_DIR, ignore_errors=True)
        fsync_path(self.root)
