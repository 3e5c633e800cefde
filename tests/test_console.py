"""Text from files, models and users never controls the operator's terminal (gpt2lab.console): on a terminal
it is shown with its control characters escaped and never read as rich markup; to a file or a pipe it is
written exactly. Hypothesis makes the texts; they go through ``review summary`` and the commands."""

from __future__ import annotations

import io
import json
import re
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import typer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from gpt2lab import console
from gpt2lab.cli.main import app

# what may not reach a terminal: C0 controls but newline and tab, DEL, C1 controls, bidi overrides, U+2028/9
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
ATTACKS = ["\x1b[2J\x1b[H", "\x1b]0;owned\x07", "\x1b]52;c;ZWNobyBoaQ==\x07", "\x9b31m", "\x1bP+q\x1b\\", "\r\x1b[K",
           "\x08\x08\x08", "[/b]", "[bold red]red[/]", "[link=http://x]y[/link]", ":smile:", "\x00", "\x7f", "\u009d",
           "\u202eevil\u202c", "\u2067x\u2069", "a\u2028b"]
texts = st.one_of(st.text(max_size=40), st.sampled_from(ATTACKS),
                  st.lists(st.one_of(st.sampled_from(ATTACKS), st.text(max_size=8)), max_size=5).map("".join))


class Terminal(io.StringIO):
    """A stream that says it is a terminal, as a tty does."""

    def isatty(self) -> bool:
        return True


@contextmanager
def on_terminal(term: str = "dumb"):
    """stdout and stderr as terminals (TERM=dumb: rich draws no colours, so any escape would be the text's)."""
    import os

    out, err = Terminal(), Terminal()
    saved = sys.stdout, sys.stderr
    old_term = os.environ.get("TERM")
    os.environ["TERM"] = term
    sys.stdout, sys.stderr = out, err
    try:
        yield out, err
    finally:
        sys.stdout, sys.stderr = saved
        if old_term is None:
            del os.environ["TERM"]
        else:
            os.environ["TERM"] = old_term


def run_on_terminal(*args: str, term: str = "dumb") -> tuple[int, str, str]:
    """``gpt2lab ARGS`` in this process with a terminal for stdout and stderr: (exit code, stdout, stderr)."""
    with on_terminal(term) as (out, err):
        try:
            typer.main.get_command(app).main(list(args), prog_name="gpt2lab")
            code = 0
        except SystemExit as exc:  # the end of every command run as `gpt2lab` runs it
            code = exc.code
    return int(code or 0), out.getvalue(), err.getvalue()


@given(texts)
def test_escaped_text_holds_no_control_and_plain_text_is_untouched(text):
    shown = console.escape_controls(text)
    assert not CONTROL.search(shown)
    if not CONTROL.search(text):
        assert shown == text
    assert console.shown(text, io.StringIO()) == text  # a file or a pipe gets the text exactly
    assert console.shown(text, Terminal()) == shown
    json_line = json.dumps({"t": text}, ensure_ascii=False)
    assert json.loads(console.escape_controls(json_line)) == {"t": text.replace("\r\n", "\n")} or "\r\n" not in text


def test_a_markup_comment_does_not_crash_review_summary(tmp_path):
    """A reviewer comment with `[/b]` ended `review summary` with rich's MarkupError."""
    log = tmp_path / "log.jsonl"
    records = [{"reviewer": "ann", "item": "i1", "mode": "pairwise", "sources": ["[red]p", "q"], "choice": "A",
                "winner": "[red]p", "flags": [], "comment": "closing [/b] and [bold]opening"}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    result = CliRunner().invoke(app, ["review", "summary", str(log)])
    assert result.exit_code == 0, result.output
    assert "closing [/b] and [bold]opening" in result.stdout and "[red]p" in result.stdout


@settings(max_examples=40, deadline=None)
@given(comment=texts, source=texts, reviewer=texts)
def test_review_summary_shows_any_text_as_text(comment, source, reviewer):
    records = [{"reviewer": reviewer or "r", "item": "i1", "mode": "pairwise", "sources": [source or "s", "other"],
                "choice": "A", "winner": source or "s", "flags": [], "comment": comment or "c"},
               {"reviewer": "second", "item": "i1", "mode": "pairwise", "sources": [source or "s", "other"],
                "choice": "tie", "winner": None, "flags": [], "comment": ""}]
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "log.jsonl"
        log.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        code, out, err = run_on_terminal("review", "summary", str(log))
        assert code == 0, err
        assert not CONTROL.search(out) and not CONTROL.search(err)
        # the same log piped: every character of the comment, controls included (rich folds long cells)
        piped = CliRunner().invoke(app, ["review", "summary", str(log)])
        assert piped.exit_code == 0


@pytest.fixture(scope="module")
def model(tiny_checkpoint) -> str:
    return str(tiny_checkpoint)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=texts.filter(lambda t: t.strip() and "\x00" not in t))
