"""Sliding-window perplexity of text files (the Hugging Face guide's definition) and bits per byte."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..readers import read_text, split_text
from .common import ModelLike, as_generator, progress_bar
from .scoring import DEFAULT_BATCH_TOKENS, Window, perplexity_of, score_windows, sliding_windows

if TYPE_CHECKING:
    from ..generation import Generator


@dataclass
class DocumentPerplexity:
    """Figures for one text (a file or a string)."""

    name: str
    perplexity: float
    tokens: int  # tokens scored (every token but the first; fewer when stride == block_size)
    nll: float  # total negative log-likelihood of the scored tokens, in nats
    bytes: int  # UTF-8 bytes of the text
    bits_per_byte: float  # nll in bits / bytes: comparable across tokenizers


@dataclass
class PerplexityResult:
    """Overall and per-document perplexity; ``to_dict()`` is what ``--json`` prints."""

    perplexity: float
    tokens: int
    nll: float
    bytes: int
    bits_per_byte: float
    model: str
    block_size: int
    stride: int
    files: list[DocumentPerplexity] = field(default_factory=list)
    quantization: str | None = None  # the model's weight quantization ("int8", "bf16", "int4"), None as stored

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bits_per_byte(nll: float, n_bytes: int) -> float:
    return nll / math.log(2) / n_bytes if n_bytes else float("nan")


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content (BOM dropped), with errors that name the file and line."""
    return read_text(path)


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of a text of any length, tokenized in bounded pieces (one huge string would make the
    tokenizer hold about 100 bytes per character at once)."""
    ids: list[int] = []
    for part in tokenizer.encode_batch(list(split_text(text))):
        ids += part
    return ids


def perplexity(texts: str | Sequence[str] | None = None, *, files: Sequence[str | Path] | None = None,
               model: ModelLike = None, block_size: int | None = None, stride: int | None = None,
               batch_tokens: int = DEFAULT_BATCH_TOKENS, names: Sequence[str] | None = None,
               progress: bool = False, device: str = "auto", quantization: str | None = None) -> PerplexityResult:
    """Perplexity of texts (strings, or ``files`` read as UTF-8) as the Hugging Face guide computes it.

    ``block_size``: tokens per window (default: the model's context, ``n_positions``). ``stride``:
    tokens between window starts (default ``block_size // 2``, as in the guide; ``stride ==
    block_size`` gives disjoint windows, faster but each window starts without context). Every text is
    windowed on its own; windows of all texts run together in batches of about ``batch_tokens`` tokens.
    Overall figures pool the tokens of all texts. ``quantization`` (``"int8"``, ``"int4"``, ``"bf16"``) applies
    when ``model`` is loaded here (see :func:`gpt2lab.load`).
    """
    gen = as_generator(model, device, quantization)
    docs_text: list[str] = []
    doc_names: list[str] = []
    if texts is not None:
        texts = [texts] if isinstance(texts, str) else list(texts)
        docs_text += texts
        doc_names += list(names) if names is not None else [f"text{i}" for i in range(len(texts))]
    for path in files or []:
        docs_text.append(read_text_file(path))
        doc_names.append(str(path))
    if not docs_text:
        raise ValueError("nothing to evaluate: give texts or files")
    if len(doc_names) != len(docs_text):
        raise ValueError(f"names has {len(doc_names)} entries for {len(docs_text)} texts")

    block_size, stride = window_settings(gen.config.n_positions, block_size, stride, batch_tokens)
    docs = score_documents(gen, docs_text, doc_names, block_size=block_size, stride=stride,
                           batch_tokens=batch_tokens, progress=progress)
    return combine(docs, model=gen.name, block_size=block_size, stride=stride, quantization=gen.quantization)


def window_settings(n_positions: int, block_size: int | None, stride: int | None,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS) -> tuple[int, int]:
    """``(block_size, stride)`` checked, with their defaults (the model's context ``n_positions``, half of it).
    Raises ValueError naming the parameter and its range."""
    block_size = n_positions if block_size is None else block_size
    if not isinstance(block_size, int) or not 2 <= block_size <= n_positions:
        raise ValueError(f"block_size must be an integer in [2, {n_positions}] (the model's context), "
                         f"got {block_size!r}")
    stride = max(1, block_size // 2) if stride is None else stride
    if not isinstance(stride, int) or not 1 <= stride <= block_size:
        raise ValueError(f"stride must be an integer in [1, block_size={block_size}], got {stride!r}")
    if not isinstance(batch_tokens, int) or batch_tokens < 1:
        raise ValueError(f"batch_tokens must be an integer >= 1, got {batch_tokens!r}")
    return block_size, stride


def score_documents(gen: Generator, texts: Sequence[str], names: Sequence[str], *, block_size: int, stride: int,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = False) -> list[DocumentPerplexity]:
    """Each text's figures (windowed on its own; settings checked by :func:`window_settings`). A text's
    figures do not depend on the other texts scored with it, bit for bit (see
    :func:`~.scoring.score_windows`): :class:`gpt2lab.ray.PerplexityScorer` scores a corpus's documents on
    Ray actors with this and :func:`combine` gives the one-process figures. Raises ValueError for a text of
    fewer than 2 tokens."""
    docs = [_encode(gen.tokenizer, text) for text in texts]
    for name, ids in zip(names, docs):
        if len(ids) < 2:
            raise ValueError(f"{name}: has {len(ids)} token(s); perplexity needs at least 2")
    windows = [Window(d, *w) for d, ids in enumerate(docs) for w in sliding_windows(len(ids), block_size, stride)]
    total = sum(w.end - w.first for w in windows)
    with progress_bar(total, "perplexity", progress) as advance:
        nlls, counts = score_windows(gen.model, docs, windows, batch_tokens=batch_tokens, on_progress=advance)
    return [document_perplexity(name, nll, count, len(text.encode("utf-8")))
            for name, text, nll, count in zip(names, texts, nlls, counts)]


def document_perplexity(name: str, nll: float, tokens: int, n_bytes: int) -> DocumentPerplexity:
    """One document's figures from its NLL sum (nats), scored tokens and UTF-8 bytes."""
    return DocumentPerplexity(name=name, perplexity=perplexity_of(nll, tokens), tokens=tokens, nll=nll,
                              bytes=n_bytes, bits_per_byte=_bits_per_byte(nll, n_bytes))


def combine(docs: Sequence[DocumentPerplexity], *, model: str, block_size: int, stride: int,
            quantization: str | None = None) -> PerplexityResult:
    """The corpus figures of documents scored separately: NLL, tokens and bytes summed (in document order),
    then perplexity ``exp(NLL / tokens)`` and bits per byte ``NLL / ln 2 / bytes``; exactly what one
    :func:`perplexity` call over all of them gives."""
    nll, tokens, n_bytes = sum(d.nll for d in docs), sum(d.tokens for d in docs), sum(d.bytes for d in docs)
    return PerplexityResult(perplexity=perplexity_of(nll, tokens), tokens=tokens, nll=nll, bytes=n_bytes,
                            bits_per_byte=_bits_per_byte(nll, n_bytes), model=model, block_size=block_size,
                            stride=stride, files=list(docs), quantization=quantization)
