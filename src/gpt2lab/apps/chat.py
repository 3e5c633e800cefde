"""Chatbot: a conversation with a GPT-2 model, laid out by :mod:`gpt2lab.generation.chat_format`.

A :class:`ChatSession` keeps the persona, the turns so far and the sampling controls; each
:meth:`~ChatSession.reply` renders the conversation (oldest turns dropped to fit the window, never the
persona), generates until the next user turn and records both turns.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_file
from ..sampling import SamplingParams

# chat_format lives in gpt2lab.generation, whose package import loads torch: it is imported where used
# so that importing this module (as `gpt2lab --help` does) stays cheap.
if TYPE_CHECKING:
    from ..generation import Generator
    from ..generation.chat_format import ChatPrompt, ChatStyle, Turn

DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_new_tokens": 60, "repetition_penalty": 1.1}
# not meaningful for a chat reply: the reply length is max_new_tokens, one reply per message
UNSUPPORTED = {"max_length": "use max_new_tokens (the reply length)", "n": "a chat has one reply per message",
               "logprobs": "chat shows text only"}


def parse_option(params: SamplingParams, name: str, raw: str) -> SamplingParams:
    """``params`` with option ``name`` set from its text form (``/set top_k 40``), validated.

    Numbers, ``true``/``false``, ``none``, JSON lists/objects (``/set stop ["\\n", "."]``) or a
    single string for list options. Raises ``ValueError`` naming the option and what it accepts.
    """
    key = name.strip().lower().replace("-", "_")
    if key in UNSUPPORTED:
        raise ValueError(f"{key} cannot be set in a chat: {UNSUPPORTED[key]}")
    types = {f.name: f.type for f in fields(SamplingParams)}
    if key not in types:
        known = ", ".join(sorted(set(types) - set(UNSUPPORTED)))
        raise ValueError(f"unknown option {name!r}; options: {known}")
    kind = str(types[key])
    raw = raw.strip()
    value: Any
    try:
        if raw.lower() in ("none", "null") and "None" in kind:
            value = None
        elif kind.startswith("list"):
            value = json.loads(raw) if raw.startswith("[") else ([raw] if raw else [])
            if key == "stop_token_ids":
                value = [int(v) for v in (value if isinstance(value, list) else [value])]
        elif kind.startswith("dict"):
            value = json.loads(raw)
            if not isinstance(value, dict):
                raise ValueError
        elif kind == "bool":
            table = {"true": True, "on": True, "yes": True, "1": True, "false": False, "off": False, "no": False,
                     "0": False}
            value = table[raw.lower()]
        elif kind.startswith("int"):
            value = int(raw)
        else:
            value = float(raw)
    except (ValueError, KeyError, TypeError):
        if kind == "bool":
            example = "true or false"
        elif kind.startswith(("int", "float")):
            example = "an integer" if kind.startswith("int") else "a number"
        else:
            example = "JSON, e.g. " + ('["a", "b"]' if kind.startswith("list") else '{"50256": -100}')
        raise ValueError(f"{key} must be {example}, got {raw!r}") from None
    return params.with_(**{key: value})


def describe(params: SamplingParams) -> str:
    """The settings that differ from SamplingParams' defaults, one per line."""
    default = SamplingParams()
    lines = [f"{f.name} = {getattr(params, f.name)!r}" for f in fields(SamplingParams)
             if f.name not in UNSUPPORTED and getattr(params, f.name) != getattr(default, f.name)]
    return "\n".join(lines) or "(all defaults)"


