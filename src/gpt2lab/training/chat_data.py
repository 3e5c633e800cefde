"""Conversation data for chat fine-tuning: JSONL conversations, rendered by a chat template, tokenized with
a mask of the assistant's tokens (the only ones that carry loss).

Three record shapes are read, one record per line (they may be mixed):

- OpenAI fine-tuning: ``{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}``
- ShareGPT: ``{"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...]}``
- prompt/completion: ``{"prompt": "...", "completion": "..."}`` (a user turn and the assistant's reply)

Each conversation is rendered with the chat template; the template says where each assistant turn is
(:meth:`~gpt2lab.generation.chat_template.ChatTemplate.assistant_spans`: the reply and its end-of-turn
marker). The text is tokenized piece by piece, cut at those spans, so a token never straddles a turn
boundary and the mask is exact; the prompt pieces are tokenized as the chat prompt is at inference.
A conversation longer than the context loses its oldest turns (whole turns; system messages stay);
one whose last exchange alone does not fit is skipped and counted.

The model learns its replies under the conversations' system message. So that it gets that message at
inference when none is given (``gpt2lab chat`` without ``--persona``, a server request without a system
message, ``review make``), :func:`default_system_message` finds the one the conversations share (or the
most common, with a note) and :func:`with_default_system_message` makes it the template's default: the
template trained with and saved with the model inserts it into any conversation that has none, for
gpt2lab and for transformers' ``apply_chat_template`` alike.

The cache (``--out/data``) holds per split ``{split}.bin`` (token ids), ``{split}.mask`` (1 = assistant
token, uint8) and ``{split}.idx.npy`` (offset and length of each conversation), plus ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..generation.chat_format import fit_messages
from ..generation.chat_template import ChatTemplate, ChatTemplateError, ChatTemplateFault
from ..readers import ReadError, format_of, read_records
from .data import (
    DataError,
    DataStats,
    _cached_meta,
    _source_key,
    _vocab_hash,
    _write_meta,
    expand_paths,
    split_documents,
    token_dtype,
)

CHAT_CACHE_VERSION = 1
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "bot": "assistant", "chatgpt": "assistant"}
IGNORE_INDEX = -100  # the label of a token without loss (PyTorch's cross_entropy default)


# -- reading conversations -----------------------------------------------------------------------------
def record_kind(record: object) -> str | None:
    """``"messages"``, ``"conversations"``, ``"prompt_completion"`` or None for a record of another shape."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "conversations"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    return None


def looks_like_chat(paths: Sequence[str | os.PathLike[str]]) -> bool:
    """Whether the training files are conversations: every file is .jsonl and its first record has a
    conversation shape (what ``--format auto`` decides by)."""
    try:
        files = expand_paths(paths)
    except DataError:
        return False
    if not files or any(format_of(f) != "jsonl" for f in files):
        return False
    for path in files:
        try:
            first = next(read_records(path, "jsonl", errors="replace"), None)
        except (ReadError, OSError):
            return False
        if first is None or record_kind(first[1]) is None:
            return False
    return True


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where} must be a string, got {type(value).__name__}")
    return value


def to_messages(record: object, where: str) -> list[dict[str, str]]:
    """One record as OpenAI-style messages; :class:`DataError` naming ``where`` (``file:line``) and the problem."""
    kind = record_kind(record)
    if kind is None:
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise DataError(f"{where}: not a conversation (found {found}); expected \"messages\", \"conversations\" "
                        "or \"prompt\" and \"completion\"")
    assert isinstance(record, dict)
    if kind == "prompt_completion":
        return [{"role": "user", "content": _text(record["prompt"], f"{where}: prompt")},
                {"role": "assistant", "content": _text(record["completion"], f"{where}: completion")}]
    items = record[kind]
    if not isinstance(items, list):
        raise DataError(f"{where}: \"{kind}\" must be a list, got {type(items).__name__}")
    messages = []
    for i, item in enumerate(items):
        at = f"{where}: {kind}[{i}]"
        if not isinstance(item, dict):
            raise DataError(f"{at} must be an object, got {type(item).__name__}")
        if kind == "messages":
            role = item.get("role")
            if role not in ROLES:
                raise DataError(f"{at}.role must be one of {', '.join(ROLES)}, got {role!r}")
            messages.append({"role": role, "content": _text(item.get("content"), f"{at}.content")})
        else:
            who = item.get("from")
            if not isinstance(who, str) or who.lower() not in SHAREGPT_ROLES:
                raise DataError(f"{at}.from must be one of human, gpt, system, got {who!r}")
            messages.append({"role": SHAREGPT_ROLES[who.lower()], "content": _text(item.get("value"), f"{at}.value")})
    if not messages:
        raise DataError(f"{where}: empty conversation")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message (nothing to learn from)")
    return messages


