"""What a new user tripped on: the server's address, progress that is shown, one-line usage errors, a
word when the loss curve is skipped, a clear error for a missing prompt, the README's first commands."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gpt2lab
from gpt2lab.cli.main import app

from .test_console import run_on_terminal

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args, message", [
    (["generate", "x", "--temprature", "3"], "No such option: --temprature"),
    (["serve", "--port", "abc"], "Invalid value for '--port'"),
    (["review", "summary"], "Missing argument"),
    (["eval", "perplexity", "--stride"], "Option '--stride' requires an argument"),
    (["nosuchcommand"], "No such command 'nosuchcommand'"),
])
def test_a_usage_error_is_one_line(args, message):
    """The README promises `gpt2lab: error: ...` and exit 2 for a bad value; a mistyped option drew a usage
    line, a hint and a 3-line box."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpt2lab: error: ") and message in lines[0], result.stderr
    # help and the bare command are as before
    assert CliRunner().invoke(app, ["generate", "--help"]).exit_code == 0
    bare = CliRunner().invoke(app, [])
    assert bare.exit_code == 2 and "Usage" in bare.stdout and "gpt2lab: error" not in bare.output


def test_serve_says_where_it_listens(tiny_checkpoint, tmp_path):
    """`gpt2lab serve` never said its address; with --port 0 there was no way to know it."""
    import httpx

    log = tmp_path / "serve.log"
    env = {**__import__("os").environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "gpt2lab", "serve", "--model", str(tiny_checkpoint),
                                   "--port", "0", "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT,
                                  env=env)
    try:
        deadline = time.monotonic() + 180
        found = None
        while found is None and time.monotonic() < deadline and server.poll() is None:
            time.sleep(0.2)
            found = re.search(r"gpt2lab: serving (\S+) on (http://127\.0\.0\.1:(\d+))\n", log.read_text())
        assert found is not None, log.read_text()
        assert found.group(1) == str(tiny_checkpoint) and int(found.group(3)) > 0  # the name /v1/models gives
        assert httpx.get(f"{found.group(2)}/health", timeout=30).json()["status"] == "ok"  # ready when it says so
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_story_drafts_show_progress_on_a_terminal(tiny_checkpoint, tmp_path):
    """`story --drafts 3` streamed draft 1, then ran on for minutes without a sign: the drafts' progress is
    shown on stderr, where stderr is a terminal (and nothing of it reaches stdout, or a log file)."""
    args = ["story", "Once", "--model", str(tiny_checkpoint), "--drafts", "3", "--length", "6", "--seed", "0",
            "--out", str(tmp_path / "stories")]
    code, out, err = run_on_terminal(*args, "--quiet", term="xterm")
    assert code == 0, err
    assert "3 drafts, tokens" in err and "18/18" in err and "\x1b" not in out
    piped = CliRunner().invoke(app, [*args, "--quiet"])
    assert piped.exit_code == 0 and "drafts, tokens" not in piped.stderr
    assert piped.stderr.count("gpt2lab: draft ") == 3


def test_write_stories_reports_the_progress_of_every_draft(tiny_checkpoint):
    """What the bar shows: all drafts' tokens against drafts x length, and which drafts are done."""
    from gpt2lab.apps.story import StoryProgress, write_stories

    gen = gpt2lab.load(tiny_checkpoint)
    seen: list[StoryProgress] = []
    stories = write_stories(gen, "Once", drafts=3, length=5, params=gpt2lab.sampling.SamplingParams(seed=0),
                            on_progress=seen.append)
    assert [p.total_tokens for p in seen] == [15] * len(seen)
    assert seen[-1].tokens == 15 and seen[-1].finished == frozenset({0, 1, 2})
    assert all(a.tokens <= b.tokens for a, b in zip(seen, seen[1:]))  # it only moves forward
    assert len(stories) == 3


def test_review_make_shows_a_progress_bar_on_a_terminal_only(tiny_checkpoint, tmp_path):
    args = ["review", "make", "a", "b", "c", "-m", str(tiny_checkpoint), "--setting", "temperature=0",
            "--setting", "temperature=1", "--max-new-tokens", "2", "-o", str(tmp_path / "r.jsonl")]
    code, out, err = run_on_terminal(*args, term="xterm")
    assert code == 0, err
    assert f"generating with {tiny_checkpoint}" in err and "6/6" in err and "wrote" in out
    piped = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "r2.jsonl")])
    assert piped.exit_code == 0 and "generating with" not in piped.stderr


def test_finetune_says_when_the_loss_curve_is_skipped(tiny_checkpoint, tmp_path, monkeypatch):
    """Without matplotlib, loss_curve.png (listed in docs/training.md) was skipped without a word."""
    data = tmp_path / "data.txt"
    data.write_text("To be, or not to be, that is the question. " * 40, encoding="utf-8")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what an environment without it looks like
    result = CliRunner().invoke(app, ["finetune", str(data), "--model", str(tiny_checkpoint), "--out",
                                      str(tmp_path / "out"), "--max-steps", "1", "--block-size", "16",
                                      "--no-progress", "--val-share", "0"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "loss_curve.png" in line]
    assert notes == ["gpt2lab: matplotlib not installed: the loss curve (loss_curve.png) is skipped; install it "
                     "with: pip install 'gpt2lab[train]'"]
    assert not (tmp_path / "out" / "loss_curve.png").exists()


def test_a_missing_prompt_is_named():
    """generate_text(None) was `TypeError: 'NoneType' object is not iterable` (after loading a model)."""
    with pytest.raises(TypeError, match=r"^prompt must be a str, got NoneType$"):
        gpt2lab.generate_text(None)


def test_a_missing_prompt_is_named_by_the_generator(tiny_checkpoint):
    gen = gpt2lab.load(tiny_checkpoint)
    with pytest.raises(TypeError, match=r"^prompt must be a str, got NoneType$"):
        gen.generate_text(None)
    with pytest.raises(TypeError, match=r"^prompts must be a str or a sequence of str, got NoneType$"):
        gen.generate(None)
    with pytest.raises(TypeError, match=r"^prompt must be a str, got int$"):
        gen.generate(["ok", 3])


def test_the_readme_starts_in_a_virtual_environment():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first = readme[readme.index("```bash"):]
    first = first[:first.index("```", 7)]
    assert "python -m venv .venv" in first and ". .venv/bin/activate" in first
    # the two commands themselves are unchanged (.ci/run runs command 2)
    assert 'pip install torch==2.13.0 && pip install -e . && gpt2lab generate "ROMEO:" --max-new-tokens 40' in first
    assert 'pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q' in first
    assert ".venv/" in (ROOT / ".gitignore").read_text().splitlines()


def test_every_extra_a_command_needs_is_in_the_readme_table():
    """`review serve`/`summary` need the review extra, which the README's table left out."""
    from gpt2lab.cli.common import EXTRAS

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| extra | install | needed by |"):]
    table = table[:table.index("\n\n")]
    for extra in [*EXTRAS, "review"]:
        assert f"| `{extra}` |" in table, extra
    assert "`gpt2lab review serve`" in table and "`gpt2lab review summary`" in table
    pyproject = (ROOT / "pyproject.toml").read_text()
    for extra in ("server", "eval", "train", "review"):
        assert re.search(rf"^{extra} = \[", pyproject, re.M), extra
    # docs/evaluation.md said every eval command needs the eval extra: `eval perplexity` does not
    evaluation = " ".join((ROOT / "docs" / "evaluation.md").read_text(encoding="utf-8").split())
    assert "`eval perplexity` needs only the base install" in evaluation
