"""Chat templates: how a list of messages becomes the text a model sees, as Jinja (transformers' convention).

A checkpoint may carry its own template, as transformers stores it: ``chat_template.jinja`` next to the
weights, or the ``chat_template`` key of ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}`` of which ``default`` is used). It is rendered the way transformers'
``apply_chat_template`` renders it -- a sandboxed, immutable Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML, the tokenizer's special tokens (``eos_token``, ...) as variables and
``add_generation_prompt`` -- so both give the same text for the same messages.

Models without a template get :data:`DEFAULT_CHAT_TEMPLATE`, gpt2lab's transcript layout (a persona
paragraph, then ``User: ...`` / ``Bot: ...`` lines, the generation prompt ``Bot:``), or
:data:`DIALOGPT_CHAT_TEMPLATE` for DialoGPT models (turns separated by ``<|endoftext|>``, the template
transformers' GPT-2 tokenizer used to default to).

A template may wrap what the assistant writes in ``{% generation %} ... {% endgeneration %}`` (as
transformers' ``return_assistant_tokens_mask`` expects); :meth:`ChatTemplate.render_with_spans` then
reports those character spans, which is what chat fine-tuning trains on. Templates without the markers
are handled by rendering the conversation's prefixes (see :meth:`ChatTemplate.assistant_spans`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

from ..readers import read_json
from ..tokenizer import EOS_TOKEN

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' separate file (preferred over the config key)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MAX_TEMPLATE_CHARS = 1 << 20  # a template is code read from a checkpoint: bounded like any other input

# a message's text as one paragraph: trimmed, blank lines inside it dropped (lines kept)
_ONE_LINE = (
    "{%- macro one_line(text) -%}\n"
    "{%- set ns = namespace(lines=[]) -%}\n"
    "{%- for line in (text | trim).split('\\n') if line | trim -%}{%- set ns.lines = ns.lines + [line] -%}"
    "{%- endfor -%}\n"
    "{{- ns.lines | join('\\n') -}}\n"
    "{%- endmacro -%}\n"
)

# gpt2lab's transcript. Lines inside a message are kept, blank lines between them are dropped (a blank
# line would look like a new section of the transcript); system messages, wherever they are, make the
# persona paragraph (a system message with empty content means "no persona"); without one the default
# persona introduces the two speakers. ``user_name`` / ``bot_name`` may be passed as variables.
DEFAULT_CHAT_TEMPLATE = (
    "{%- set user = user_name | default('User') -%}\n"
    "{%- set bot = bot_name | default('Bot') -%}\n"
    + _ONE_LINE +
    "{%- set sys = namespace(found=false, parts=[]) -%}\n"
    "{%- for message in messages if message['role'] == 'system' -%}\n"
    "{%- set sys.found = true -%}\n"
    "{%- if message['content'] | trim -%}{%- set sys.parts = sys.parts + [message['content'] | trim] -%}"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if sys.found -%}{%- set persona = sys.parts | join('\\n') -%}\n"
    "{%- else -%}{%- set persona = 'The following is a conversation between ' ~ user ~ ' and ' ~ bot ~ '. ' ~ bot"
    " ~ ' is a friendly, curious and helpful assistant who answers in a sentence or two.' -%}\n"
    "{%- endif -%}\n"
    "{%- if persona -%}{{- persona ~ '\\n\\n' -}}{%- endif -%}\n"
    "{%- for message in messages if message['role'] != 'system' -%}\n"
    "{%- if message['role'] == 'user' -%}{{- user ~ ': ' ~ one_line(message['content']) ~ '\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}{{- bot ~ ':' -}}\n"
    "{%- generation -%}{{- ' ' ~ one_line(message['content']) ~ '\\n' -}}{%- endgeneration -%}\n"
    "{%- else -%}{{- raise_exception('the default chat template knows the roles system, user and assistant, "
    "not ' ~ message['role']) -}}\n"
    "{%- endif -%}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- bot ~ ':' -}}{%- endif -%}"
)

# DialoGPT: every turn followed by <|endoftext|> (an empty system message writes nothing).
DIALOGPT_CHAT_TEMPLATE = (
    _ONE_LINE +
    "{%- for message in messages if message['role'] != 'system' or message['content'] | trim -%}\n"
    "{%- if message['role'] == 'assistant' -%}\n"
    "{%- generation -%}{{- one_line(message['content']) ~ eos_token -}}{%- endgeneration -%}\n"
    "{%- else -%}{{- one_line(message['content']) ~ eos_token -}}{%- endif -%}\n"
    "{%- endfor -%}"
)

_PROBE = ("\ue000probe user\ue000", "\ue001probe assistant\ue001", "\ue002probe next\ue002")


class ChatTemplateError(ValueError):
    """A template that does not compile, raises while rendering, or cannot say where turns end."""


# -- the Jinja environment -----------------------------------------------------------------------------
_tracking: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("gpt2lab_generation_spans",
                                                                                     default=None)


@lru_cache(maxsize=32)
def compile_template(source: str):
    """The compiled Jinja template for ``source`` (cached); :class:`ChatTemplateError` if it is invalid."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body, and records where it landed in the
        output while a render with spans is running (the output so far is the list of chunks yielded)."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            text = caller()
            state = _tracking.get()
            if state is not None:
                chunks, spans = state
                start = sum(len(c) for c in chunks)
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {exc}") from None


