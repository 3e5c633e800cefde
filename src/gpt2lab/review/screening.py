"""Automatic pre-screening shown beside each candidate: how repetitive it is, which other candidates of
the set nearly duplicate it, and which blocklist entries it contains. It informs a reviewer; it
decides nothing.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..evaluation.text import repeated_ngram_rate
from ..near_duplicates import find_near_duplicates, normalize
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


def screen_texts(keys: Sequence[str], texts: Sequence[str], *, blocklist: Sequence[str] = (),
                 similarity: float = 0.7, ngram: int = 3) -> list[Screen]:
    """A :class:`Screen` per text. ``keys[i]`` names the item of ``texts[i]`` (near-duplicates are listed
    by key, and never within the same key); ``similarity``: character 3-gram Jaccard threshold.

    Near-duplicates come from :func:`gpt2lab.near_duplicates.find_near_duplicates`: exact for a few hundred
    texts, MinHash LSH beyond, in time linear in the number of texts (100,000 items start in seconds;
    comparing all pairs took minutes for 20,000, and look-alike texts filled the memory).
    """
    if not isinstance(similarity, (int, float)) or isinstance(similarity, bool) or not 0 < similarity <= 1:
        raise ValueError(f"similarity must be in (0, 1], got {similarity!r}")
    pattern = blocklist_pattern(blocklist)
    ids: dict[str, int] = {}
    groups = [ids.setdefault(k, len(ids)) for k in keys]
    nears = find_near_duplicates(texts, similarity, groups=groups).found
    out = []
    for i, text in enumerate(texts):
        found: list[str] = []
        if pattern is not None:
            for m in pattern.finditer(text):
                word = re.sub(r"\s+", " ", m.group(0).lower())
                if word not in found:
                    found.append(word)
        near = sorted({keys[j] for j in nears[i]})
        out.append(Screen(repeated_ngram_rate([text], ngram), near[:MAX_SHOWN], found[:MAX_SHOWN]))
    return out
