"""TEMPORARY stand-in for gpt2lab.generation.chat_format (apps branch); deleted when that is merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ChatPrompt:
    text: str
    token_ids: list[int]
    stop: list[str]


def from_messages(messages: Any) -> tuple[str | None, list[tuple[str, str]]]:
    persona, turns = [], []
    for msg in messages:
        if msg["role"] == "system":
            persona.append(msg["content"])
        else:
            turns.append((msg["role"], msg["content"]))
    return ("\n".join(persona) if persona else None), turns


def style_for_model(name: Any, path: Any) -> None:
    return None


def build_prompt(persona: str | None, turns: list, tokenizer: Any, style: Any, max_tokens: int) -> ChatPrompt:
    text = (persona + "\n\n" if persona else "") + "".join(
        f"{'User' if r == 'user' else 'Bot'}: {t.strip()}\n" for r, t in turns) + "Bot:"
    ids = tokenizer.encode(text)
    if len(ids) > max_tokens:
        raise ValueError(f"the conversation needs {len(ids)} tokens but only {max_tokens} fit")
    return ChatPrompt(text, ids, ["User:", "\nBot:"])