def read_conversations(path: Path, stats: DataStats) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """``("file:line", messages)`` for each record of a JSONL file."""
    try:
        for lineno, record in read_records(path, "jsonl", errors="replace", stats=stats):
            yield f"{path}:{lineno}", to_messages(record, f"{path}:{lineno}")
    except ReadError as exc:  # the shared reader's bad-line error, as the data error the CLI reports
        raise DataError(str(exc)) from None


# -- the model's default system message ---------------------------------------------------------------
_DEFAULT_SYSTEM_MARK = "{#- gpt2lab: the system message of the fine-tuning data, for a conversation without one -#}\n"
_DEFAULT_SYSTEM_END = "{#- gpt2lab: end of the default system message -#}\n"


def default_system_message(paths: Sequence[str | os.PathLike[str]]) -> tuple[str | None, str]:
    """(the system message the conversations of ``paths`` share, a note saying how many carry it).

    The most common system message wins when they differ (the note says so); None when most
    conversations have none, or more than one (then there is no single message to default to).
    Raises :class:`DataError` naming a bad record, as reading them for training does."""
    from collections import Counter

    counts: Counter[tuple[str, ...]] = Counter()
    stats = DataStats()
    for path in expand_paths(paths):
        for _, messages in read_conversations(path, stats):
            counts[tuple(m["content"] for m in messages if m["role"] == "system")] += 1
    total = sum(counts.values())
    if not total:
        return None, "no conversations"
    (top, n), = counts.most_common(1)
    if len(top) != 1:
        return None, (f"{n} of {total} conversations have no system message" if not top else
                      f"{n} of {total} conversations have {len(top)} system messages")
    shown = top[0] if len(top[0]) <= 80 else top[0][:77] + "..."
    if n == total:
        return top[0], f"every conversation has the system message {shown!r}"
    return top[0], (f"the most common system message, {shown!r}, in {n} of {total} conversations "
                    f"({len(counts) - 1} other variants, or none)")


def with_default_system_message(template: ChatTemplate, message: str) -> ChatTemplate:
    """``template`` that puts ``message`` first as the system message of a conversation that has none (a
    default the template had before is replaced). The source stays a plain chat template."""
    source = template.source
    if source.startswith(_DEFAULT_SYSTEM_MARK) and _DEFAULT_SYSTEM_END in source:
        source = source.split(_DEFAULT_SYSTEM_END, 1)[1]
    # repr() is a Jinja string literal of the same value (Jinja reads Python's escapes)
    preamble = (_DEFAULT_SYSTEM_MARK
                + "{%- set ns_system = namespace(found=false) -%}\n"
                "{%- for m in messages if m['role'] == 'system' -%}{%- set ns_system.found = true -%}{%- endfor -%}\n"
                "{%- if not ns_system.found -%}{%- set messages = [{'role': 'system', 'content': "
                + repr(message) + "}] + messages -%}{%- endif -%}\n" + _DEFAULT_SYSTEM_END)
    out = ChatTemplate(preamble + source, template.variables, origin=template.origin, limits=template.limits)
    probe = [{"role": "user", "content": "x"}]
    if out.render(probe) != template.render([{"role": "system", "content": message}, *probe]):
        raise ValueError("the default system message could not be written into the chat template")
    return out


# -- tokenizing with the assistant mask ----------------------------------------------------------------
def encode_conversation(messages: Sequence[Mapping[str, str]], template: ChatTemplate,
                        encode: Callable[[str], list[int]]) -> tuple[list[int], list[int], str, list[tuple[int, int]]]:
    """(token ids, mask with 1 on assistant tokens, text, assistant spans) of a rendered conversation.

    The text is cut at the span boundaries and each piece tokenized alone, so every token belongs to
    exactly one side and the masked tokens decode to exactly the spans' text.
    """
    text, spans = template.assistant_spans(messages)
    ids: list[int] = []
    mask: list[int] = []
    pos = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, flag in ((text[pos:start], 0), (text[start:end], 1)):
            if piece:
                part = encode(piece)
                ids += part
                mask += [flag] * len(part)
        pos = end
    return ids, mask, text, spans