def test_generate_streams_controls_escaped_on_a_terminal_and_exactly_to_a_pipe(model, prompt):
    args = ["generate", prompt, "--model", model, "--max-new-tokens", "3", "--seed", "1"]
    code, out, err = run_on_terminal(*args)
    assert code == 0, err
    assert not CONTROL.search(out) and out.startswith(console.escape_controls(prompt))
    piped = CliRunner().invoke(app, args)
    assert piped.exit_code == 0 and piped.stdout.startswith(prompt)  # generated text is data: kept exactly
    code, out, _ = run_on_terminal(*args, "--json")
    assert code == 0 and not CONTROL.search(out) and json.loads(out)["prompt"] == prompt


def test_the_model_s_own_control_characters_are_escaped_on_a_terminal(model):
    """The text a model writes goes through the same rule (byte-level GPT-2 has a token for each byte, ESC
    included); pushed up with --logit-bias, ESC must reach a terminal escaped and a pipe as it is."""
    from gpt2lab.tokenizer import Tokenizer

    esc = Tokenizer.gpt2().encode("\x1b")
    assert len(esc) == 1
    args = ["generate", "Hi", "--model", model, "--max-new-tokens", "4", "--temperature", "0",
            "--logit-bias", f"{esc[0]}:100"]
    code, out, err = run_on_terminal(*args)
    assert code == 0, err
    assert out == "Hi" + "\\u001b" * 4 + "\n"
    piped = CliRunner().invoke(app, args)
    assert piped.stdout == "Hi" + "\x1b" * 4 + "\n"


def test_chat_story_and_errors_escape_on_a_terminal(model, tmp_path):
    attack = ATTACKS[0] + ATTACKS[1] + ATTACKS[3]
    # chat: the reply, after the user's own message and persona made the prompt
    code, out, err = run_on_terminal("chat", "--model", model, "--message", attack, "--persona", attack,
                                     "--max-new-tokens", "3", "--seed", "0")
    assert code == 0 and not CONTROL.search(out + err), err
    # story: the premise streams first
    code, out, err = run_on_terminal("story", attack, "--model", model, "--length", "3", "--seed", "0",
                                     "--out", str(tmp_path / "stories"))
    assert code == 0 and not CONTROL.search(out + err), err
    assert out.startswith(console.escape_controls(attack))
    # an error quoting the input: a file name
    code, out, err = run_on_terminal("eval", "perplexity", str(tmp_path / f"no{attack}.txt"), "--model", model)
    assert code == 2 and err.startswith("gpt2lab: error:") and not CONTROL.search(err)
    assert console.escape_controls(attack) in err
    # a usage error quoting a mistyped option
    code, _, err = run_on_terminal("generate", "x", f"--temp{ATTACKS[2]}")
    assert code == 2 and err.count("\n") == 1 and not CONTROL.search(err)


def test_tables_read_no_markup(tmp_path, model, monkeypatch):
    """eval perplexity named its files in a rich table that read '[bold]...' in a file name as markup."""
    monkeypatch.chdir(tmp_path)  # a short name: the table shows it whole
    weird = "[bold]x[red].txt"
    (tmp_path / weird).write_text("Some text to score. " * 20, encoding="utf-8")
    result = CliRunner().invoke(app, ["eval", "perplexity", weird, weird, "--model", model])
    assert result.exit_code == 0, result.output
    assert "[bold]x[red].txt" in result.stdout


def test_log_text_is_one_line_without_controls():
    from gpt2lab.console import log_text

    assert log_text("x\n gpt2lab: FAKE\x1b]0;PWNED\x07\t\u2028\x85") == \
        "x\\u000a gpt2lab: FAKE\\u001b]0;PWNED\\u0007\\u0009\\u2028\\u0085"
    assert log_text("a\\u000ab") == "a\\\\u000ab"  # a client's own escape stays told apart
    assert log_text("plain-id_1") == "plain-id_1"
    assert log_text("id\u202eevil\u2066") == "id\\u202eevil\\u2066"  # what reorders a shown line, as on a terminal
