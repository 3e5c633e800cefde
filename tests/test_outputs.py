"""Every command that writes fails fast, in one line with exit 2, when its output cannot be written."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import SHAPES, make_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = "n_layer=2,n_head=2,n_embd=32,n_positions=64"


def _can_mount() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", 'd=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs "$d"'],
                           capture_output=True)
    return probe.returncode == 0


CAN_MOUNT = _can_mount()
# mount a tiny tmpfs at $1 in a private mount namespace, make it full or read-only, then run the command
_WRAP = {
    "full": 'mount -t tmpfs -o size=128k tmpfs "$1" && { head -c 1M /dev/zero > "$1/filler" 2>/dev/null; true; }',
    "read_only": 'mount -t tmpfs -o size=1m tmpfs "$1" && mount -o remount,ro "$1"',
    "small": 'mount -t tmpfs -o size=3m tmpfs "$1"',
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    base = tmp_path_factory.mktemp("outputs")
    ckpt = make_hf_checkpoint(base / "model", seed=2, **SHAPES["tiny"])
    (base / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    (base / "data.csv").write_text("text,label\nhello there friend,a\ngood morning to you,b\n", encoding="utf-8")
    (base / "a_file").write_text("not a folder\n")
    return base, ckpt


def _command(name: str, out: Path, base: Path, ckpt: Path) -> list[str]:
    return {
        "train": ["train", str(base / "corpus.txt"), "--config", TINY, "--out", str(out / "run"), "--max-steps", "2",
                  "--block-size", "16", "--batch-size", "2", "--no-progress"],
        "finetune": ["finetune", str(base / "corpus.txt"), "--model", str(ckpt), "--out", str(out / "run"),
                     "--max-steps", "1", "--block-size", "16", "--no-progress"],
        "augment": ["augment", str(base / "data.csv"), "--out", str(out / "aug.csv"), "--model", str(ckpt)],
        "story": ["story", "Once upon a time", "--out", str(out / "stories"), "--model", str(ckpt), "--length", "4"],
        "explore": ["explore", "Hello", "--out", str(out / "explore"), "--model", str(ckpt), "--samples", "1"],
        "chat": ["chat", "--message", "hi", "--save", str(out / "chat.txt"), "--model", str(ckpt)],
    }[name]


def _run(args: list[str], mount: Path | None = None, wrap: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "gpt2lab", *args]
    if wrap is not None:
        cmd = ["unshare", "-rm", "sh", "-c", f'{wrap} && shift && exec "$@"', "sh", str(mount), *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: "), result.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


COMMANDS = ["train", "finetune", "augment", "story", "explore", "chat"]


@pytest.mark.parametrize("command", COMMANDS)
def test_output_under_a_regular_file(files, command):
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    base, ckpt = files
    result = CliRunner().invoke(app, _command(command, base / "a_file", base, ckpt))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1, result.output
    assert lines[0].startswith("gpt2lab: error: ") and "a_file" in lines[0] and "Not a directory" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not CAN_MOUNT, reason="needs unshare -rm and tmpfs mounts (user namespaces)")
@pytest.mark.parametrize("command, kind, reason", [
    *[(c, "read_only", "Read-only file system") for c in COMMANDS],
    *[(c, "full", "No space left") for c in ("train", "augment", "chat")],
])
def test_read_only_or_full_output(files, tmp_path, command, kind, reason):
    base, ckpt = files
    mount = tmp_path / "mnt"
    mount.mkdir()
    result = _run(_command(command, mount, base, ckpt), mount, _WRAP[kind])
    _one_line_error(result, str(mount), reason)


@pytest.mark.skipif(not CAN_MOUNT, reason="needs unshare -rm and tmpfs mounts (user namespaces)")
def test_disk_filling_up_during_training_is_one_line(files, tmp_path):
    """The first checkpoint (several MB) does not fit: one line, exit 2, no temporary folder left."""
    base, _ = files
    mount = tmp_path / "mnt"
    mount.mkdir()
    args = _command("train", mount, base, base) + ["--save-every", "1"]
    wrap = _WRAP["small"] + ' && "$0" "$@"; rc=$?; ls -A "$1/run" "$1/run/trainer" 2>/dev/null; exit $rc'
    cmd = ["unshare", "-rm", "sh", "-c", wrap.replace('"$0" "$@"', 'shift; "$@"'), "sh", str(mount),
           sys.executable, "-m", "gpt2lab", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(errors) == 1 and errors[0].startswith("gpt2lab: error: ") and "No space left on device" in errors[0]
    assert ".tmp-" not in result.stdout, result.stdout  # the listing of run/ and run/trainer/


# -- a disk that fills up after the start-up check: every write says which file, in one line -------------------
# 32 KB left: the start-up probe (one 4 KB page) passes, the outputs below do not fit
_WRAP["nearly_full"] = 'mount -t tmpfs -o size=256k tmpfs "$1" && head -c 229376 /dev/zero > "$1/.filler"'
LONG = "a long note to make the row big. " * 300  # ~10 KB


def _late_command(name: str, mount: Path, base: Path, ckpt: Path) -> list[str]:
    import json

    if name == "review-make":
        for src in ("a", "b"):
            (base / f"{src}.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "completion": f"{src} {LONG}"})
                                                       + "\n" for i in range(4)), encoding="utf-8")
        return ["review", "make", "--completions", str(base / "a.jsonl"), "--completions", str(base / "b.jsonl"),
                "-o", str(mount / "review.jsonl")]
    if name == "review-summary":
        log = base / "log.jsonl"
        log.write_text("".join(json.dumps({"reviewer": "r", "item": f"i{i}", "mode": "pairwise",
                                           "sources": ["a", "b"], "choice": "AB"[i % 2]}) + "\n"
                               for i in range(6)), encoding="utf-8")
        return ["review", "summary", str(log), "-o", str(mount / "summary")]
    if name == "review-export":
        rows = [{"text": "first row", "notes": LONG, "aug_origin": "original", "aug_source_row": 0, "aug_method": ""},
                *[{"text": f"made {i}", "notes": LONG, "aug_origin": "generated", "aug_source_row": 0,
                   "aug_method": "continuation"} for i in range(4)]]
        (base / "aug.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        from typer.testing import CliRunner

        from gpt2lab.cli.main import app

        made = CliRunner().invoke(app, ["review", "make", "--augment", str(base / "aug.jsonl"),
                                        "-o", str(base / "curate.jsonl")])
        assert made.exit_code == 0, made.output
        (base / "curate.log.jsonl").write_text("")
        return ["review", "export", str(base / "curate.jsonl"), "--log", str(base / "curate.log.jsonl"),
                "--keep-unreviewed", "-o", str(mount / "curated.jsonl")]
    if name == "augment":
        (base / "big.csv").write_text("text,label,notes\n" + "".join(f"row number {i} here,a,{LONG}\n"
                                                                     for i in range(5)), encoding="utf-8")
        return ["augment", str(base / "big.csv"), "--out", str(mount / "aug.csv"), "--model", str(ckpt),
                "--per-example", "1", "--max-new-tokens", "4"]
    if name == "explore":
        return _command("explore", mount, base, ckpt) + ["--temperature", "0.7", "--top-k", "0", "--top-p", "1.0"]
    return _command(name, mount, base, ckpt)


@pytest.mark.slow
@pytest.mark.skipif(not CAN_MOUNT, reason="needs unshare -rm and tmpfs mounts (user namespaces)")
@pytest.mark.parametrize("command", ["review-make", "review-summary", "review-export", "augment", "explore",
                                     "finetune"])
def test_a_disk_filling_up_at_a_later_write_is_one_line_naming_the_file(files, tmp_path, command):
    base, ckpt = files
    work = tmp_path / "work"
    shutil.copytree(base, work)
    mount = tmp_path / "mnt"
    mount.mkdir()
    args = _late_command(command, mount, work, ckpt)
    wrap = _WRAP["nearly_full"] + ' && shift && "$@"; rc=$?; echo "--listing--" >&2; ls -AR "$0" >&2; exit $rc'
    cmd = ["unshare", "-rm", "sh", "-c", wrap, str(mount), str(mount), sys.executable, "-m", "gpt2lab", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    output, _, listing = result.stderr.partition("--listing--")
    lines = [line for line in output.splitlines() if "error" in line.lower()]  # training logs its steps too
    assert result.returncode == 2 and "Traceback" not in output, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: ") and f"{mount}/" in lines[0], output[-3000:]
    assert "No space left on device" in lines[0], lines[0]
    assert ".tmp-" not in listing, listing  # no temporary copy left behind
