"""GPT-2 byte-level BPE through the ``tokenizers`` library, plus a streaming detokenizer.

Byte-level BPE can split one UTF-8 character (emoji, CJK) across several tokens, so decoding token by
token would emit broken characters. :class:`IncrementalDetokenizer` keeps the bytes of an unfinished
character until the rest arrives; its output concatenates to exactly :meth:`Tokenizer.decode`.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache
from importlib import resources
from pathlib import Path

import tokenizers

from .errors import TokenizerError

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt")  # any of them present: the folder has its own


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode``: the printable stand-in character of every byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def gpt2_tokenizer_dir() -> Path:
    """The directory of GPT-2's own ``vocab.json`` / ``merges.txt`` shipped with the package."""
    return Path(str(resources.files("gpt2lab") / "assets" / "gpt2-tokenizer"))


_RELEASE_GIL_CHARS = 4096  # texts longer than this are encoded without holding the GIL


class Tokenizer:
    """A GPT-2 tokenizer: ``encode(str) -> list[int]``, ``decode(list[int]) -> str``."""

    def __init__(self, backend: tokenizers.Tokenizer) -> None:
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        to_byte = _unicode_to_byte()
        # str.translate + latin-1 maps each stand-in character to its byte at C speed (a per-character
        # Python loop over 50k tokens cost about 0.2 s of every start)
        as_latin1 = str.maketrans({ch: chr(b) for ch, b in to_byte.items()})
        byte_level = set(to_byte)
        table: list[bytes] = [b""] * self.vocab_size
        for token, idx in vocab.items():
            if byte_level.issuperset(token):
                table[idx] = token.translate(as_latin1).encode("latin-1")
            else:  # added tokens are stored as plain text
                table[idx] = token.encode("utf-8")
        self._token_bytes = table
        self.eos_token_id: int | None = vocab.get(EOS_TOKEN)
        # ids of the special added tokens (GPT-2: <|endoftext|>), left out of text when skip_special_tokens
        self.special_ids = frozenset(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """Load from ``tokenizer.json``, or from ``vocab.json`` + ``merges.txt``.

        Raises :class:`TokenizerError` naming the file and the problem (missing, truncated JSON, not
        a merges list) -- a broken file is never silently replaced by another tokenizer.
        """
        directory = Path(directory)
        tok_json = directory / "tokenizer.json"
        if tok_json.is_file():
            _check_json(tok_json, dict)
            try:
                backend = tokenizers.Tokenizer.from_file(str(tok_json))
            except Exception as exc:  # noqa: BLE001
                raise TokenizerError(f"{tok_json}: cannot read tokenizer ({exc})") from exc
            return cls(backend)
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        for path in (vocab, merges):
            if not path.is_file():
                raise TokenizerError(f"{path}: file not found (a GPT-2 tokenizer needs tokenizer.json, "
                                     "or vocab.json and merges.txt)")
        table = _check_json(vocab, dict)
        if not table or not all(isinstance(v, int) for v in table.values()):
            raise TokenizerError(f"{vocab}: not a BPE vocabulary (expected a JSON object of token -> id)")
        _check_merges(merges)
        try:
            model = tokenizers.models.BPE.from_file(str(vocab), str(merges))
        except Exception as exc:  # noqa: BLE001
            raise TokenizerError(f"{vocab} / {merges}: cannot read BPE files ({exc})") from exc
        backend = tokenizers.Tokenizer(model)
        backend.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = tokenizers.decoders.ByteLevel()
        if backend.token_to_id(EOS_TOKEN) is not None:  # not `in get_vocab()`: a 50k-entry dict, 25 ms
            backend.add_special_tokens([tokenizers.AddedToken(EOS_TOKEN, special=True)])
        return cls(backend)

    @classmethod
    def gpt2(cls) -> Tokenizer:
        """GPT-2's tokenizer from the files shipped with gpt2lab."""
        return cls.from_dir(gpt2_tokenizer_dir())

    # -- encoding -----------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if len(text) > _RELEASE_GIL_CHARS:
            # tokenizers' encode() holds the GIL throughout; encode_batch() lets other threads run (a
            # server's event loop goes on answering while a long prompt is tokenized on a worker)
            return self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def token_bytes(self, token_id: int) -> bytes:
        return self._token_bytes[token_id]

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return b"".join(self._token_bytes[i] for i in ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Decode ids to text; bytes that are not valid UTF-8 become U+FFFD (as HF does)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_token(self, token_id: int) -> str:
        """A readable form of one token (its bytes, invalid UTF-8 shown as U+FFFD)."""
        return self._token_bytes[token_id].decode("utf-8", errors="replace")

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)


def _check_json(path: Path, kind: type):
    """The parsed content of a tokenizer JSON file; :class:`TokenizerError` says what is wrong with it
    (the reader's message: binary, not UTF-8, not JSON or truncated, nested too deep, another type)."""
    from .readers import ReadError, read_json

    try:
        return read_json(path, expect=kind)
    except ReadError as exc:
        raise TokenizerError(f"{exc} ({path.stat().st_size} bytes)") from None


_BAD_MERGE = re.compile(r"^(?=[^\n])(?:[^ \n]*|[^ \n]* [^ \n]* [^\n]*)$", re.M)  # no space, or two or more


def _check_merges(path: Path) -> None:
    """A merges.txt: UTF-8 lines of two space-separated symbols, after an optional ``#version`` line."""
    from .readers import ReadError, read_text

    if path.stat().st_size > 1 << 28:
        raise TokenizerError(f"{path}: {path.stat().st_size:,} bytes, too large for a merges list")
    try:
        text = read_text(path)  # NUL bytes and invalid UTF-8 are errors naming the line
    except ReadError as exc:
        raise TokenizerError(str(exc)) from None
    start = text.find("\n") + 1 if text.startswith("#") else 0  # the "#version" header
    bad = _BAD_MERGE.search(text, start)
    if bad:
        number = text.count("\n", 0, bad.start()) + 1
        raise TokenizerError(f"{path}:{number}: not a BPE merge (expected two symbols separated by one space, "
                             f"got {bad.group()[:40]!r})")


class IncrementalDetokenizer:
    """Turn a stream of token ids into text deltas that never split a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became complete (possibly empty)."""
        return self._decoder.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is pending, incomplete bytes as U+FFFD."""
        return self._decoder.decode(b"", final=True)
