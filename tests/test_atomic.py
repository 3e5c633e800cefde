"""One atomic-write module: whole files and folders at every instant, under a real SIGKILL at every stage;
leftovers of a killed write removed by the next; permissions as a plain open() gives them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab import atomic
from gpt2lab.atomic import DIR_STAGES, FILE_STAGES, clean_stale, recover_dir, write_dir, write_file

from .conftest import SHAPES, make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k not in ("GPT2LAB_CRASH_AT", "GPT2LAB_NO_RENAME_EXCHANGE")}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          env=dict(clean, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1",
                                   TOKENIZERS_PARALLELISM="false", **env), timeout=300)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture()
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# -- files ---------------------------------------------------------------------------------------------
def test_write_file_text_bytes_and_stream(tmp_path):
    path = tmp_path / "sub" / "f.txt"
    write_file(path, "caf\u00e9 \u2028 line\r\n")  # text as it is: UTF-8, no newline translation
    assert path.read_bytes() == "caf\u00e9 \u2028 line\r\n".encode()
    write_file(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    write_file(path, lambda fh: fh.write(b"streamed"))
    assert path.read_bytes() == b"streamed"
    assert _hidden(path.parent) == []
    with pytest.raises(IsADirectoryError):
        write_file(tmp_path, "x")


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def boom(fh):
        fh.write(b"half")
        raise RuntimeError("the writer failed")

    with pytest.raises(RuntimeError, match="the writer failed"):
        write_file(path, boom)
    assert path.read_text() == "old" and _hidden(tmp_path) == []


def test_files_and_folders_get_the_umask_mode_not_tempfiles(tmp_path, umask_022):
    """tempfile.mkstemp / mkdtemp would give 0600 / 0700: a saved model must be readable by others."""
    write_file(tmp_path / "new.txt", "x")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o644
    folder = write_dir(tmp_path / "folder", lambda tmp: (tmp / "a.txt").write_text("a"))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE((folder / "a.txt").stat().st_mode) == 0o644
    os.chmod(tmp_path / "new.txt", 0o600)  # a replaced file keeps its own mode, as writing in place would
    write_file(tmp_path / "new.txt", "y")
    assert stat.S_IMODE((tmp_path / "new.txt").stat().st_mode) == 0o600


@pytest.mark.parametrize("stage", FILE_STAGES)
def test_sigkill_at_every_stage_of_a_file_write(tmp_path, stage):
    path = tmp_path / "data.json"
    path.write_text('{"version": "old"}')
    killed = _run(f"""
        from gpt2lab.atomic import write_file
        write_file({str(path)!r}, '{{"version": "new"}}' * 1000)
    """, GPT2LAB_CRASH_AT=f"file.{stage}")
    assert killed.returncode == -9, killed.stderr
    text = path.read_text()
    assert text == ('{"version": "new"}' * 1000 if stage == "replaced" else '{"version": "old"}'), stage
    left = _hidden(tmp_path)
    assert (left != []) == (stage != "replaced"), left  # the temporary, until the rename
    write_file(path, "next")  # the next write to the same place removes what the killed one left
    assert path.read_text() == "next" and _hidden(tmp_path) == []


def test_a_live_writers_temporary_is_left_alone(tmp_path):
    live = tmp_path / f".f.txt.tmp-{os.getpid()}-0123abcd"  # this process: a write in progress
    live.write_text("partial")
    write_file(tmp_path / "f.txt", "x")
    assert live.exists()
    assert clean_stale(tmp_path) == []


# -- folders: Generator.save -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with different weights: the one saved first (old) and the one saved over it (new)."""
    base = tmp_path_factory.mktemp("models")
    old = make_hf_checkpoint(base / "old", seed=1, **SHAPES["tiny"])
    new = make_hf_checkpoint(base / "new", seed=2, **SHAPES["tiny"])
    return old, new


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return gpt2lab.load(str(path), device="cpu").model.state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


