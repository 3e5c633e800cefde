"""Chat templates: how a list of messages becomes the text a model sees, as Jinja (transformers' convention).

A checkpoint may carry its own template, as transformers stores it: ``chat_template.jinja`` next to the
weights, or the ``chat_template`` key of ``tokenizer_config.json`` (a string, or a list of
``{"name", "template"}`` of which ``default`` is used). It is rendered the way transformers'
``apply_chat_template`` renders it -- a sandboxed, immutable Jinja environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML, the tokenizer's special tokens (``eos_token``, ...), ``messages``,
``tools``, ``documents`` and ``add_generation_prompt`` as variables -- so both give the same text for
the same messages.

A checkpoint's template is code from somewhere else, so it renders in a *bounded* sandbox
(:mod:`gpt2lab.generation.jinja_sandbox`): every render, wherever it runs (``gpt2lab chat``, the
server, chat fine-tuning), stops within its time bound and cannot build more than its size bound. Two
errors tell whose fault a failed render is: :class:`ChatTemplateError` (a ``ValueError``) when the
template refuses the messages (``raise_exception``, or failing on a content it did not expect: the
messages' fault, a 400 from a server), :class:`ChatTemplateFault` (a ``CheckpointError``) when the
template is broken -- it does not compile, breaks the sandbox, crosses a bound, or cannot lay out a plain
conversation -- naming the template: a server's fault, a 500. :meth:`ChatTemplate.probe` checks a
template on a plain conversation, as a server does at start-up.

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
import re
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointError
from ..readers import read_json, read_text
from ..tokenizer import EOS_TOKEN

if TYPE_CHECKING:
    from .jinja_sandbox import RenderLimits

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' separate file (preferred over the config key)
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
MAX_TEMPLATE_CHARS = 1 << 20  # a template is code read from a checkpoint: bounded like any other input
DEFAULT_ORIGIN = "the chat template"

# a message's text as one paragraph: trimmed, blank lines inside it dropped (lines kept). Each kept line is
# written out with a newline, and the caller trims the last one off (the first and last lines carry no
# outer whitespace of their own after the first trim): linear, where a list grown by `ns.lines + [line]`
# cost the square of the line count (7 s for a 65k-line message)
_ONE_LINE = (
    "{%- macro one_line(text) -%}\n"
    "{%- for line in (text | trim).split('\\n') if line | trim -%}{{- line -}}{{- '\\n' -}}{%- endfor -%}\n"
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
    "{%- set system = messages | selectattr('role', 'equalto', 'system') | list -%}\n"
    "{%- if system -%}{%- set persona = system | map(attribute='content') | map('trim') | select | join('\\n') -%}\n"
    "{%- else -%}{%- set persona = 'The following is a conversation between ' ~ user ~ ' and ' ~ bot ~ '. ' ~ bot"
    " ~ ' is a friendly, curious and helpful assistant who answers in a sentence or two.' -%}\n"
    "{%- endif -%}\n"
    "{%- if persona -%}{{- persona ~ '\\n\\n' -}}{%- endif -%}\n"
    "{%- for message in messages if message['role'] != 'system' -%}\n"
    "{%- if message['role'] == 'user' -%}{{- user ~ ': ' ~ one_line(message['content']) | trim ~ '\\n' -}}\n"
    "{%- elif message['role'] == 'assistant' -%}{{- bot ~ ':' -}}\n"
    "{%- generation -%}{{- ' ' ~ one_line(message['content']) | trim ~ '\\n' -}}{%- endgeneration -%}\n"
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
    "{%- generation -%}{{- one_line(message['content']) | trim ~ eos_token -}}{%- endgeneration -%}\n"
    "{%- else -%}{{- one_line(message['content']) | trim ~ eos_token -}}{%- endif -%}\n"
    "{%- endfor -%}"
)

_PROBE = ("\ue000probe user\ue000", "\ue001probe assistant\ue001", "\ue002probe next\ue002")
_PROBE_SYSTEM = "\ue003probe system\ue003"


class ChatTemplateError(ValueError):
    """The template refused these messages: it called ``raise_exception`` (a role it does not know, turns
    out of order ...) or failed on them (a ``TypeError`` on a content it did not expect). The messages'
    fault: the server answers 400."""


class ChatTemplateFault(CheckpointError):
    """The template itself is broken: it does not compile, does what the sandbox forbids, crosses its
    render bounds (time, size, ``range``, recursion) or cannot lay out a plain conversation. Whoever
    supplied the template (a checkpoint, ``--chat-template``) is at fault, not the messages: the message
    names the template (``origin``), and the server answers with a 500-class error."""

    def __init__(self, origin: str, problem: str) -> None:
        super().__init__(f"{origin}: {problem}")
        self.origin, self.problem = origin, problem


# -- the Jinja environment -----------------------------------------------------------------------------
class _TemplateSyntax(Exception):
    """A template source that does not compile (cached compiles raise this; callers add the origin)."""


class _Refusal(Exception):
    """What ``raise_exception`` raises: the template refusing the messages."""


_spans: ContextVar[list[tuple[int, int]] | None] = ContextVar("gpt2lab_generation_spans", default=None)


@lru_cache(maxsize=32)
def _compiled(source: str, limits: RenderLimits | None = None):
    import jinja2
    import jinja2.ext

    from .jinja_sandbox import BoundedSandbox, RenderLimitExceeded, compile_source, written

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}``: renders its body, and records where it landed in the
        output while a render with spans is running."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

        def _mark(self, caller) -> str:
            text = caller()
            spans = _spans.get()
            if spans is not None:
                start = written()  # the output so far: the chunks the render loop has taken
                spans.append((start, start + len(text)))
            return text

    def raise_exception(message: str):
        raise _Refusal(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # transformers' environment: trim_blocks, lstrip_blocks, loopcontrols, its tojson, raise_exception,
    # strftime_now (and dict / namespace without ways out, which BoundedSandbox has too)
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlocks, jinja2.ext.loopcontrols])
    env.add_filter("tojson", tojson)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return compile_source(env, source, limits)
    except jinja2.TemplateError as exc:
        raise _TemplateSyntax(f"not valid Jinja: {exc}") from None
    except RecursionError:  # nesting deeper than Python's parser stack
        raise _TemplateSyntax("not valid Jinja: nested too deeply to compile") from None
    except RenderLimitExceeded as exc:  # folding its constant expressions (Jinja does it while compiling)
        raise _TemplateSyntax(str(exc)) from None


def compile_template(source: str, origin: str = DEFAULT_ORIGIN, limits: RenderLimits | None = None):
    """The compiled Jinja template for ``source`` (cached; a :class:`~.jinja_sandbox.BoundedSandbox`
    template), compiled within ``limits`` (Jinja computes constant expressions while compiling);
    :class:`ChatTemplateFault` naming ``origin`` if it is not valid Jinja or crosses the limits."""
    try:
        return _compiled(source, limits)
    except _TemplateSyntax as exc:
        raise ChatTemplateFault(origin, str(exc)) from None


# -- reading a checkpoint's template -------------------------------------------------------------------
def find_chat_template(directory: str | Path | None) -> tuple[str, str] | None:
    """A checkpoint folder's own chat template and where it comes from (``"the chat template of PATH"``):
    ``chat_template.jinja``, else ``tokenizer_config.json``'s ``chat_template`` (a string, or the entry
    named ``default`` of a list); None when it has none. :class:`ChatTemplateFault` for a template file
    that cannot be read (not UTF-8 text, binary) or is longer than ``MAX_TEMPLATE_CHARS``."""
    if directory is None:
        return None
    directory = Path(directory)
    jinja_file = directory / CHAT_TEMPLATE_FILE
    if jinja_file.is_file():
        return read_template_file(jinja_file), _origin(jinja_file)
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
    return (_bounded(value, config), _origin(config)) if isinstance(value, str) and value.strip() else None


def read_template_file(path: str | Path, origin: str | None = None) -> str:
    """The source of a Jinja template file (``chat_template.jinja``, ``finetune --chat-template``), read
    as the untrusted input it is: :class:`ChatTemplateFault` naming ``origin`` (default: ``"the chat
    template of PATH"``) when it cannot be read (missing, not UTF-8 text, binary) or holds more than
    ``MAX_TEMPLATE_CHARS`` characters."""
    path = Path(path)
    origin = origin or _origin(path)
    try:
        size = path.stat().st_size
        if size > 4 * MAX_TEMPLATE_CHARS:  # more bytes than the most characters can take
            raise ChatTemplateFault(origin, f"{size} bytes, more than {MAX_TEMPLATE_CHARS} characters can take")
        source = read_text(path)
    except (OSError, ValueError) as exc:  # the reader's error says where: not UTF-8, binary ...
        raise ChatTemplateFault(origin, f"cannot be read ({exc})") from None
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateFault(origin, f"{len(source)} characters, more than {MAX_TEMPLATE_CHARS}")
    return source


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def special_tokens(directory: str | Path | None) -> dict[str, Any]:
    """The special tokens ``tokenizer_config.json`` sets (``eos_token``, ``pad_token``, ...), as strings:
    what transformers' ``apply_chat_template`` passes a template besides its arguments (its
    ``special_tokens_map``; a token may be written as ``{"content": ...}``). Empty when there is no
    readable config (GPT-2's ``<|endoftext|>`` defaults then apply)."""
    config = Path(directory) / TOKENIZER_CONFIG_FILE if directory is not None else None
    try:
        raw = read_json(config, expect=dict) if config is not None and config.is_file() else {}
    except ValueError:
        return {}  # an unreadable tokenizer_config.json is the tokenizer loader's to report

    def text(token: Any) -> str | None:
        token = token.get("content") if isinstance(token, dict) else token
        return token if isinstance(token, str) else None

    return {key: text(raw[key]) for key in SPECIAL_TOKENS if text(raw.get(key)) is not None}


def load_chat_template(directory: str | Path | None) -> str | None:
    """A checkpoint folder's own chat template source (see :func:`find_chat_template`), or None."""
    found = find_chat_template(directory)
    return None if found is None else found[0]


def _origin(path: Path) -> str:
    return f"the chat template of {path}"


def _bounded(source: str, path: Path) -> str:
    if len(source) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateFault(_origin(path), f"{len(source)} characters, more than {MAX_TEMPLATE_CHARS}")
    return source


# -- rendering -----------------------------------------------------------------------------------------
def _plain(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The messages as plain dicts, without the keys whose value is None (OpenAI clients send
    ``content=None``, ``tool_calls=None``): transformers drops them too, as templates test whether a key
    is present and would write ``None``."""
    return [{str(k): v for k, v in dict(m).items() if v is not None} for m in messages]


class ChatTemplate:
    """A compiled chat template with the variables it is rendered with, rendered within bounds.

    ``variables``: extra template variables (transformers passes the tokenizer's special tokens and the
    keyword arguments of ``apply_chat_template``); ``eos_token``/``bos_token``/``unk_token`` default to
    GPT-2's ``<|endoftext|>``. ``origin`` names the template in errors (``"the chat template of
    ckpt/tokenizer_config.json"``). ``limits``: the bounds of each render
    (:class:`~gpt2lab.generation.jinja_sandbox.RenderLimits`: 10 s, 1 Mi characters beyond 8 times the
    input, ``range`` up to 100,000). Raises :class:`ChatTemplateFault` when ``source`` does not compile.

    Every render runs in the same bounded sandbox, wherever it is called from (``gpt2lab chat``, the
    server, chat fine-tuning): it returns within its time bound, raising :class:`ChatTemplateFault` when
    the template crosses a bound, and :class:`ChatTemplateError` when the template refuses the messages.
    """

    def __init__(self, source: str, variables: Mapping[str, Any] | None = None, *, origin: str = DEFAULT_ORIGIN,
                 limits: RenderLimits | None = None) -> None:
        from .jinja_sandbox import RenderLimits

        self.source, self.origin = source, origin
        self.limits = limits or RenderLimits()
        self.template = compile_template(source, origin, limits)
        self.variables = {"bos_token": EOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN,
                          **(variables or {})}

    @property
    def has_generation_blocks(self) -> bool:
        return re.search(r"\{%-?\s*generation\s*-?%\}", self.source) is not None

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
               tools: Sequence[Mapping[str, Any]] | None = None,
               documents: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The text of ``messages`` (dicts with ``role`` and ``content``), with the assistant's cue when
        ``add_generation_prompt``. ``tools`` (JSON schemas) and ``documents`` are passed to the template as
        transformers' ``apply_chat_template`` passes them (``None`` when not given).

        Raises :class:`ChatTemplateError` when the template refuses the messages, :class:`ChatTemplateFault`
        when the template is at fault (a sandbox violation, or a render bound crossed)."""
        return self._render(messages, add_generation_prompt, None, tools, documents)

    def render_with_spans(self, messages: Sequence[Mapping[str, Any]]) -> tuple[str, list[tuple[int, int]]]:
        """The text and the ``[start, end)`` character spans of its ``{% generation %}`` blocks."""
        spans: list[tuple[int, int]] = []
        return self._render(messages, False, spans), spans

    def _render(self, messages, add_generation_prompt: bool, spans: list[tuple[int, int]] | None,
                tools=None, documents=None) -> str:  # noqa: ANN001
        import jinja2

        from .jinja_sandbox import RenderLimitExceeded, render

        # transformers' apply_chat_template: the special tokens, its keyword arguments, then these
        context = {**self.variables, "messages": _plain(messages), "tools": tools, "documents": documents,
                   "add_generation_prompt": add_generation_prompt}
        token = _spans.set(spans)
        try:
            return render(self.template, context, self.limits)
        except RenderLimitExceeded as exc:
            raise ChatTemplateFault(self.origin, str(exc)) from None
        except _Refusal as exc:
            raise ChatTemplateError(f"{self.origin}: {exc}") from None
        except jinja2.sandbox.SecurityError as exc:
            raise ChatTemplateFault(self.origin, f"does what the sandbox forbids: {exc}") from None
        except jinja2.TemplateNotFound as exc:  # {% include %}, {% import %}: a chat template has no files
            raise ChatTemplateFault(self.origin, f"asks for another template ({exc}), which chat templates "
                                    "cannot load") from None
        except (jinja2.TemplateError, TypeError, AttributeError, LookupError, ValueError, ArithmeticError) as exc:
            raise ChatTemplateError(f"{self.origin} failed on these messages: {type(exc).__name__}: {exc}") from None
        finally:
            _spans.reset(token)

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
                raise ChatTemplateError(f"{self.origin} marked {len(spans)} {{% generation %}} block(s) for "
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
                    f"{self.origin} renders message {i} differently depending on what follows it, so its "
                    "assistant turns cannot be found; mark them with {% generation %} ... {% endgeneration %}")
            spans.append((len(before), len(upto)))
        return text, spans

    def _probe_render(self, messages: list[dict[str, str]], **kwargs: Any) -> str:
        """A render of gpt2lab's own plain conversation, with a system message first if the template
        refuses it without one (some require it, others refuse system messages): refusing both is the
        template's fault."""
        try:
            return self.render(messages, **kwargs)
        except ChatTemplateError as exc:
            try:
                return self.render([{"role": "system", "content": _PROBE_SYSTEM}, *messages], **kwargs)
            except ChatTemplateError:
                raise ChatTemplateFault(self.origin, "cannot lay out a plain user/assistant conversation: "
                                        f"{str(exc).removeprefix(self.origin + ': ')}") from None

    @cached_property
    def end_of_turn(self) -> str:
        """What the template writes after an assistant message's content (``"\\n"`` for the transcript,
        ``"<|im_end|>\\n"`` for ChatML, ``"<|endoftext|>"`` for DialoGPT)."""
        user, reply, _ = _PROBE
        text = self._probe_render([{"role": "user", "content": user}, {"role": "assistant", "content": reply}])
        at = text.rfind(reply)
        if at < 0:
            raise ChatTemplateFault(self.origin, "does not write the assistant's message content")
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
            raise ChatTemplateFault(self.origin, "writes nothing after the assistant's message, so a reply has no "
                                    "end to stop at")
        two = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        base = self._probe_render(two)
        longer = self._probe_render([*two, {"role": "user", "content": following}])
        stops = [eot]
        if longer.startswith(base) and following in longer:
            label = longer[len(base):longer.index(following)].strip()
            if label:
                stops.append(label)
        return stops

    def probe(self) -> str:
        """Check, before serving or training with it, that the template lays out a plain conversation
        (two user turns and an assistant turn, with the generation prompt; after a system message if it
        wants one) within its bounds and says where a reply ends; the probe's text.
        Raises :class:`ChatTemplateFault` naming the template otherwise. A server renders this at start-up,
        so that a broken template fails there and not on every request."""
        user, reply, following = _PROBE
        text = self._probe_render([{"role": "user", "content": user}, {"role": "assistant", "content": reply},
                                   {"role": "user", "content": following}], add_generation_prompt=True)
        self.stop  # noqa: B018 - computes (and caches) the end-of-turn marker, or raises
        return text


def probe_chat_template(source: str, variables: Mapping[str, Any] | None = None, *, origin: str = DEFAULT_ORIGIN,
                        limits: RenderLimits | None = None) -> ChatTemplate:
    """Compile ``source`` and :meth:`~ChatTemplate.probe` it: the checked template, or
    :class:`ChatTemplateFault` naming ``origin``. What a server runs at start-up on its model's template."""
    template = ChatTemplate(source, variables, origin=origin, limits=limits)
    template.probe()
    return template
