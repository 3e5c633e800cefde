"""Chat templates: gpt2lab renders a conversation as transformers' ``apply_chat_template`` does (default
and custom templates, from a saved folder), a checkpoint's own template drives ``gpt2lab chat`` and
``/v1/chat/completions``, and replies stop at the template's end of turn."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest
from typer.testing import CliRunner

import gpt2lab
from gpt2lab.apps.chat import ChatSession
from gpt2lab.checkpoints.io import save_model
from gpt2lab.cli.main import app
from gpt2lab.generation.chat_format import ChatStyle, clean_reply, style_for_model
from gpt2lab.generation.chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    DIALOGPT_CHAT_TEMPLATE,
    ChatTemplate,
    ChatTemplateError,
    load_chat_template,
)
from gpt2lab.sampling import SamplingParams

from . import server_helpers
from .conftest import SHAPES, make_hf_checkpoint

# ChatML as the Qwen / SmolLM templates write it, with the assistant's part marked for training
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
          "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}"
          "{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "You are Zed.\n\nA pirate."}, {"role": "user", "content": "Hi  there\n\n  \nyo "},
     {"role": "assistant", "content": "Hello! How are you?"}, {"role": "user", "content": "Fine, and you?"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "ünïcode ✓ 😀"},
     {"role": "assistant", "content": " two\nlines "}, {"role": "user", "content": "again"},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "bye"}],
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_checkpoint):
    """The tiny model saved by gpt2lab with the default template and with ChatML."""
    gen = gpt2lab.load(tiny_checkpoint)
    root = tmp_path_factory.mktemp("templates")
    return {name: save_model(gen.model, root / name, tokenizer_dir=gen.tokenizer_dir, chat_template=source)
            for name, source in (("default", DEFAULT_CHAT_TEMPLATE), ("chatml", CHATML),
                                 ("dialogpt", DIALOGPT_CHAT_TEMPLATE))}


@pytest.mark.parametrize("name", ["default", "chatml", "dialogpt"])
def test_apply_chat_template_gives_the_same_text(saved, name):
    from transformers import AutoTokenizer

    folder = saved[name]
    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.model_max_length == SHAPES["tiny"]["n_positions"]
    style = style_for_model(None, folder)
    assert style.kind == "template" and style.template == load_chat_template(folder)
    for messages in CONVERSATIONS:
        for cue in (True, False):
            theirs = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=cue)
            assert style.chat_template.render(messages, add_generation_prompt=cue) == theirs
    # the assistant spans agree with transformers' assistant mask, token for token
    messages = CONVERSATIONS[2][:5]
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    from gpt2lab.training.chat_data import encode_conversation

    ids, mask, _, _ = encode_conversation(messages, style.chat_template, gpt2lab.load(folder).tokenizer.encode)
    assert ids == list(out["input_ids"]) and mask == list(out["assistant_masks"])


def test_default_template_is_the_transcript():
    template = ChatTemplate(DEFAULT_CHAT_TEMPLATE)
    assert template.render(CONVERSATIONS[1], add_generation_prompt=True) == (
        "You are Zed.\n\nA pirate.\n\nUser: Hi  there\nyo\nBot: Hello! How are you?\nUser: Fine, and you?\nBot:")
    assert template.render(CONVERSATIONS[0]).startswith("The following is a conversation between User and Bot.")
    named = ChatTemplate(DEFAULT_CHAT_TEMPLATE, {"user_name": "Ann", "bot_name": "Zed"})
    assert named.render(CONVERSATIONS[2][:3]) == "Ann: ünïcode ✓ 😀\nZed: two\nlines\n"
    assert template.end_of_turn == "\n" and template.stop == ["\n", "User:"]
    chatml = ChatTemplate(CHATML)
    assert chatml.end_of_turn == "<|im_end|>\n" and chatml.stop == ["<|im_end|>"]
    assert ChatTemplate(DIALOGPT_CHAT_TEMPLATE).stop == []  # <|endoftext|> is EOS: it stops by itself
    with pytest.raises(ChatTemplateError, match="knows the roles"):
        template.render([{"role": "tool", "content": "x"}])


def test_templates_run_sandboxed():
    for evil in ("{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}", "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(ChatTemplateError):
            ChatTemplate(evil).render(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        ChatTemplate("{% for %}")
    assert ChatTemplate("{{ raise_exception('no') if messages | length > 1 }}{{ messages | tojson }}").render(
        CONVERSATIONS[0]) == '[{"role": "user", "content": "Hi there"}]'


def test_checkpoint_template_wins_in_chat_and_server(tmp_path, saved):
    folder = tmp_path / "chatml"
    shutil.copytree(saved["chatml"], folder)
    gen = gpt2lab.load(folder)
    # "<|", "im", "_", "end", "|", ">" pushed up: a random model then writes the end of turn at once
    bias = {i: 100.0 for i in gen.tokenizer.encode("<|im_end|>")}
    session = ChatSession(gen, params=SamplingParams(max_new_tokens=12, temperature=1.0, seed=0, logit_bias=bias))
    assert session.style.kind == "template" and session.persona is None
    reply = session.reply("Hello")
    assert session.last_prompt.text == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert "<|im_end|>" not in reply and "<|im" not in reply
    assert session.last_prompt.stop == ["<|im_end|>"]
    assert clean_reply(" Aye.<|im_end|>\n<|im_start|>user\nmore", session.style) == "Aye."
    # chat --message and --persona (a system message) go through the same template
    result = CliRunner().invoke(app, ["chat", "--model", str(folder), "--message", "Hi", "--persona", "Be kind.",
                                      "--max-new-tokens", "4", "--seed", "1"])
    assert result.exit_code == 0, result.output
    # the server renders the client's messages with it: usage counts exactly the template's tokens
    server_helpers.launch_in_thread("chat-template", folder, tmp_path)
    server = server_helpers.get("chat-template")
    messages = CONVERSATIONS[1]
    body = {"messages": messages, "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    expected = ChatTemplate(CHATML).render(messages, add_generation_prompt=True)
    assert r.json()["usage"]["prompt_tokens"] == len(gen.tokenizer.encode(expected))
    # a template that raises is the client's 400, never a 500
    broken = tmp_path / "broken"
    shutil.copytree(saved["chatml"], broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ raise_exception('only one message, please') if messages | length > 1 }}x"
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    server_helpers.launch_in_thread("chat-template-broken", broken, tmp_path)
    bad = server_helpers.get("chat-template-broken")
    r = httpx.post(f"{bad.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "only one message, please" in r.json()["error"]["message"], r.text


def test_template_sources_and_precedence(tmp_path, tiny_checkpoint):
    folder = tmp_path / "m"
    shutil.copytree(tiny_checkpoint, folder)
    assert load_chat_template(folder) is None and style_for_model(None, folder).kind == "transcript"
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": CHATML}]}))
    assert load_chat_template(folder) == CHATML
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert load_chat_template(folder) == "{{ messages[0]['content'] }}"  # transformers prefers the file too
    # a save with a template replaces the file, so the two can never disagree
    out = save_model(gpt2lab.load(folder).model, tmp_path / "out", tokenizer_dir=folder, chat_template=CHATML)
    assert not (out / "chat_template.jinja").exists() and load_chat_template(out) == CHATML
    # a save without one keeps the source's
    kept = gpt2lab.load(folder).save(tmp_path / "kept")
    assert load_chat_template(kept) == "{{ messages[0]['content'] }}"
    assert ChatStyle().chat_template.source == DEFAULT_CHAT_TEMPLATE
    dialo = make_hf_checkpoint(tmp_path / "DialoGPT-x", **SHAPES["tiny"])
    assert style_for_model("DialoGPT-x", dialo).source == DIALOGPT_CHAT_TEMPLATE
