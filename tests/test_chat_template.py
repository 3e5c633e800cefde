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
    ChatTemplateFault,
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
    # a template that breaks out of the sandbox is the template's fault (ChatTemplateFault), not the messages'
    for evil in ("{{ ''.__class__.__mro__ }}", "{{ messages.append(1) }}", "{{ cycler.__init__.__globals__ }}"):
        with pytest.raises(ChatTemplateFault, match="the sandbox forbids"):
            ChatTemplate(evil).render(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateFault, match="not valid Jinja"):
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
    # a template that refuses these messages (raise_exception) is the client's 400, never a 500 (it lays out a
    # plain conversation, so the server starts: one that cannot is refused at start, test_server_chat_templates)
    broken = tmp_path / "broken"
    shutil.copytree(saved["chatml"], broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{{ raise_exception('only three messages, please') if messages | length > 3 }}"
                               + CHATML)
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    server_helpers.launch_in_thread("chat-template-broken", broken, tmp_path)
    bad = server_helpers.get("chat-template-broken")
    r = httpx.post(f"{bad.url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and "only three messages, please" in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "messages"


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


# -- a checkpoint's template is untrusted code: bounded, and its faults told apart from the messages' ----------
EVIL_TEMPLATES = {
    "nested loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "loops over a long string": "{% set s = 'a' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "format width": "{{ '{:>999999999}'.format(1) }}",
    "printf width": "{{ '%999999999d' % 1 }}",
    "format filter width": "{{ '%999999999d' | format(1) }}",
    "lipsum": "{{ lipsum(10**6) }}",
    "range": "{% for i in range(10**9) %}{% endfor %}",
    "recursion": "{% macro f(x) %}{{ f(x) }}{% endmacro %}{{ f(1) }}",
    "recursive loop": "{% for x in [1] recursive %}{{ loop([1]) }}{% endfor %}",
    "doubling in a namespace": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                               "{% endfor %}",
    "doubling a list": "{% set ns = namespace(s=[1]) %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                       "{% endfor %}",
    "doubling by recursion": "{% macro f(s, n) %}{% if n %}{{ f(s ~ s, n - 1) }}{% endif %}{% endmacro %}"
                             "{{ f('x', 64) }}",
    "string repetition": "{{ 'x' * 10**10 }}",
    "list repetition": "{{ ([1] * 10**9) | length }}",
    "center": "{{ 'x' | center(10**10) }}",
    "str method width": "{{ 'x'.rjust(10**10) }}",
    "replace": "{% set s = 'a' * 100000 %}{{ s.replace('', s) }}",
    "replace filter": "{% set s = 'a' * 100000 %}{{ s | replace('a', s) }}",
    "translate": "{% set s = 'a' * 1000000 %}{{ s.translate({97: s}) }}",
    "join": "{% set s = 'a' * 1000000 %}{{ ([s] * 1000) | join }}",
    "big integer": "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
    "sum of lists": "{{ range(100000) | map('string') | map('list') | sum(start=[]) | length }}",
    "shared references": "{% set s = 'a' * 10000000 %}{% set l = [s, s, s, s, s, s, s, s] %}{{ [l, l, l, l] }}",
    "include": "{% include 'other.jinja' %}",
}


@pytest.mark.parametrize("name", list(EVIL_TEMPLATES))
def test_a_template_cannot_work_without_end(name):
    """Jinja's sandbox stops escapes, not work: every one of these ran for minutes, filled the memory or
    gave a traceback. Each is now a ChatTemplateFault naming the template, raised within the render's
    time bound (a bound of 1 s here: without it the nested loops would run for hours)."""
    from gpt2lab.generation.jinja_sandbox import RenderLimits

    template = ChatTemplate(EVIL_TEMPLATES[name], origin="the chat template of ckpt/tokenizer_config.json",
                            limits=RenderLimits(timeout_s=1.0))
    with pytest.raises(ChatTemplateFault, match=r"^the chat template of ckpt/tokenizer_config\.json: ") as info:
        template.render(CONVERSATIONS[0])
    assert not isinstance(info.value, ValueError)  # not the messages' fault: a server answers 500, not 400
    assert info.value.origin == "the chat template of ckpt/tokenizer_config.json"


def test_one_long_filter_is_stopped_at_the_deadline():
    """The hooks check the deadline between operations; one filter that is a long Python loop of its own
    (Jinja's wordwrap, urlize, batch over a large value ran 15-80 s past a 2 s bound) is one operation
    for them. The watchdog interrupts it: the loop here stops far short of its end, where without the
    watchdog it ran to the end and only the next hook noticed the time."""
    from gpt2lab.generation.jinja_sandbox import (
        BoundedSandbox,
        RenderLimitExceeded,
        RenderLimits,
        compile_source,
        render,
    )

    steps = [0]
    total = 10**9  # minutes of work

    def spin(value):
        for _ in range(total):
            steps[0] += 1
        return value

    env = BoundedSandbox()
    env.add_filter("spin", spin)
    template = compile_source(env, "{{ x | spin }}")
    with pytest.raises(RenderLimitExceeded, match="took more than 0.2 s"):
        render(template, {"x": "x"}, RenderLimits(timeout_s=0.2))
    assert 0 < steps[0] < total
    # a filter over a constant runs while compiling (Jinja folds constant expressions): bounded too. Jinja's
    # wordwrap over this literal takes seconds
    with pytest.raises(ChatTemplateFault, match="^the chat template: compiling it took more than 0.2 s"):
        ChatTemplate("{{ '" + "ab " * 330_000 + "' | wordwrap(1) }}", limits=RenderLimits(timeout_s=0.2))


def test_a_deadline_is_raised_only_inside_its_block():
    """The watchdog raises in the watched thread at most once, and never after the block is left."""
    import threading
    import time

    from gpt2lab.generation.interrupt import Interrupted, deadline

    with deadline(5):  # ends in time: nothing raised, then or later
        pass
    time.sleep(0.05)
    caught = []
    for _ in range(3):
        try:
            with deadline(0.05):
                while True:
                    pass
        except Interrupted:
            caught.append(True)
    assert caught == [True, True, True]
    errors: list[BaseException] = []

    def other_thread() -> None:  # a deadline per thread: the one that passes interrupts its own thread only
        try:
            with deadline(0.05):
                time.sleep(0.01)
                while True:
                    pass
        except Interrupted as exc:
            errors.append(exc)

    worker = threading.Thread(target=other_thread)
    with deadline(30):
        worker.start()
        worker.join(30)
    assert len(errors) == 1 and not worker.is_alive()


def test_bounds_leave_ordinary_templates_alone():
    from gpt2lab.generation.jinja_sandbox import RenderLimits

    ok = ChatTemplate("{% for i in range(1000) %}{{ '%5d' % i }}{{ '{:>3}'.format('x') }}{% endfor %}"
                      "{{ 'ab' * 3 }}{{ 2 ** 100 }}{{ [1, 2] + [3] }}{{ 'a\nb' | indent(4) }}"
                      "{{ lipsum(2) | length > 0 }}{{ messages | tojson(indent=2) | length > 0 }}{{ range(5) | sum }}",
                      limits=RenderLimits(timeout_s=30))
    text = ok.render(CONVERSATIONS[1])
    assert text.startswith("    0  x    1  x") and "ababab" in text and str(2 ** 100) in text and text.endswith("10")
    # a template may lay out a conversation larger than the fixed output bound (the bound grows with the input)
    big = "word " * 300_000
    assert len(ChatTemplate(CHATML, limits=RenderLimits(max_output_chars=1000)).render(
        [{"role": "user", "content": big}])) > len(big)


def test_template_faults_and_refusals_are_told_apart(tmp_path, saved):
    # the messages' fault: the template refuses them (raise_exception) or fails on their contents
    with pytest.raises(ChatTemplateError, match="only one, please"):
        ChatTemplate("{{ raise_exception('only one, please') }}").render(CONVERSATIONS[0])
    with pytest.raises(ChatTemplateError, match="failed on these messages: TypeError"):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render(CONVERSATIONS[0])
    # the template's fault, naming the file it came from: it does not compile, or cannot say where a reply ends
    folder = tmp_path / "broken"
    shutil.copytree(saved["chatml"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for source, problem in (("{% for %}", "not valid Jinja"),
                            ("{{ messages | length }}", "does not write the assistant's message content"),
                            ("{% for m in messages %}{{ m['content'] }}{% endfor %}", "writes nothing after")):
        config["chat_template"] = source
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        with pytest.raises(ChatTemplateFault, match=f"^the chat template of {folder / 'tokenizer_config.json'}: "
                                                    f"{problem}"):
            style_for_model(None, folder).chat_template.probe()
    (folder / "chat_template.jinja").write_bytes(b"\xff\xfe{{ x }}")
    with pytest.raises(ChatTemplateFault, match=r"chat_template\.jinja: cannot be read \(.*not valid UTF-8"):
        style_for_model(None, folder)


def test_probe_accepts_what_templates_may_refuse():
    from gpt2lab.generation.chat_template import probe_chat_template

    assert "Bot:" in probe_chat_template(DEFAULT_CHAT_TEMPLATE).probe()
    probe_chat_template(CHATML)
    probe_chat_template(DIALOGPT_CHAT_TEMPLATE)
    # Gemma-like: no system role; others want a system message first: both lawful
    no_system = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                 "{% endif %}" + CHATML)
    wants_system = ("{% if messages[0]['role'] != 'system' %}{{ raise_exception('start with a system message') }}"
                    "{% endif %}" + CHATML)
    assert probe_chat_template(no_system).stop == probe_chat_template(wants_system).stop == ["<|im_end|>"]
    with pytest.raises(ChatTemplateFault, match="cannot lay out a plain user/assistant conversation: nothing"):
        probe_chat_template("{{ raise_exception('nothing, ever') }}", origin="x")


def test_templates_see_what_transformers_passes(saved, tmp_path):
    """messages, tools, documents (None when not given), add_generation_prompt, the special tokens,
    raise_exception and strftime_now, as in transformers' apply_chat_template."""
    from transformers import AutoTokenizer

    folder = tmp_path / "vars"
    shutil.copytree(saved["chatml"], folder)
    source = ("{{ messages | length }}|{{ tools is none }}|{{ documents is none }}|{{ add_generation_prompt }}|"
              "{{ bos_token }}|{{ eos_token }}|{{ unk_token }}|{{ strftime_now('%Y') | length }}|"
              "{% for t in tools or [] %}{{ t['function']['name'] }};{% endfor %}"
              "{% for d in documents or [] %}{{ d['title'] }};{% endfor %}"
              "{{ namespace(a=1).a }}|{{ dict(a=2)['a'] }}")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = source + "|{{ pad_token }}|{{ sep_token is defined }}"
    config["pad_token"] = "<|endoftext|>"  # a fine-tune's usual pad = eos, which transformers passes too
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(folder)
    ours = style_for_model(None, folder).chat_template
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    documents = [{"title": "Doc A", "text": "x"}]
    for kwargs in ({}, {"tools": tools}, {"documents": documents}, {"tools": tools, "documents": documents}):
        for cue in (True, False):
            theirs = tok.apply_chat_template(CONVERSATIONS[1], tokenize=False, add_generation_prompt=cue, **kwargs)
            assert ours.render(CONVERSATIONS[1], add_generation_prompt=cue, **kwargs) == theirs, kwargs
    # a key set to None (OpenAI's content=None, tool_calls=None) is left out, as transformers leaves it out:
    # templates test `'tool_calls' in message` and would write "None"
    config["chat_template"] = ("{% for m in messages %}{{ m['role'] }}:{{ 'tool_calls' in m }}:"
                               "{{ m['content'] if 'content' in m else '-' }};{% endfor %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": None}]
    theirs = AutoTokenizer.from_pretrained(folder).apply_chat_template(messages, tokenize=False)
    assert style_for_model(None, folder).chat_template.render(messages) == theirs == "user:False:hi;assistant:False:-;"


def _work(source: str, content: str) -> int:
    """The copying work of rendering one user and one assistant message of ``content``."""
    from gpt2lab.generation.jinja_sandbox import render

    template = ChatTemplate(source)
    stats: dict[str, int] = {}
    render(template.template, {**template.variables, "messages": [{"role": "user", "content": content},
                                                                   {"role": "assistant", "content": content}],
                               "add_generation_prompt": True}, template.limits, stats=stats)
    return stats["built"] + stats["steps"]


@pytest.mark.parametrize("source", [DEFAULT_CHAT_TEMPLATE, DIALOGPT_CHAT_TEMPLATE])
def test_gpt2lab_templates_are_linear_in_a_message_s_lines(source):
    """A message's lines were gathered as `ns.lines + [line]`: work (and time) grew with the square of
    the line count, 7 s for a 65k-line message and 55 s of chat fine-tuning on a 200k-line one. The work
    of twice the lines is now twice the work (the square would be four times)."""
    small, large = ("\n".join(f"line {i}" for i in range(n)) for n in (2000, 4000))
    assert _work(source, large) < 2.2 * _work(source, small)


def test_cli_reports_a_template_fault_in_one_line(tmp_path, saved):
    """`chat` and `finetune --chat-template` met a recursing or range(10**9) template with a traceback."""
    folder = tmp_path / "looping"
    shutil.copytree(saved["chatml"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(10**9) %}{% endfor %}" + CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    result = CliRunner().invoke(app, ["chat", "--model", str(folder), "--message", "Hi", "--max-new-tokens", "2"])
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        f"gpt2lab: error: the chat template of {folder / 'tokenizer_config.json'}: range(1000000000) has "
        "1000000000 items, more than 100000"], result.output
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"messages": CONVERSATIONS[1][:3]}) + "\n")
    for source, problem in (("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "it calls itself too deeply"),
                            ("{% for %}", "not valid Jinja"),
                            ("\x00\x01binary", "cannot be read (")):
        template = tmp_path / "t.jinja"
        template.write_text(source)
        result = CliRunner().invoke(app, ["finetune", str(data), "--model", str(saved["chatml"]), "--out",
                                          str(tmp_path / "out"), "--chat-template", str(template), "--max-steps", "1",
                                          "--no-progress"])
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"gpt2lab: error: --chat-template {template}: {problem}"), lines