class ChatSession:
    """One conversation with a model.

    ``persona=None`` uses the layout's default persona (DialoGPT: none). ``params`` default to
    :data:`DEFAULTS`; ``max_new_tokens`` is the reply length. With a ``seed``, reply ``i`` uses a seed
    derived from it, so a scripted conversation is reproducible.
    """

    def __init__(self, generator: Generator, *, persona: str | None = None, params: SamplingParams | None = None,
                 user_name: str | None = None, bot_name: str | None = None, style: ChatStyle | None = None) -> None:
        from ..generation.chat_format import BOT_NAME, USER_NAME, style_for_model

        self.generator = generator
        self.style = style or style_for_model(generator.name, generator.path, user_name=user_name or USER_NAME,
                                              bot_name=bot_name or BOT_NAME)
        # None: the template's own choice (a checkpoint's template without a system message)
        self.persona: str | None = self.style.default_persona() if persona is None else persona.strip()
        self.turns: list[Turn] = []
        self.params = params if params is not None else SamplingParams(**DEFAULTS)
        self.last_prompt: ChatPrompt | None = None
        self._check(self.params)

    @staticmethod
    def _check(params: SamplingParams) -> None:
        default = SamplingParams()
        for key, why in UNSUPPORTED.items():
            if getattr(params, key) != getattr(default, key):
                raise ValueError(f"{key} cannot be used in a chat: {why}")

    @property
    def reply_tokens(self) -> int:
        p = self.params
        return SamplingParams.DEFAULT_MAX_NEW_TOKENS if p.max_new_tokens is None else p.max_new_tokens

    def prompt_for(self, message: str) -> ChatPrompt:
        """The prompt the model would see for ``message`` now."""
        from ..generation.chat_format import Turn, build_prompt

        window = self.generator.config.n_positions
        budget = window - self.reply_tokens
        if budget < 1:
            raise ValueError(f"max_new_tokens ({self.reply_tokens}) leaves no room for the conversation in the "
                             f"model's {window}-token window")
        return build_prompt(self.persona, [*self.turns, Turn("user", message)], self.generator.tokenizer,
                            self.style, budget)

    def reply(self, message: str, on_text: Callable[[str], None] | None = None) -> str:
        """Answer ``message``, record both turns and return the reply (``on_text`` gets it as it streams)."""
        from ..generation.chat_format import Turn, clean_reply

        if not message.strip():
            raise ValueError("message is empty")
        prompt = self.prompt_for(message)
        params = self.params.with_(stop=[*self.params.stop, *prompt.stop])
        if params.seed is not None:
            from ..generation.engine import sample_seed

            params = params.with_(seed=sample_seed(params.seed, len(self.turns) // 2))
        if on_text is None or params.num_beams > 1:
            text = self.generator.generate(prompt.text, params)[0].text
        else:
            parts: list[str] = []
            started = False
            for delta in self.generator.stream(prompt.text, params):
                parts.append(delta)
                if not started:  # the reply follows "Bot:"; show it without the leading space
                    delta = delta.lstrip()
                    started = bool(delta)
                if delta:
                    on_text(delta)
            text = "".join(parts)
        self.last_prompt = prompt
        answer = clean_reply(text, self.style)
        self.turns += [Turn("user", message.strip()), Turn("assistant", answer)]
        return answer

    def reset(self) -> None:
        """Forget the turns; keep the persona and the settings."""
        self.turns = []
        self.last_prompt = None

    def set_option(self, name: str, raw: str) -> SamplingParams:
        """Change one generation option from its text form (validated; unchanged on error)."""
        self.params = parse_option(self.params, name, raw)
        return self.params

    def transcript(self) -> str:
        from ..generation.chat_format import ChatStyle, render

        return render(self.persona, self.turns, ChatStyle("transcript", self.style.user_name, self.style.bot_name),
                      cue=False)

    def save(self, path: str | Path) -> Path:
        """Write the conversation as a readable transcript (persona, then ``User:`` / bot lines)."""
        path = Path(path)
        if path.parent and not path.parent.exists():
            raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
        return write_file(path, self.transcript())

    def load(self, path: str | Path, *, keep_persona: bool = False) -> None:
        """Continue the conversation of a transcript file written by :meth:`save` (or by hand)."""
        from ..generation.chat_format import ChatStyle, parse_transcript

        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: transcript file not found") from None
        persona, turns = parse_transcript(text, ChatStyle("transcript", self.style.user_name, self.style.bot_name))
        if not turns and not persona:
            raise ValueError(f"{path}: empty transcript")
        if not keep_persona and persona:
            self.persona = persona
        self.turns = turns



def first_replies(generator: Generator, messages: Sequence[str], params: SamplingParams, samples: int = 1, *,
                  system: str | None = None) -> list[tuple[str, str]]:
    """``samples`` replies to each of ``messages`` as the user's first turn of its own conversation, laid out
    as :class:`ChatSession` lays it out (``system``: the system message; None: the layout's default, a
    chat fine-tune's own), in one batch: ``[(message, reply), ...]``, message-major. ``params`` sets the
    reply length and sampling (``n`` is ``samples``). Raises ``ValueError`` for a message or system
    message that leaves no room for the reply."""
    if not 1 <= samples <= 64:
        raise ValueError(f"samples must be in [1, 64], got {samples}")
    session = ChatSession(generator, persona=system, params=params.with_(n=1))
    prompts = [session.prompt_for(m) for m in messages]
    if not prompts:
        return []
    from ..generation.chat_format import clean_reply

    stop = [*params.stop, *prompts[0].stop]  # the layout's end of a turn: the same for every conversation
    out = generator.generate([p.text for p in prompts], params.with_(n=samples, stop=stop))
    return [(messages[i // samples], clean_reply(c.text, session.style)) for i, c in enumerate(out)]