def fit_conversation(messages: Sequence[Mapping[str, str]], template: ChatTemplate, encode: Callable[[str], list[int]],
                     max_tokens: int) -> tuple[list[int], list[int]] | None:
    """The conversation's ids and mask in at most ``max_tokens`` tokens: the oldest turns dropped (whole
    turns; system messages kept) until it fits; None when even the last exchange does not fit."""
    cache: dict[int, tuple[list[int], list[int]]] = {}

    def encoded(kept: list[Mapping[str, str]]) -> tuple[list[int], list[int]]:
        if len(kept) not in cache:
            if not any(m.get("role") == "assistant" for m in kept):
                cache[len(kept)] = ([0] * (max_tokens + 1), [])  # nothing to learn: never "fits"
            else:
                cache[len(kept)] = encode_conversation(kept, template, encode)[:2]
        return cache[len(kept)]

    # end the kept part on the last assistant message: turns after it carry no loss
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    messages = list(messages[:last + 1])
    n_turns = sum(1 for m in messages if m.get("role") != "system")
    found = fit_messages(messages, lambda kept: len(encoded(kept)[0]) <= max_tokens,
                         keep_last=2 if n_turns >= 2 and messages[last - 1].get("role") == "user" else 1)
    return None if found is None else encoded(found[1])