SAVE_STAGES = ("model.writing", *(f"model.{s}" for s in DIR_STAGES if s != "moved_aside"))


@pytest.mark.slow
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
@pytest.mark.parametrize("stage", [*SAVE_STAGES, "model.moved_aside"])
def test_sigkill_at_every_stage_of_generator_save_into_an_existing_folder(models, tmp_path, stage, exchange):
    """Where the kernel swaps two folders in one step (Linux renameat2), the path holds a complete loadable
    model, the old or the new one, at every stage; on the two-rename path the one instant between the
    renames leaves no folder, and the next save (or recover_dir) puts the complete new one in place.
    Either way the following save removes every hidden copy the killed one left."""
    if exchange and stage == "model.moved_aside":
        pytest.skip("the exchange has no moved-aside stage")
    old_src, new_src = models
    target = tmp_path / "saved"
    gpt2lab.load(str(old_src), device="cpu").save(target)
    old, new = _weights(old_src), _weights(new_src)
    env = {"GPT2LAB_CRASH_AT": stage, **({} if exchange else {"GPT2LAB_NO_RENAME_EXCHANGE": "1"})}
    killed = _run(f"""
        import gpt2lab
        gpt2lab.load({str(new_src)!r}, device="cpu").save({str(target)!r})
    """, **env)
    assert killed.returncode == -9, f"the crash point {stage} was not reached: {killed.stderr[-2000:]}"
    assert _hidden(tmp_path), "a killed save leaves its temporary copy"
    if stage == "model.moved_aside":
        assert not target.exists()
        assert recover_dir(target) == target  # what the next save does first: roll forward
        assert _same(_weights(target), new)
    else:
        got = _weights(target)
        assert _same(got, new if stage == "model.placed" else old), stage
    gpt2lab.load(str(old_src), device="cpu").save(target)  # the next save to the same place
    assert _same(_weights(target), old)
    assert _hidden(tmp_path) == [], "the next save did not remove the killed one's leftovers"


def test_save_into_a_file_is_an_error_naming_it(models, tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(NotADirectoryError) as info:
        gpt2lab.load(str(models[0]), device="cpu").save(tmp_path / "a_file")
    assert info.value.filename == str(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "not a folder"


def test_two_rename_path_recovers_the_old_folder_when_the_new_one_is_gone(tmp_path, monkeypatch):
    target = tmp_path / "out"
    write_dir(target, lambda tmp: (tmp / "v").write_text("old"))
    dead = _run("import os; print(os.getpid())").stdout.strip()
    os.rename(target, tmp_path / f".out.old-{dead}-0123abcd")  # killed after moving it aside, new one lost
    assert recover_dir(target) == target and (target / "v").read_text() == "old"


def test_two_rename_path_swaps_in_place(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_renameat2", False)  # as on a system without renameat2
    target = tmp_path / "out"
    write_dir(target, lambda tmp: (tmp / "v").write_text("old"))
    write_dir(target, lambda tmp: (tmp / "v").write_text("new"))
    assert (target / "v").read_text() == "new" and _hidden(tmp_path) == []


def test_torch_save_past_a_size_limit_is_the_os_error_naming_the_folder(tmp_path):
    """torch.save into a file object reports a failed write as a RuntimeError whose context is the OSError
    (EFBIG here, ENOSPC on a full disk): the folder write raises the OSError itself, naming the folder."""
    target = tmp_path / "ckpt"
    result = _run(f"""
        import resource, torch
        from gpt2lab.atomic import write_dir
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        def fill(tmp):
            with open(tmp / "state.pt", "wb") as fh:
                torch.save({{"x": torch.zeros(1 << 16)}}, fh)
        try:
            write_dir({str(target)!r}, fill)
        except OSError as exc:
            print(type(exc).__name__, exc.errno, exc.filename)
    """)
    assert result.stdout.split() == ["OSError", "27", str(target)], result.stderr[-2000:]
    assert not target.exists() and _hidden(tmp_path) == []
