"""How a conversation becomes a GPT-2 prompt, shared by ``gpt2lab chat``, the server's chat endpoint and
chat fine-tuning.

A conversation is rendered by a chat template (Jinja, transformers' ``chat_template`` convention, see
:mod:`gpt2lab.generation.chat_template`). A checkpoint's own template wins. Without one, GPT-2 -- which
is not an instruction model: it continues text -- gets a transcript that it can plausibly continue with
the bot's next line::

    The following is a conversation between User and Bot, ...   <- persona (the system message)

    User: Hello!
    Bot: Hi, how can I help?
    User: Tell me a joke.
    Bot:                                                          <- the model writes from here

and generation stops where the model starts the next ``User:`` turn. Models of the DialoGPT family
were trained on turns separated by ``<|endoftext|>`` (``hello<|endoftext|>hi there<|endoftext|>``) and
end their reply with ``<|endoftext|>``, so they get that layout instead. Other templates stop at their
end-of-turn marker (``<|im_end|>`` for ChatML).

When the conversation outgrows the context window, the oldest turns are dropped; the system messages
(the persona) never are.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..readers import read_json
from ..tokenizer import EOS_TOKEN
from .chat_template import (
    DEFAULT_CHAT_TEMPLATE,
    DIALOGPT_CHAT_TEMPLATE,
    ChatTemplate,
    find_chat_template,
    special_tokens,
)

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

Role = Literal["user", "assistant"]
USER_NAME = "User"
BOT_NAME = "Bot"
DEFAULT_PERSONA = ("The following is a conversation between {user} and {bot}. {bot} is a friendly, curious and "
                   "helpful assistant who answers in a sentence or two.")


@dataclass(frozen=True)
class Turn:
    role: Role  # "user" or "assistant" (OpenAI's names, so server messages map one to one)
    text: str


@dataclass(frozen=True)
class ChatStyle:
    """The layout: ``transcript`` (``User:`` / bot-name lines), ``dialogpt`` (EOS-separated turns) or
    ``template`` (a checkpoint's own Jinja chat template, ``template``). The first two are templates too
    (:data:`~gpt2lab.generation.chat_template.DEFAULT_CHAT_TEMPLATE` and ``DIALOGPT_CHAT_TEMPLATE``);
    ``user_name`` and ``bot_name`` are passed to every template as variables of those names."""

    kind: Literal["transcript", "dialogpt", "template"] = "transcript"
    user_name: str = USER_NAME
    bot_name: str = BOT_NAME
    template: str | None = None
    origin: str | None = field(default=None, compare=False)  # where ``template`` comes from, for its errors
    # the checkpoint's special tokens (tokenizer_config.json), passed to its template as transformers does
    special_tokens: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        for what, name in (("user name", self.user_name), ("bot name", self.bot_name)):
            if not name or ":" in name or "\n" in name or name != name.strip():
                raise ValueError(f"{what} must be a non-empty single line without ':' or outer spaces, got {name!r}")
        if self.user_name == self.bot_name:
            raise ValueError(f"user name and bot name must differ, both are {self.user_name!r}")
        if (self.kind == "template") != (self.template is not None):
            raise ValueError("a template style needs its template source, and only it")

    @property
    def dialogpt(self) -> bool:
        return self.kind == "dialogpt"

    def label(self, role: Role) -> str:
        return self.user_name if role == "user" else self.bot_name

    @property
    def chat_template(self) -> ChatTemplate:
        """The compiled template of this layout, with the names as variables (rendered within bounds:
        :class:`~gpt2lab.generation.chat_template.ChatTemplate`)."""
        origin = self.origin or ("the chat template" if self.kind == "template" else f"gpt2lab's {self.kind} "
                                                                                       "chat template")
        return _chat_template(self.source, self.user_name, self.bot_name, origin, self.special_tokens)

    @property
    def source(self) -> str:
        """The Jinja source of this layout's template."""
        if self.template is not None:
            return self.template
        return DIALOGPT_CHAT_TEMPLATE if self.dialogpt else DEFAULT_CHAT_TEMPLATE

    @property
    def stop(self) -> list[str]:
        """Stop strings for the bot's reply: the template's end-of-turn marker; for the transcript the start
        of the next user turn (or of another bot turn). A DialoGPT reply ends with ``<|endoftext|>``,
        which stops generation by itself."""
        return list(self.chat_template.stop)

    def default_persona(self) -> str | None:
        """The transcript's introduction of the speakers; DialoGPT has none (""); a checkpoint's own
        template decides for itself what a conversation without a system message looks like (None)."""
        if self.kind == "transcript":
            return DEFAULT_PERSONA.format(user=self.user_name, bot=self.bot_name)
        return "" if self.dialogpt else None

    def messages(self, persona: str | None, turns: Sequence[Turn]) -> list[dict[str, str]]:
        """``turns`` as template messages, the persona first as the system message (none when it is
        None; an empty one means "no persona" to gpt2lab's templates)."""
        head = [] if persona is None else [{"role": "system", "content": persona}]
        return head + [{"role": t.role, "content": t.text} for t in turns]


@lru_cache(maxsize=32)
def _chat_template(source: str, user_name: str, bot_name: str, origin: str,
                   specials: tuple[tuple[str, str], ...] = ()) -> ChatTemplate:
    return ChatTemplate(source, {**dict(specials), "user_name": user_name, "bot_name": bot_name}, origin=origin)


@dataclass
class ChatPrompt:
    """A rendered prompt and what it took to fit the window."""

    text: str
    n_tokens: int
    stop: list[str]
    turns_kept: int
    turns_dropped: int  # oldest turns left out to fit the window
    token_ids: list[int] = field(default_factory=list, repr=False)


def is_dialogpt(name: str | None = None, path: str | Path | None = None) -> bool:
    """Whether a model is of the DialoGPT family: by its name, or by its config.json."""
    if name and "dialogpt" in str(name).lower():
        return True
    if path is None:
        return False
    try:
        raw = read_json(Path(path) / "config.json", expect=dict)
    except (OSError, ValueError):
        return False
    origin = str(raw.get("_name_or_path", ""))
    # DialoGPT's config carries a "conversational" task entry that plain GPT-2 configs do not
    return "dialogpt" in origin.lower() or "conversational" in (raw.get("task_specific_params") or {})


def style_for_model(name: str | None = None, path: str | Path | None = None, *, user_name: str = USER_NAME,
                    bot_name: str = BOT_NAME) -> ChatStyle:
    """The layout a model expects: its own chat template, else DialoGPT's, else the transcript.
    :class:`~gpt2lab.generation.chat_template.ChatTemplateFault` for a template file that cannot be read."""
    own = find_chat_template(path)
    if own is not None:
        return ChatStyle(kind="template", user_name=user_name, bot_name=bot_name, template=own[0], origin=own[1],
                         special_tokens=tuple(special_tokens(path).items()))
    kind = "dialogpt" if is_dialogpt(name, path) else "transcript"
    return ChatStyle(kind=kind, user_name=user_name, bot_name=bot_name)


def from_messages(messages: Iterable[Mapping[str, str]]) -> tuple[str | None, list[Turn]]:
    """OpenAI-style ``[{"role": "system"|"user"|"assistant", "content": ...}]`` -> (persona, turns).

    System messages are joined into the persona; raises ``ValueError`` naming a bad message.
    """
    persona: list[str] = []
    turns: list[Turn] = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
        if role == "system":
            persona.append(content.strip())
        elif role in ("user", "assistant"):
            turns.append(Turn(role, content))
        else:
            raise ValueError(f"messages[{i}].role must be 'system', 'user' or 'assistant', got {role!r}")
    return ("\n".join(p for p in persona if p) if persona else None), turns


def render(persona: str | None, turns: Sequence[Turn], style: ChatStyle, *, cue: bool = True) -> str:
    """The prompt text for ``turns`` (all of them), ending with the bot's cue when ``cue``."""
    persona = style.default_persona() if persona is None else persona
    return style.chat_template.render(style.messages(persona, turns), add_generation_prompt=cue)


def build_prompt(persona: str | None, turns: Sequence[Turn], tokenizer: Tokenizer, style: ChatStyle,
                 max_tokens: int) -> ChatPrompt:
    """The prompt for the bot's next reply in at most ``max_tokens`` tokens.

    ``persona=None`` uses the style's default persona. The oldest turns are dropped until the prompt
    fits; the persona and the last turn are always kept (``ValueError`` if even they do not fit).
    """
    persona = style.default_persona() if persona is None else persona
    return build_prompt_messages(style.messages(persona, turns), tokenizer, style, max_tokens)


def fit_messages(messages: Sequence[Mapping[str, str]], fits: Callable[[list[Mapping[str, str]]], bool],
                 *, keep_last: int = 1) -> tuple[int, list[Mapping[str, str]]] | None:
    """The longest suffix of the conversation that ``fits``, as (turns dropped, messages), or None.

    System messages are always kept (in place); the kept turns start with a user message when one
    of the candidate turns is; the last ``keep_last`` turns are never dropped (None when even they do
    not fit). Binary search over the cut: O(log n) renders for n turns.
    """
    turn_at = [i for i, m in enumerate(messages) if m.get("role") != "system"]

    def kept(cut: int) -> list[Mapping[str, str]]:
        first = turn_at[cut] if cut < len(turn_at) else len(messages)
        return [m for i, m in enumerate(messages) if i >= first or m.get("role") == "system"]

    def user_first(cut: int) -> int:  # a kept history opens with a user turn, not half an exchange
        while 0 < cut < len(turn_at) - keep_last and messages[turn_at[cut]].get("role") != "user":
            cut += 1
        return cut

    last = max(len(turn_at) - keep_last, 0)
    low, high = 0, last  # find the smallest cut that fits
    if not fits(kept(user_first(last))):
        return None
    while low < high:
        mid = (low + high) // 2
        if fits(kept(user_first(mid))):
            high = mid
        else:
            low = mid + 1
    cut = user_first(low)
    return cut, kept(cut)


def build_prompt_messages(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer, style: ChatStyle,
                          max_tokens: int, *, add_generation_prompt: bool = True,
                          continue_final_message: bool = False) -> ChatPrompt:
    """The prompt (with the generation cue) for OpenAI-style ``messages`` in at most ``max_tokens`` tokens:
    the oldest non-system messages are dropped until it fits (``ValueError`` if even the last does not).

    ``add_generation_prompt=False``: no cue after the last message. ``continue_final_message``: the text
    ends inside the last message, right after its content, so the model continues it (transformers' and
    vLLM's option of that name; ``ValueError`` when the template does not write the content as given)."""
    template = style.chat_template
    rendered: dict[int, tuple[str, list[int]]] = {}

    def render(kept: list[Mapping[str, str]]) -> str:
        if not continue_final_message:
            return template.render(kept, add_generation_prompt=add_generation_prompt)
        text = template.render(kept, add_generation_prompt=False)
        final = str(kept[-1].get("content", ""))
        if final.strip() not in text:
            raise ValueError("continue_final_message: the chat template does not write the last message as "
                             "given, so it cannot be continued")
        at = text.rindex(final.strip())
        # as transformers: keep the final message's trailing whitespace when the template wrote it
        size = len(final.lstrip()) if text[at:at + len(final.lstrip())] == final.lstrip() else len(final.strip())
        return text[:at + size]

    def encode(kept: list[Mapping[str, str]]) -> tuple[str, list[int]]:
        key = len(kept)
        if key not in rendered:
            text = render(kept)
            rendered[key] = (text, tokenizer.encode(text))
        return rendered[key]

    found = fit_messages(messages, lambda kept: len(encode(kept)[1]) <= max_tokens)
    n_turns = sum(1 for m in messages if m.get("role") != "system")
    if found is None:
        turn_at = [i for i, m in enumerate(messages) if m.get("role") != "system"]
        minimal = [m for i, m in enumerate(messages) if m.get("role") == "system" or i == (turn_at or [-1])[-1]]
        need = len(encode(minimal)[1])
        raise ValueError(f"the persona and the last message need {need} tokens but only {max_tokens} fit "
                         "in the context window after the room kept for the reply; shorten them or lower "
                         "max_new_tokens")
    dropped, kept = found
    text, ids = encode(kept)
    return ChatPrompt(text=text, n_tokens=len(ids), stop=style.stop, turns_kept=n_turns - dropped,
                      turns_dropped=dropped, token_ids=ids)


def clean_reply(text: str, style: ChatStyle) -> str:
    """The bot's reply alone: cut at the next turn (if the engine stopped past it) and trimmed."""
    for marker in (EOS_TOKEN, *style.stop):
        pos = text.find(marker)
        if pos >= 0:
            text = text[:pos]
    return text.strip()


def parse_transcript(text: str, style: ChatStyle) -> tuple[str, list[Turn]]:
    """Read a transcript written by :func:`render` (``cue=False``): (persona, turns).

    A line starting with ``User:`` or ``<bot name>:`` starts a turn; other lines continue the current
    one; everything before the first turn is the persona.
    """
    labels = {style.user_name: "user", style.bot_name: "assistant"}
    pattern = re.compile(rf"^({re.escape(style.user_name)}|{re.escape(style.bot_name)}):(?: |$)(.*)$")
    persona: list[str] = []
    turns: list[tuple[str, list[str]]] = []
    for line in text.replace(EOS_TOKEN, "\n").splitlines():
        match = pattern.match(line)
        if match:
            turns.append((labels[match.group(1)], [match.group(2)]))
        elif turns:
            turns[-1][1].append(line)
        else:
            persona.append(line)
    return "\n".join(persona).strip(), [Turn(role, "\n".join(lines).strip()) for role, lines in turns]  # type: ignore[arg-type]
