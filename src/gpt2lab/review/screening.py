"""Automatic pre-screening shown beside each candidate: how repetitive it is, which other candidates of
the set nearly duplicate it, and which blocklist entries it contains. It informs a reviewer; it
decides nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import sparse

from ..apps.augment import normalize, shingles
from ..evaluation.text import repeated_ngram_rate
from ..readers import iter_lines

MAX_BLOCKLIST_ENTRIES = 10_000
MAX_SHOWN = 5  # near-duplicates and matches listed per candidate


@dataclass
class Screen:
    repetition: float | None  # fraction of the candidate's word 3-grams that repeat an earlier one
    near_duplicates: list[str] = field(default_factory=list)  # ids of items holding a near-copy
    blocklist: list[str] = field(default_factory=list)  # entries found in the text

    def to_dict(self) -> dict:
        return {"repetition": self.repetition, "near_duplicates": self.near_duplicates, "blocklist": self.blocklist}


def read_blocklist(path: str | Path) -> list[str]:
    """Entries of a blocklist file: one word or phrase per line; blank lines and ``#`` comments skipped."""
    path = Path(path)
    try:
        lines = [line for _, line in iter_lines(path)]  # the one text reader: BOM dropped, "\n" ends a line
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: blocklist file not found") from None
    entries = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if len(entries) > MAX_BLOCKLIST_ENTRIES:
        raise ValueError(f"{path}: more than {MAX_BLOCKLIST_ENTRIES} entries")
    return entries


def blocklist_pattern(entries: Sequence[str]) -> re.Pattern | None:
    """One case-insensitive regex matching any entry as whole words (``ass`` does not match ``class``)."""
    if not entries:
        return None
    parts = sorted({re.escape(normalize(e)).replace(r"\ ", r"\s+") for e in entries}, key=len, reverse=True)
    return re.compile(r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)", re.IGNORECASE)


def _near_duplicates(keys: Sequence[str], texts: Sequence[str], similarity: float,
                     block: int = 512) -> list[set[str]]:
    """For each text, the keys of the other items holding a text with 3-gram Jaccard >= ``similarity``."""
    grams = [shingles(t) if t.strip() else frozenset() for t in texts]
    vocab: dict[str, int] = {}
    indices = [vocab.setdefault(g, len(vocab)) for gs in grams for g in gs]
    indptr = np.cumsum([0] + [len(gs) for gs in grams])
    m = sparse.csr_matrix((np.ones(len(indices), np.float64), indices, indptr), shape=(len(texts), max(len(vocab), 1)))
    sizes = np.diff(indptr).astype(np.float64)
    key_ids = np.unique(np.asarray(list(keys), dtype=object), return_inverse=True)[1] if len(keys) else np.zeros(0)
    mt = m.T.tocsc()
    out: list[set[str]] = [set() for _ in texts]
    for lo in range(0, len(texts), block):
        inter = (m[lo:lo + block] @ mt).toarray()  # exact small integers in float64
        union = sizes[lo:lo + block, None] + sizes[None, :] - inter
        with np.errstate(divide="ignore", invalid="ignore"):
            sim = np.where(union > 0, inter / union, 0.0)
        hit = (sim >= similarity) & (sizes[lo:lo + block, None] > 0) & (sizes[None, :] > 0)
        hit &= key_ids[lo:lo + block, None] != key_ids[None, :]
        for r, c in zip(*np.nonzero(hit)):
            out[lo + r].add(keys[c])
    return out


def screen_texts(keys: Sequence[str], texts: Sequence[str], *, blocklist: Sequence[str] = (),
                 similarity: float = 0.7, ngram: int = 3) -> list[Screen]:
    """A :class:`Screen` per text. ``keys[i]`` names the item of ``texts[i]`` (near-duplicates are listed
    by key, and never within the same key); ``similarity``: character 3-gram Jaccard threshold.

    Near-duplicates are found exactly, all pairs at once: the 3-gram sets as a sparse texts x 3-grams
    matrix ``M``, intersections ``M Mᵀ`` a block of rows at a time (scipy), Jaccard = |A∩B| / (|A|+|B|-|A∩B|).
    Comparing pair by pair in Python took minutes for a few thousand texts.
    """
    if not 0 < similarity <= 1:
        raise ValueError(f"similarity must be in (0, 1], got {similarity!r}")
    pattern = blocklist_pattern(blocklist)
    nears = _near_duplicates(keys, texts, similarity)
    out = []
    for i, text in enumerate(texts):
        near = nears[i]
        found: list[str] = []
        if pattern is not None:
            for m in pattern.finditer(text):
                word = re.sub(r"\s+", " ", m.group(0).lower())
                if word not in found:
                    found.append(word)
        out.append(Screen(repeated_ngram_rate([text], ngram), sorted(near)[:MAX_SHOWN], found[:MAX_SHOWN]))
    return out
