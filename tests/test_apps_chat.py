"""Chatbot: the reply stops before the next user turn, long conversations keep the persona, and the
REPL is driven in a real terminal (pexpect) through every slash command."""

from __future__ import annotations

import os
import re
import shutil
import sys

import pytest
from typer.testing import CliRunner

import gpt2lab
from gpt2lab.apps.chat import ChatSession
from gpt2lab.cli.main import app
from gpt2lab.sampling import SamplingParams

from .conftest import tiny_model

WINDOW = 64
PERSONA = "You are Captain Zed, a cheerful pirate."
# "User", ":" and "\n" pushed to the top: left alone the model would write "\nUser:" within a few tokens
USER_TURN_BIAS = {12982: 100.0, 25: 100.0, 198: 100.0}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    return tiny_model(tmp_path_factory, "chat-model", seed=3, n_positions=WINDOW)


def test_reply_stops_before_next_user_turn(chat_model):
    _, gen = chat_model
    params = SamplingParams(temperature=1.0, max_new_tokens=12, logit_bias=USER_TURN_BIAS, seed=0)
    session = ChatSession(gen, persona=PERSONA, params=params)
    unstopped = 0
    for i in range(4):
        streamed: list[str] = []
        reply = session.reply(f"hello number {i}", on_text=streamed.append)
        assert "User:" not in reply and "User:" not in "".join(streamed)
        raw = gen.generate(session.last_prompt.text, params.with_(seed=params.seed + 1000 + i, max_new_tokens=20,
                                                                  truncate_prompt=True))
        unstopped += "User:" in raw[0].text
    assert unstopped >= 2  # without the stop sequence the model does write the next user turn
    assert [t.role for t in session.turns] == ["user", "assistant"] * 4


def test_long_conversation_keeps_persona(chat_model):
    _, gen = chat_model
    session = ChatSession(gen, persona=PERSONA, params=SamplingParams(temperature=0.7, top_k=40, max_new_tokens=10,
                                                                      seed=5))
    for i in range(8):
        reply = session.reply(f"Tell me about island number {i} and its hidden treasure.")
        assert isinstance(reply, str)
        prompt = session.last_prompt
        assert prompt.text.startswith(PERSONA + "\n\nUser: ")
        assert prompt.n_tokens + 10 <= WINDOW
        assert prompt.text.endswith(f"island number {i} and its hidden treasure.\nBot:")
    assert session.last_prompt.turns_dropped > 0
    assert len(session.turns) == 16  # the history is kept whole; only the prompt is trimmed
    # seeded conversations are reproducible
    again = ChatSession(gen, persona=PERSONA, params=session.params)
    for i in range(3):
        again.reply(f"Tell me about island number {i} and its hidden treasure.")
    assert again.turns == session.turns[:6]


def test_dialogpt_layout_session(chat_model, tmp_path):
    path, _ = chat_model
    dialo = tmp_path / "DialoGPT-tiny"
    shutil.copytree(path, dialo)
    gen = gpt2lab.load(dialo)
    session = ChatSession(gen, params=SamplingParams(max_new_tokens=6, seed=1))
    assert session.style.dialogpt and session.persona == ""
    session.reply("Hi")
    session.reply("How are you?")
    assert session.last_prompt.text.startswith("Hi<|endoftext|>")
    assert session.last_prompt.text.endswith("<|endoftext|>How are you?<|endoftext|>")


