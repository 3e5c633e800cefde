"""Chat layout (shared with the server), /set parsing and the shared CLI generation options: no model needed."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from gpt2lab.apps.chat import parse_option
from gpt2lab.cli.options import build_sampling_params, sampling_options
from gpt2lab.generation.chat_format import (
    ChatStyle,
    Turn,
    build_prompt,
    clean_reply,
    from_messages,
    is_dialogpt,
    parse_transcript,
    render,
    style_for_model,
)
from gpt2lab.sampling import SamplingParams
from gpt2lab.tokenizer import Tokenizer

TOK = Tokenizer.gpt2()
TURNS = [Turn("user", "Hi there"), Turn("assistant", "Hello! How are you?"), Turn("user", "Fine, and you?")]


def test_transcript_layout_and_stop():
    style = ChatStyle()
    text = render("You are Zed.", TURNS, style)
    assert text == "You are Zed.\n\nUser: Hi there\nBot: Hello! How are you?\nUser: Fine, and you?\nBot:"
    assert style.stop == ["\n", "User:"]
    named = ChatStyle(user_name="Ann", bot_name="Zed")
    assert render("", TURNS[:1], named) == "Ann: Hi there\nZed:"
    assert "Zed" in named.default_persona() and "Ann" in named.default_persona()
    for bad in ("", "A:B", "two\nlines", " pad"):
        with pytest.raises(ValueError, match="name"):
            ChatStyle(bot_name=bad)
    with pytest.raises(ValueError, match="differ"):
        ChatStyle(user_name="X", bot_name="X")


def test_dialogpt_layout(tmp_path):
    style = ChatStyle(kind="dialogpt")
    expected = "Hi there<|endoftext|>Hello! How are you?<|endoftext|>Fine, and you?<|endoftext|>"
    assert render(None, TURNS, style) == expected
    assert style.stop == [] and style.default_persona() == ""
    ids = TOK.encode(render(None, TURNS, style))
    assert ids.count(TOK.eos_token_id) == 3  # the separator is the real EOS token, not its spelling
    assert is_dialogpt("microsoft/DialoGPT-small")
    dialogpt_config = {"task_specific_params": {"conversational": {"max_length": 1000}}}
    (tmp_path / "config.json").write_text(json.dumps(dialogpt_config))
    assert is_dialogpt("./my-bot", tmp_path) and style_for_model("./my-bot", tmp_path).dialogpt
    (tmp_path / "config.json").write_text(json.dumps({"n_layer": 2}))
    assert not is_dialogpt("gpt2", tmp_path) and not is_dialogpt("gpt2", tmp_path / "missing")
    assert clean_reply(" sure thing<|endoftext|>junk", style) == "sure thing"


def test_trimming_keeps_persona_and_newest_turns():
    style = ChatStyle()
    persona = "You are Zed, a pirate who loves the sea."
    turns = [Turn("user" if i % 2 == 0 else "assistant", f"message number {i} " + "word " * 8) for i in range(30)]
    full = len(TOK.encode(render(persona, turns, style)))
    for budget in (60, 100, 200):
        prompt = build_prompt(persona, turns, TOK, style, budget)
        assert prompt.n_tokens <= budget < full
        assert prompt.n_tokens == len(TOK.encode(prompt.text)) == len(prompt.token_ids)
        assert prompt.text.startswith(persona + "\n\nUser: message number")  # persona kept, a user turn first
        assert prompt.text.endswith("message number 29 " + "word " * 7 + "word\nBot:")
        assert prompt.turns_dropped > 0 and prompt.turns_dropped + prompt.turns_kept == 30
        # the longest history that fits: one more turn would not
        more = render(persona, turns[max(prompt.turns_dropped - 2, 0):], style)
        assert len(TOK.encode(more)) > budget
    assert build_prompt(persona, turns[:2], TOK, style, 1000).turns_dropped == 0
    with pytest.raises(ValueError, match="persona and the last message need"):
        build_prompt(persona, turns, TOK, style, 15)


def test_messages_and_transcript_roundtrip():
    persona, turns = from_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Hey"}, {"role": "user", "content": "Joke?"}])
    assert persona == "Be brief." and [t.role for t in turns] == ["user", "assistant", "user"]
    assert from_messages([{"role": "user", "content": "x"}])[0] is None
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        from_messages([{"role": "robot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[1\].content"):
        from_messages([{"role": "user", "content": "x"}, {"role": "user", "content": None}])
    style = ChatStyle(bot_name="Zed")
    multi = [*TURNS[:2], Turn("user", "line one\nline two")]
    text = render("Persona here.\nSecond line.", multi, style, cue=False)
    assert parse_transcript(text, style) == ("Persona here.\nSecond line.", multi)


def test_clean_reply_never_keeps_next_turn():
    style = ChatStyle()
    assert clean_reply(" Fine thanks.\nUser: and you?", style) == "Fine thanks."
    assert clean_reply(" ok\nBot: again", style) == "ok"
    assert clean_reply("  plain  ", style) == "plain"


def test_parse_option_types_and_errors():
    p = SamplingParams()
    assert parse_option(p, "temperature", "0.7").temperature == 0.7
    assert parse_option(p, "top-k", "40").top_k == 40
    assert parse_option(p, "seed", "none").seed is None
    assert parse_option(p, "ignore_eos", "true").ignore_eos is True
    assert parse_option(p, "stop", '["\\n", "."]').stop == ["\n", "."]
    assert parse_option(p, "stop", "END").stop == ["END"]
    assert parse_option(p, "logit_bias", '{"50256": -100}').logit_bias == {50256: -100.0}
    for name, value, message in [("top_p", "2", r"top_p must be in \(0, 1\]"), ("top_k", "x", "top_k must be an int"),
                                 ("temp", "1", "unknown option 'temp'"), ("max_length", "5", "max_new_tokens"),
                                 ("ignore_eos", "maybe", "true or false"), ("logit_bias", "[1]", "JSON")]:
        with pytest.raises(ValueError, match=message):
            parse_option(p, name, value)


def test_shared_cli_options():
    from gpt2lab.cli.options import SAMPLING_OPTIONS

    # every control; structured_outputs has its own flags (--json-schema/--regex/--choice/--grammar, cli/structured.py)
    controls = [name for name in SamplingParams.field_names() if name != "structured_outputs"]
    assert sorted(o.name for o in SAMPLING_OPTIONS) == sorted(controls)
    assert build_sampling_params({"top_k": None, "temperature": 0.5}, {"top_k": 50}).top_k == 50
    params = build_sampling_params({"max_length": 30, "logit_bias": ["5:-1.5"], "stop": []}, {"max_new_tokens": 60})
    assert params.max_length == 30 and params.max_new_tokens is None and params.logit_bias == {5: -1.5}
    with pytest.raises(ValueError, match="TOKEN_ID:BIAS"):
        build_sampling_params({"logit_bias": ["5"]})

    app = typer.Typer()
    seen: list[SamplingParams] = []

    @app.command()
    @sampling_options(defaults={"temperature": 0.8}, exclude={"n"})
    def cmd(word: str = typer.Argument(...), sampling: SamplingParams = None) -> None:
        """A command."""
        seen.append(sampling)

    runner = CliRunner()
    result = runner.invoke(app, ["hi", "--top-k", "3", "--stop", "a", "--stop", "b", "--ignore-eos", "--seed", "1",
                                 "--stop-token-id", "13"])
    assert result.exit_code == 0, result.output
    assert seen[-1].stop_token_ids == [13]
    assert (seen[-1].top_k, seen[-1].stop, seen[-1].ignore_eos, seen[-1].temperature) == (3, ["a", "b"], True, 0.8)
    result = runner.invoke(app, ["hi", "--top-p", "3"])
    assert result.exit_code == 2 and "top_p must be in (0, 1], got 3.0" in result.output
    assert runner.invoke(app, ["hi", "--n", "2"]).exit_code == 2  # excluded option
    assert "(default: 0.8)" in runner.invoke(app, ["--help"]).output