# -- the prepared dataset --------------------------------------------------------------------------------
@dataclass
class ConversationSplit:
    """Token ids and assistant mask of one split; conversation ``i`` is ``tokens[offsets[i]:][:lengths[i]]``."""

    tokens: np.ndarray
    mask: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets)

    def rows(self, indices: Sequence[int], assistant_only: bool, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs ``[B, T]``, labels ``[B, T]``) for these conversations, padded to the longest one.

        Labels are the next tokens, :data:`IGNORE_INDEX` on padding and -- with ``assistant_only`` -- where
        the next token is not the assistant's. Each row is one conversation, so no loss crosses two.
        """
        width = max(int(self.lengths[i]) for i in indices) - 1
        x = np.full((len(indices), width), pad_id, dtype=np.int64)
        y = np.full((len(indices), width), IGNORE_INDEX, dtype=np.int64)
        for r, i in enumerate(indices):
            start, n = int(self.offsets[i]), int(self.lengths[i])
            ids = self.tokens[start:start + n].astype(np.int64)
            x[r, :n - 1] = ids[:-1]
            target = ids[1:].copy()
            if assistant_only:
                target[self.mask[start + 1:start + n] == 0] = IGNORE_INDEX
            y[r, :n - 1] = target
        return torch.from_numpy(x), torch.from_numpy(y)


@dataclass
class ConversationData:
    train: ConversationSplit
    val: ConversationSplit | None
    meta: dict


def _write(cache: Path, split: str, convs: Sequence[tuple[list[int], list[int]]], dtype: np.dtype) -> None:
    lengths = np.array([len(ids) for ids, _ in convs], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64) if len(convs) else lengths
    np.concatenate([np.asarray(ids, dtype=dtype) for ids, _ in convs]).tofile(cache / f"{split}.bin")
    np.concatenate([np.asarray(m, dtype=np.uint8) for _, m in convs]).tofile(cache / f"{split}.mask")
    np.save(cache / f"{split}.idx.npy", np.stack([offsets, lengths]))


def _open_split(cache: Path, split: str, dtype: np.dtype) -> ConversationSplit:
    offsets, lengths = np.load(cache / f"{split}.idx.npy")
    return ConversationSplit(np.memmap(cache / f"{split}.bin", dtype=dtype, mode="r"),
                             np.memmap(cache / f"{split}.mask", dtype=np.uint8, mode="r"), offsets, lengths)


def prepare_chat_data(paths: Sequence[str | os.PathLike[str]], cache_dir: str | os.PathLike[str], *, tokenizer,
                      template: ChatTemplate, max_tokens: int, val: str | os.PathLike[str] | None = None,
                      val_share: float = 0.05, seed: int = 0,
                      log: Callable[[str], None] | None = None) -> ConversationData:
    """Read, render and tokenize the conversations of ``paths`` (and ``val``) into ``cache_dir`` (reused
    when the sources, template and settings are unchanged). ``max_tokens``: the longest sequence kept
    (the block size + 1). Raises :class:`DataError` naming the file and line of a bad record."""
    log = log or (lambda msg: None)
    if not 0.0 <= val_share < 1.0:
        raise DataError(f"val share must be in [0, 1), got {val_share}")
    files = expand_paths(paths)
    val_files = expand_paths([val]) if val is not None else []
    for f in (*files, *val_files):
        if format_of(f) != "jsonl":  # the one suffix table: .jsonl, .ndjson, .jsonl.gz
            raise DataError(f"{f}: chat data must be .jsonl conversations (\"messages\", \"conversations\" or "
                            "\"prompt\"/\"completion\" records)")
    dtype = token_dtype(tokenizer.vocab_size)

    key = {"version": CHAT_CACHE_VERSION, "sources": _source_key(files), "val_sources": _source_key(val_files),
           "val_share": val_share if val is None else None, "seed": seed, "max_tokens": max_tokens,
           "template": hashlib.blake2b(json.dumps([template.source, template.variables], sort_keys=True).encode(),
                                       digest_size=8).hexdigest(),
           "vocab_hash": _vocab_hash(tokenizer)}
    cache = Path(cache_dir)
    if (meta := _cached_meta(cache, key)) is not None:
        return _open(cache, meta, dtype)

    def tokenize(fs: Sequence[Path]) -> tuple[list[tuple[list[int], list[int]]], list[int], int, int]:
        convs, hashes, skipped, trimmed = [], [], 0, 0
        stats = DataStats()
        for path in fs:
            for where, messages in read_conversations(path, stats):
                try:
                    ids, mask = encode_conversation(messages, template, tokenizer.encode)[:2]
                    if len(ids) > max_tokens:
                        fitted = fit_conversation(messages, template, tokenizer.encode, max_tokens)
                        if fitted is None:
                            skipped += 1
                            continue
                        ids, mask = fitted
                        trimmed += 1
                except ChatTemplateError as exc:  # the template refused this conversation
                    raise DataError(f"{where}: {exc}") from None
                except ChatTemplateFault as exc:  # the template's own fault, met on this conversation
                    raise ChatTemplateFault(exc.origin, f"{exc.problem} (rendering {where})") from None
                if sum(mask) == 0 or len(ids) < 2:
                    skipped += 1
                    continue
                convs.append((ids, mask))
                hashes.append(int.from_bytes(hashlib.blake2b(json.dumps(messages).encode(), digest_size=8).digest(),
                                             "little"))
        return convs, hashes, skipped, trimmed

    convs, hashes, skipped, trimmed = tokenize(files)
    if not convs:
        raise DataError(f"no conversation to train on in {', '.join(str(f) for f in files)}"
                        + (f" ({skipped} longer than {max_tokens} tokens even with only their last exchange)"
                           if skipped else ""))
    if val_files:
        val_convs, _, vskipped, vtrimmed = tokenize(val_files)
        if not val_convs:
            raise DataError(f"validation file {val}: no conversation that fits in {max_tokens} tokens")
        train_convs, skipped, trimmed = convs, skipped + vskipped, trimmed + vtrimmed
        note = f"validation from {val}"
    elif val_share == 0:
        train_convs, val_convs, note = convs, [], "no validation"
    else:
        split = split_documents(hashes, [len(c[0]) for c in convs], val_share, seed)
        if split is None:
            train_convs, val_convs, note = convs, [], "no validation (a single distinct conversation)"
        else:
            train_convs = [convs[i] for i in split[0]]
            val_convs = [convs[i] for i in split[1]]
            note = f"validation: {len(val_convs)} of {len(convs)} conversations held out"
    _write(cache, "train", train_convs, dtype)
    if val_convs:
        _write(cache, "val", val_convs, dtype)
    count = lambda cs: (sum(len(c[0]) for c in cs), sum(sum(c[1]) for c in cs))  # noqa: E731
    (n_tok, n_asst), (v_tok, v_asst) = count(train_convs), count(val_convs)
    meta = {"key": key, "format": "chat", "train_conversations": len(train_convs),
            "val_conversations": len(val_convs), "train_tokens": n_tok, "train_assistant_tokens": n_asst,
            "val_tokens": v_tok, "val_assistant_tokens": v_asst, "trimmed": trimmed, "skipped": skipped,
            "note": note}
    _write_meta(cache, meta)
    if trimmed or skipped:
        log(f"gpt2lab: {trimmed} conversation(s) lost their oldest turns to fit {max_tokens} tokens; "
            f"{skipped} skipped (even their last exchange is longer)")
    log(f"gpt2lab: {len(train_convs)} training conversations ({n_tok:,} tokens, {n_asst:,} of them the "
        f"assistant's), {len(val_convs)} validation conversations; {note}")
    return _open(cache, meta, dtype)


def _open(cache: Path, meta: dict, dtype: np.dtype) -> ConversationData:
    train = _open_split(cache, "train", dtype)
    val = _open_split(cache, "val", dtype) if meta["val_conversations"] else None
    return ConversationData(train=train, val=val, meta=meta)


class ConversationSampler:
    """Training rows for a global sample index: one conversation per row, a seeded permutation of the
    conversations per epoch (a pure function of ``(seed, index)``, so a resumed run continues exactly)."""

    def __init__(self, split: ConversationSplit, seed: int, assistant_only: bool, pad_id: int) -> None:
        self.split, self.seed, self.assistant_only, self.pad_id = split, seed, assistant_only, pad_id
        self.n_samples = len(split)
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None

    def batch(self, first: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) for sample indices ``first .. first + count - 1``."""
        picks = []
        for r in range(count):
            epoch, pos = divmod(first + r, self.n_samples)
            if epoch != self._epoch:
                self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_samples)
                self._epoch = epoch
            picks.append(int(self._perm[pos]))
        return self.split.rows(picks, self.assistant_only, self.pad_id)