def test_message_mode_with_transcript(chat_model, tmp_path):
    path, _ = chat_model
    runner = CliRunner()
    transcript = tmp_path / "talk.txt"
    transcript.write_text(f"{PERSONA}\n\nUser: Ahoy!\nBot: Ahoy, matey!\n", encoding="utf-8")
    args = ["chat", "--model", str(path), "--transcript", str(transcript), "--save", str(transcript),
            "--max-new-tokens", "8", "--seed", "3"]
    result = runner.invoke(app, [*args, "--message", "Where is the gold?"])
    assert result.exit_code == 0, result.output
    reply = result.stdout.strip()
    assert "User:" not in reply
    saved = transcript.read_text(encoding="utf-8")
    assert saved.startswith(f"{PERSONA}\n\nUser: Ahoy!\nBot: Ahoy, matey!\nUser: Where is the gold?\nBot:")
    assert saved.rstrip("\n").endswith(reply)
    # the next call continues the longer conversation
    result = runner.invoke(app, [*args, "--message", "And the map?"])
    assert result.exit_code == 0 and transcript.read_text(encoding="utf-8").count("\nUser: ") == 3
    for bad, message in [(["--message", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
                         (["--message", "hi", "--transcript", str(tmp_path / "none.txt")], "none.txt"),
                         (["--message", "hi", "--bot-name", "A:B"], "bot name"),
                         (["--message", "hi", "--max-new-tokens", str(WINDOW)], "no room")]:
        result = runner.invoke(app, ["chat", "--model", str(path), *bad])
        assert result.exit_code == 2 and message in result.output, (bad, result.output)
        assert "Traceback" not in result.output


def test_a_reply_that_fails_is_one_error_line_and_the_repl_goes_on(chat_model, monkeypatch, capsys):
    """A reply the engine ends with an error (here NaN scores): --message exits 2 in one line and the REPL
    prints the error and reads the next line; both ended in a GenerationFailed traceback."""
    import builtins

    import torch

    from gpt2lab.cli.chat import _repl

    path, _ = chat_model
    gen = gpt2lab.load(path)
    with torch.no_grad():
        gen.model.ln_f.weight[:] = float("nan")
    monkeypatch.setattr("gpt2lab.cli.chat.load_generator", lambda *args, **kwargs: gen)
    result = CliRunner().invoke(app, ["chat", "--model", str(path), "--message", "hi", "--max-new-tokens", "8"])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("gpt2lab: error: generation failed") and "scores are NaN" in last, result.output
    lines = iter(["hello", "again"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))  # then EOF: StopIteration
    with pytest.raises(StopIteration):
        _repl(ChatSession(gen, persona=PERSONA, params=SamplingParams(max_new_tokens=8, seed=1)), "User> ", None)
    assert capsys.readouterr().out.count("error: generation failed: ValueError: the model's scores are NaN") == 2


@pytest.mark.slow
def test_repl_in_a_terminal(chat_model, tmp_path):
    pexpect = pytest.importorskip("pexpect")
    path, _ = chat_model
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TERM": "dumb", "COLUMNS": "200"}
    child = pexpect.spawn(sys.executable, ["-m", "gpt2lab", "chat", "--model", str(path), "--persona", PERSONA,
                                           "--max-new-tokens", "8", "--seed", "1"],
                          env=env, encoding="utf-8", timeout=180, dimensions=(50, 200), cwd=str(tmp_path))
    prompt = "User> "

    def say(line: str) -> str:
        child.sendline(line)
        child.expect_exact(line + "\r\n")  # the terminal echoes what we typed
        child.expect_exact(prompt)
        return child.before.replace("\r\n", "\n")

    child.expect_exact("/help lists the commands")
    child.expect_exact(prompt)
    assert "commands:" in say("/help") and "/save FILE" in child.before
    replies = []
    for i in range(7):  # far more than the 64-token window holds
        out = say(f"Tell me the story of the ship number {i} please.")
        assert out.startswith("Bot: "), out
        replies.append(out[len("Bot: "):].strip())
    assert all("User:" not in r for r in replies)
    assert "(temperature = 0.5)" in say("/set temperature 0.5")
    assert "error: top_p must be in (0, 1], got 7.0" in say("/set top_p 7")
    assert "error: unknown option 'colour'" in say("/set colour blue")
    listing = say("/set")
    assert "temperature = 0.5" in listing and "max_new_tokens = 8" in listing
    assert say("Still there?").startswith("Bot: ")
    assert "(saved 16 turns to talk.txt)" in say("/save talk.txt")
    saved = (tmp_path / "talk.txt").read_text(encoding="utf-8")
    assert saved.startswith(PERSONA + "\n\nUser: Tell me the story of the ship number 0 please.\nBot:")
    assert saved.count("\nUser: ") == 8 and "User: Still there?\nBot:" in saved
    assert "(conversation cleared)" in say("/reset")
    assert say("Who are you?").startswith("Bot: ")
    say("/save after.txt")
    after = (tmp_path / "after.txt").read_text(encoding="utf-8")
    assert after.startswith(PERSONA + "\n\nUser: Who are you?\nBot:") and after.count("User:") == 1
    assert "unknown command /dance" in say("/dance")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert re.search(r"Bot: ", after)
