"""How a conversation becomes a GPT-2 prompt, shared by ``gpt2lab chat`` and the server's chat endpoint.

GPT-2 is not an instruction model: it continues text. So a conversation is laid out as a transcript
that the model can plausibly continue with the bot's next line::

    The following is a conversation between User and Bot, ...   <- persona preamble

    User: Hello!
    Bot: Hi, how can I help?
    User: Tell me a joke.
    Bot:                                                          <- the model writes from here

and generation stops where the model starts the next ``User:`` turn. Models of the DialoGPT family
were trained on turns separated by ``<|endoftext|>`` (``hello<|endoftext|>hi there<|endoftext|>``) and
end their reply with ``<|endoftext|>``, so they get that layout instead.

When the conversation outgrows the context window, the oldest turns are dropped; the persona never is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from ..tokenizer import EOS_TOKEN

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
    """The layout: ``transcript`` (``User:`` / bot-name lines) or ``dialogpt`` (EOS-separated turns)."""

    kind: Literal["transcript", "dialogpt"] = "transcript"
    user_name: str = USER_NAME
    bot_name: str = BOT_NAME

    def __post_init__(self) -> None:
        for what, name in (("user name", self.user_name), ("bot name", self.bot_name)):
            if not name or ":" in name or "\n" in name or name != name.strip():
                raise ValueError(f"{what} must be a non-empty single line without ':' or outer spaces, got {name!r}")
        if self.user_name == self.bot_name:
            raise ValueError(f"user name and bot name must differ, both are {self.user_name!r}")

    @property
    def dialogpt(self) -> bool:
        return self.kind == "dialogpt"

    def label(self, role: Role) -> str:
        return self.user_name if role == "user" else self.bot_name

    @property
    def stop(self) -> list[str]:
        """Stop strings for the bot's reply: the start of the next user turn (or of another bot turn).

        A DialoGPT reply ends with ``<|endoftext|>``, which stops generation by itself.
        """
        if self.dialogpt:
            return []
        return [f"{self.user_name}:", f"\n{self.bot_name}:"]

    def default_persona(self) -> str:
        return "" if self.dialogpt else DEFAULT_PERSONA.format(user=self.user_name, bot=self.bot_name)


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
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    origin = str(raw.get("_name_or_path", ""))
    # DialoGPT's config carries a "conversational" task entry that plain GPT-2 configs do not
    return "dialogpt" in origin.lower() or "conversational" in (raw.get("task_specific_params") or {})


def style_for_model(name: str | None = None, path: str | Path | None = None, *, user_name: str = USER_NAME,
                    bot_name: str = BOT_NAME) -> ChatStyle:
    """The layout a model expects (DialoGPT's own, else the transcript)."""
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


def _one_line(text: str) -> str:
    # a turn is one paragraph of the transcript; inner blank lines would look like a new section
    return re.sub(r"\n\s*\n+", "\n", text.strip())


def _persona_segment(persona: str, style: ChatStyle) -> str:
    if not persona:
        return ""
    return persona.strip() + (EOS_TOKEN if style.dialogpt else "\n\n")


def _turn_segment(turn: Turn, style: ChatStyle) -> str:
    if style.dialogpt:
        return _one_line(turn.text) + EOS_TOKEN
    return f"{style.label(turn.role)}: {_one_line(turn.text)}\n"


def _cue(style: ChatStyle) -> str:
    return "" if style.dialogpt else f"{style.bot_name}:"


def render(persona: str | None, turns: Sequence[Turn], style: ChatStyle, *, cue: bool = True) -> str:
    """The prompt text for ``turns`` (all of them), ending with the bot's cue when ``cue``."""
    persona = style.default_persona() if persona is None else persona
    text = _persona_segment(persona, style) + "".join(_turn_segment(t, style) for t in turns)
    return text + (_cue(style) if cue else "")


def build_prompt(persona: str | None, turns: Sequence[Turn], tokenizer: Tokenizer, style: ChatStyle,
                 max_tokens: int) -> ChatPrompt:
    """The prompt for the bot's next reply in at most ``max_tokens`` tokens.

    ``persona=None`` uses the style's default persona. The oldest turns are dropped until the prompt
    fits; the persona and the last turn are always kept (``ValueError`` if even they do not fit).
    """
    persona = style.default_persona() if persona is None else persona
    head = _persona_segment(persona, style)
    segments = [_turn_segment(t, style) for t in turns]
    cue = _cue(style)
    sizes = [len(tokenizer.encode(s)) for s in segments]
    # keep the longest suffix of turns whose summed sizes fit; BPE can merge across a boundary, so the
    # exact count of the joined text is checked below and one more turn dropped if needed
    fixed = len(tokenizer.encode(head)) + len(tokenizer.encode(cue))
    start, total = len(segments), fixed
    while start > 0 and total + sizes[start - 1] <= max_tokens:
        start -= 1
        total += sizes[start]
    start = min(start, max(len(segments) - 1, 0))  # the last turn is never dropped: fail instead

    def user_first(i: int) -> int:  # a kept history opens with a user turn, not half an exchange
        return i + 1 if 0 < i < len(turns) - 1 and turns[i].role == "assistant" else i

    start = user_first(start)
    while True:
        text = head + "".join(segments[start:]) + cue
        ids = tokenizer.encode(text)
        if len(ids) <= max_tokens:
            return ChatPrompt(text=text, n_tokens=len(ids), stop=style.stop, turns_kept=len(segments) - start,
                              turns_dropped=start, token_ids=ids)
        if start >= len(segments) - 1:
            raise ValueError(f"the persona and the last message need {len(ids)} tokens but only {max_tokens} fit "
                             "in the context window after the room kept for the reply; shorten them or lower "
                             "max_new_tokens")
        start = user_first(start + 1)


def clean_reply(text: str, style: ChatStyle) -> str:
    """The bot's reply alone: cut at the next turn (if the engine stopped past it) and trimmed."""
    cuts = [EOS_TOKEN] if style.dialogpt else style.stop
    for marker in cuts:
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