# -- reading a checkpoint's template -------------------------------------------------------------------
def load_chat_template(directory: str | Path | None) -> str | None:
    """A checkpoint folder's own chat template: ``chat_template.jinja``, else ``tokenizer_config.json``'s
    ``chat_template`` (a string, or the entry named ``default`` of a list); None when it has none."""
    if directory is None:
        return None
    directory = Path(directory)
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return _bounded(jinja_file.read_text(encoding="utf-8"), jinja_file)
    config = directory / TOKENIZER_CONFIG_FILE
    if not config.is_file():
        return None
    try:
        value = read_json(config, expect=dict).get("chat_template")
    except ValueError:
        return None  # an unreadable tokenizer_config.json is the tokenizer loader's to report
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        value = named.get("default")
    return _bounded(value, config) if isinstance(value, str) and value.strip() else None


def _bounded(source: str, path: Path) -> str:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"{path}: the chat template has {len(source)} characters, more than "
                                f"{MAX_TEMPLATE_CHARS}")
    return source


# -- rendering -----------------------------------------------------------------------------------------
def _plain(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in dict(m).items()} for m in messages]


class ChatTemplate:
    """A compiled chat template with the variables it is rendered with.

    ``variables``: extra template variables (transformers passes the tokenizer's special tokens and the
    keyword arguments of ``apply_chat_template``); ``eos_token``/``bos_token``/``unk_token`` default to
    GPT-2's ``<|endoftext|>``.
    """

    def __init__(self, source: str, variables: Mapping[str, Any] | None = None) -> None:
        self.source = source
        self.template = compile_template(source)
        self.variables = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                          **(variables or {})}

    @property
    def has_generation_blocks(self) -> bool:
        import re

        return re.search(r"\{%-?\s*generation\s*-?%\}", self.source) is not None

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False) -> str:
        """The text of ``messages`` (dicts with ``role`` and ``content``), with the assistant's cue when
        ``add_generation_prompt``. :class:`ChatTemplateError` when the template raises."""
        return self._render(messages, add_generation_prompt, None)

    def render_with_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The text and the ``[start, end)`` character spans of its ``{% generation %}`` blocks."""
        spans: list[tuple[int, int]] = []
        return self._render(messages, False, spans), spans

    def _render(self, messages, add_generation_prompt: bool, spans: list[tuple[int, int]] | None) -> str:
        import jinja2

        context = {**self.variables, "messages": _plain(messages), "add_generation_prompt": add_generation_prompt}
        chunks: list[str] = []
        token = _tracking.set((chunks, spans) if spans is not None else None)
        try:
            for chunk in self.template.generate(**context):
                chunks.append(chunk)
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from None
        except (TypeError, AttributeError, KeyError, IndexError, ValueError) as exc:
            raise ChatTemplateError(f"chat template failed on these messages: {type(exc).__name__}: {exc}") from None
        finally:
            _tracking.reset(token)
        return "".join(chunks)

    def assistant_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character span of each assistant message's turn: what the
        model writes after the generation prompt, its end-of-turn marker included.

        From ``{% generation %}`` blocks when the template has them (one per assistant message), else from
        prefixes: the turn of message ``i`` is what ``render(messages[:i + 1])`` adds to
        ``render(messages[:i], add_generation_prompt=True)``, and that prefix must start the full text
        (``ChatTemplateError`` otherwise: such a template cannot be trained on turn by turn).
        """
        n_assistant = sum(1 for m in messages if m.get("role") == "assistant")
        if self.has_generation_blocks:
            text, spans = self.render_with_spans(messages)
            if len(spans) != n_assistant:
                raise ChatTemplateError(f"the chat template marked {len(spans)} {{% generation %}} block(s) for "
                                        f"{n_assistant} assistant message(s)")
            return text, spans
        text = self.render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True)
            upto = self.render(messages[:i + 1]) if i + 1 < len(messages) else text
            if not upto.startswith(before) or not text.startswith(upto):
                raise ChatTemplateError(
                    f"the chat template renders message {i} differently depending on what follows it, so its "
                    "assistant turns cannot be found; mark them with {% generation %} ... {% endgeneration %}")
            spans.append((len(before), len(upto)))
        return text, spans

    @cached_property
    def end_of_turn(self) -> str:
        """What the template writes after an assistant message's content (``"\\n"`` for the transcript,
        ``"<|im_end|>\\n"`` for ChatML, ``"<|endoftext|>"`` for DialoGPT)."""
        user, reply, _ = _PROBE
        text = self.render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
        at = text.rfind(reply)
        if at < 0:
            raise ChatTemplateError("the chat template does not write the assistant's message content")
        return text[at + len(reply):]

    @cached_property
    def stop(self) -> list[str]:
        """Stop strings that end the assistant's reply: the end-of-turn marker (stripped of whitespace
        when it has more, ``<|im_end|>``); a whitespace-only marker (the transcript's newline) is kept
        as it is, with the next user turn's label (``User:``) for a model that writes it on the same
        line. ``<|endoftext|>`` is left out: it is the EOS token, which stops generation by itself.

        The marker is what a chat fine-tune teaches the model to write last (its loss stops there), so
        stopping anywhere later would leave the reply to whatever the model makes up after it."""
        user, reply, following = _PROBE
        eot = self.end_of_turn
        marker = eot.strip()
        if marker:
            return [] if marker == EOS_TOKEN else [marker]
        if not eot:
            raise ChatTemplateError("the chat template writes nothing after the assistant's message, so a reply "
                                    "has no end to stop at")
        two = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        base = self.render(two)
        longer = self.render([*two, {"role": "user", "content": following}])
        stops = [eot]
        if longer.startswith(base) and following in longer:
            label = longer[len(base):longer.index(following)].strip()
            if label:
                stops.append(label)
        return stops
