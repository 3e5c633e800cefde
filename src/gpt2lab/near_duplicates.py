"""Near-duplicate texts: character 3-gram Jaccard similarity at or above a threshold, found without
comparing every pair.

One mechanism for ``augment`` (a new example that nearly copies a kept one is dropped:
:class:`NearDuplicateIndex`, texts one at a time) and ``review serve`` (which other candidates nearly
copy a text: :func:`find_near_duplicates`, all texts at once).

**Similarity.** A text's shingles are the character 3-grams of its normalised form (runs of whitespace
made one space, trimmed, lower case); a text shorter than three characters is its own single shingle.
Two texts are near-duplicates when ``|A ∩ B| / |A ∪ B| >= threshold`` (Jaccard).

**Few texts** (at most :data:`EXHAUSTIVE_PAIRS` pairs) are compared pair by pair: exact.

**More texts** go through MinHash and locality-sensitive hashing, the standard way (Broder 1997; Leskovec,
Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3), here in a few numpy operations over all texts at
once. Why not ``datasketch`` (the well-kept library for it; its MinHashLSH is the same method): it hashes
shingle by shingle in Python (SHA-1, then one affine permutation per bin), so its signatures alone cost
about 20 times ours (5,000 texts of 60 words: 15 s against 0.8 s for the whole search here, rough, on a
shared 2-core machine; a 100,000-item review file would take minutes again, the slowness this module
removes); its buckets are unbounded (look-alike texts would make every query return thousands of
candidates, so the bounds below would still have to be written here); and it requires scipy, which
``augment`` (base install) does not otherwise need:

* a signature of :data:`BINS` minimums per text by one-permutation hashing (Li, Owen & Zhang 2012: one
  64-bit hash per shingle, its top bits pick a bin), empty bins filled by rotation densification
  (Shrivastava & Li 2014); two texts agree on a bin with probability about their Jaccard similarity;
* ``b`` bands of ``r`` bins: texts that agree on a whole band are candidates. ``r`` is the largest for
  which a pair *at* the threshold shares some band with probability >= 0.98 (more similar pairs: more);
* a candidate pair whose similarity, estimated from the 2 low bits of each bin (Li & König 2010), is
  below ``threshold - 0.2`` is dropped (it is then almost surely far below the threshold), the others
  are compared exactly.

Every pair reported is a near-duplicate (the last step is exact); a pair at the threshold is missed with
probability about 2% (at 0.7: 1 in 1,000 pairs of similarity 0.75, fewer above). **Bounded**: in a
band many texts share (look-alike texts), a text is paired only with its :data:`WINDOW` neighbours on
each side, and a text takes part in at most :data:`MAX_CHECKS` exact comparisons and stops once it has
:data:`MAX_FOUND` near-duplicates, so the work grows linearly with the number of texts (``comparisons``
and ``candidates`` say how much was done).
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

BINS = 128  # MinHash signature length (bins of the one-permutation hash)
_BIN_BITS = 7  # log2(BINS): the top bits of a shingle's hash pick its bin
_VALUE_BITS = 25  # the next bits are its value; a signature entry is value | densification distance << 25
_EMPTY = np.uint32(2**32 - 1)
EXHAUSTIVE_PAIRS = 20_000  # up to this many pairs (about 200 texts), compare them all: exact
WINDOW = 8  # neighbours on each side a text is paired with in one band's sorted keys
MAX_FOUND = 8  # a text found to have this many near-duplicates is compared no further
MAX_CHECKS = 32  # exact comparisons a text takes part in, at most
ESTIMATE_MARGIN = 0.2  # candidates whose signatures agree on less than threshold - this are dropped
RECALL_AT_THRESHOLD = 0.98  # the bands find a pair exactly at the threshold with this probability
_CHUNK_CHARS = 1 << 20  # texts are hashed in chunks of about this many characters (bounded memory)


def normalize(text: str) -> str:
    """``text`` with runs of whitespace made one space, trimmed and lower-cased."""
    return " ".join(text.split()).lower()  # str.split's whitespace is regex \s's: the same, twice as fast


def shingles(text: str, n: int = 3) -> frozenset[str]:
    """Character ``n``-grams of the normalized text (the text itself when shorter)."""
    t = normalize(text)
    return frozenset(t[i:i + n] for i in range(len(t) - n + 1)) if len(t) >= n else frozenset([t])


def jaccard(a: frozenset, b: frozenset) -> float:
    """``|a ∩ b| / |a ∪ b|`` (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def check_threshold(threshold: float) -> float:
    if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0 < threshold <= 1:
        raise ValueError(f"similarity must be in (0, 1] (1 = exact duplicates only), got {threshold!r}")
    return float(threshold)


# -- shingles as integers, and signatures ----------------------------------------------------------------
def _codes(normalized: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(codes, owners): every shingle of every text as a uint64 (three code points of 21 bits: no two
    3-grams share a code; a text shorter than three characters gets one code with the top bit set) and
    the index of its text."""
    lengths = np.fromiter(map(len, normalized), dtype=np.int64, count=len(normalized))
    points = np.frombuffer("".join(normalized).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    owners = np.repeat(np.arange(len(normalized)), lengths)
    ends = np.cumsum(lengths)
    if len(points) >= 3:
        grams = (points[:-2] << np.uint64(42)) | (points[1:-1] << np.uint64(21)) | points[2:]
        keep = np.arange(len(points) - 2) + 2 < ends[owners[:-2]]  # the 3-gram ends inside its own text
        codes, owner_of = grams[keep], owners[:-2][keep]
    else:
        codes, owner_of = np.zeros(0, np.uint64), np.zeros(0, np.int64)
    short = np.flatnonzero((lengths > 0) & (lengths < 3))
    if len(short):
        first = points[ends[short] - lengths[short]]
        second = np.where(lengths[short] == 2, points[np.minimum(ends[short] - 1, len(points) - 1)], 0)
        extra = (np.uint64(1) << np.uint64(63)) | (lengths[short].astype(np.uint64) << np.uint64(42)) \
            | (first << np.uint64(21)) | second.astype(np.uint64)
        codes, owner_of = np.concatenate([codes, extra]), np.concatenate([owner_of, short])
    return codes, owner_of


def _code_set(normalized: str) -> frozenset[int]:
    """The shingles of one normalized text as the integer codes of :func:`_codes` (the same Jaccard as
    :func:`shingles`)."""
    points = list(map(ord, normalized))
    if not points:
        return frozenset()
    if len(points) < 3:
        second = points[1] if len(points) == 2 else 0
        return frozenset([(1 << 63) | (len(points) << 42) | (points[0] << 21) | second])
    return frozenset((a << 42) | (b << 21) | c for a, b, c in zip(points, points[1:], points[2:]))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a 64-bit hash of each value (uint64 arithmetic wraps, as it must)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def signatures(normalized: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(``[n, BINS]`` uint32 MinHash signatures, ``[n]`` bool: the text has shingles) of normalized texts,
    by one-permutation hashing with rotation densification, a chunk of texts at a time."""
    out = np.empty((len(normalized), BINS), np.uint32)
    present = np.zeros(len(normalized), bool)
    start = 0
    while start < len(normalized):
        stop, size = start, 0
        while stop < len(normalized) and (size < _CHUNK_CHARS or stop == start):
            size += len(normalized[stop]) + 1
            stop += 1
        codes, owners = _codes(normalized[start:stop])
        hashed = _mix(codes)
        flat = owners * BINS + (hashed >> np.uint64(64 - _BIN_BITS)).astype(np.int64)
        values = ((hashed >> np.uint64(64 - _BIN_BITS - _VALUE_BITS)) & np.uint64((1 << _VALUE_BITS) - 1))
        sig = np.full((stop - start) * BINS, _EMPTY, np.uint32)
        np.minimum.at(sig, flat, values.astype(np.uint32))
        sig = sig.reshape(-1, BINS)
        # an empty bin takes the next filled bin's value (circularly), marked with the distance
        filled = sig != _EMPTY
        twice = np.concatenate([sig, sig], axis=1)
        where = np.where(np.concatenate([filled, filled], axis=1), np.arange(2 * BINS), 2 * BINS)
        nearest = np.minimum.accumulate(where[:, ::-1], axis=1)[:, ::-1][:, :BINS]
        has = filled.any(axis=1)
        nearest = np.where(has[:, None], nearest, np.arange(BINS))
        distance = (nearest - np.arange(BINS)).astype(np.uint32)
        out[start:stop] = np.take_along_axis(twice, nearest, axis=1) | (distance << np.uint32(_VALUE_BITS))
        present[start:stop] = has
        start = stop
    return out, present


def bands_for(threshold: float) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (the fewest unrelated candidates) for which a pair of
    Jaccard ``threshold`` agrees on a whole band of some of the ``BINS // rows`` bands with probability
    >= ``RECALL_AT_THRESHOLD``."""
    for rows in range(BINS, 0, -1):
        bands = BINS // rows
        if 1 - (1 - threshold ** rows) ** bands >= RECALL_AT_THRESHOLD:
            return bands, rows
    return BINS, 1


def band_keys(sigs: np.ndarray, threshold: float) -> np.ndarray:
    """``[n, bands]`` uint64: a hash of each band of each signature."""
    bands, rows = bands_for(threshold)
    keys = np.zeros((len(sigs), bands), np.uint64)
    for r in range(rows):
        keys = _mix(keys ^ sigs[:, r:bands * rows:rows].astype(np.uint64))
    return keys


def sketches(sigs: np.ndarray) -> np.ndarray:
    """``[n, 4]`` uint64: the lowest 2 bits of each of a signature's 128 bins, packed (b-bit minwise
    hashing, Li & König 2010): enough to tell a candidate far below the threshold at a fraction of the cost
    of comparing whole signatures."""
    packed = np.zeros((len(sigs), BINS // 32), np.uint64)
    for k in range(32):  # bin w * 32 + k goes to bits 2k, 2k+1 of word w
        packed |= (sigs[:, k::32] & np.uint32(3)).astype(np.uint64) << np.uint64(2 * k)
    return packed


_FIELD_LOW_BITS = np.uint64(0x5555555555555555)
_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


def _estimate(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Estimated Jaccard similarity of pairs of sketches (rows of ``a`` and ``b``): two bins agree on their
    2 low bits with probability J + (1 - J) / 4."""
    differ = a ^ b
    differ = (differ | (differ >> np.uint64(1))) & _FIELD_LOW_BITS  # one bit per differing 2-bit field
    if hasattr(np, "bitwise_count"):  # numpy >= 2
        mismatches = np.bitwise_count(differ).sum(axis=-1, dtype=np.int64)
    else:
        mismatches = _POPCOUNT[differ.view(np.uint8)].reshape(*differ.shape[:-1], -1).sum(axis=-1, dtype=np.int64)
    agree = 1 - mismatches / BINS
    return (agree - 0.25) / 0.75


# -- all texts at once -------------------------------------------------------------------------------------
@dataclass
class NearDuplicates:
    """What :func:`find_near_duplicates` found, and the work it took."""

    found: list[list[int]]  # for each text, the indices of texts found to be near-duplicates of it (sorted)
    comparisons: int  # exact Jaccard comparisons
    candidates: int  # pairs whose signatures were compared (0 when every pair was compared exactly)
    exhaustive: bool  # every pair was compared (few texts)


def find_near_duplicates(texts: Sequence[str], threshold: float,
                         groups: Sequence[int] | None = None) -> NearDuplicates:
    """For each text, the texts whose 3-gram Jaccard similarity to it is >= ``threshold``; texts of the same
    ``groups[i]`` are never paired; blank texts have none. Exact for up to ``EXHAUSTIVE_PAIRS`` pairs,
    MinHash LSH beyond (see the module docstring: every pair reported is a near-duplicate, a text reports at
    least ``MAX_FOUND`` when it has that many, and the work is linear in ``len(texts)``)."""
    threshold = check_threshold(threshold)
    n = len(texts)
    group = np.asarray(groups if groups is not None else np.arange(n))
    norms = [normalize(t) for t in texts]
    live = [i for i in range(n) if norms[i]]
    found: list[set[int]] = [set() for _ in range(n)]
    sets: dict[int, frozenset[int]] = {}

    def shingle_set(i: int) -> frozenset[int]:
        if i not in sets:
            sets[i] = _code_set(norms[i])
        return sets[i]

    if len(live) * (len(live) - 1) // 2 <= EXHAUSTIVE_PAIRS:
        comparisons = 0
        for x, i in enumerate(live):
            a = shingle_set(i)
            for j in live[x + 1:]:
                b = shingle_set(j)
                if group[i] == group[j] or not threshold * len(a) <= len(b) <= len(a) / threshold:
                    continue  # Jaccard >= t needs t|A| <= |B| <= |A|/t
                comparisons += 1
                if jaccard(a, b) >= threshold:
                    found[i].add(j)
                    found[j].add(i)
        return NearDuplicates([sorted(f) for f in found], comparisons, 0, True)

    index = np.asarray(live)
    sigs, present = signatures([norms[i] for i in live])
    index, sigs = index[present], sigs[present]
    keys, sketch = band_keys(sigs, threshold), sketches(sigs)
    del sigs
    owner = group[index]
    kept, scores, candidates = [], [], 0
    for band in range(keys.shape[1]):
        order = np.argsort(keys[:, band], kind="stable")
        sorted_keys = keys[order, band]
        for step in range(1, WINDOW + 1):  # each text with its WINDOW neighbours in the band's order
            same = np.flatnonzero(sorted_keys[step:] == sorted_keys[:-step])
            if not len(same):
                continue
            a, b = order[same], order[same + step]
            apart = owner[a] != owner[b]
            a, b = a[apart], b[apart]
            candidates += len(a)
            estimate = _estimate(sketch[a], sketch[b])
            keep = estimate >= threshold - ESTIMATE_MARGIN
            kept.append(np.stack([np.minimum(a, b)[keep], np.maximum(a, b)[keep]], axis=1))
            scores.append(estimate[keep])
    comparisons = 0
    if kept:
        pairs, first = np.unique(np.concatenate(kept), axis=0, return_index=True)
        pairs = pairs[np.argsort(-np.concatenate(scores)[first], kind="stable")]  # the likeliest first
        checks = np.zeros(len(index), np.int64)
        for x, y in pairs.tolist():
            i, j = int(index[x]), int(index[y])
            if checks[x] >= MAX_CHECKS or checks[y] >= MAX_CHECKS or (len(found[i]) >= MAX_FOUND
                                                                        and len(found[j]) >= MAX_FOUND):
                continue
            checks[x] += 1
            checks[y] += 1
            comparisons += 1
            if jaccard(shingle_set(i), shingle_set(j)) >= threshold:
                found[i].add(j)
                found[j].add(i)
    return NearDuplicates([sorted(f) if f else [] for f in found], comparisons, candidates, False)


# -- one text at a time ------------------------------------------------------------------------------------
class NearDuplicateIndex:
    """Texts seen so far (``add``); ``check`` says whether a new one duplicates or nearly duplicates one of
    them (3-gram Jaccard >= ``threshold``; ``threshold=1`` finds exact duplicates only).

    Exact while it holds at most ~200 texts (every one compared, within the sizes Jaccard >= t allows:
    ``t|A| <= |B| <= |A|/t``); beyond, candidates come from MinHash LSH buckets (the most recent
    ``2 * WINDOW`` texts of each of the new text's bands) as in :func:`find_near_duplicates`.
    ``comparisons`` counts the exact comparisons made.
    """

    def __init__(self, threshold: float) -> None:
        self.threshold = check_threshold(threshold)
        self.comparisons = 0
        self._exact: set[str] = set()
        self._sets: list[frozenset[int]] = []
        self._sketches: list[np.ndarray] = []
        self._buckets: list[dict[int, deque[int]]] = []
        self._exhaustive = math.isqrt(2 * EXHAUSTIVE_PAIRS)

    def add(self, text: str) -> None:
        norm = normalize(text)
        self._exact.add(norm)
        if self.threshold >= 1 or not norm:
            return
        sig, present = signatures([norm])
        if not present[0]:
            return
        self._sets.append(_code_set(norm))
        self._sketches.append(sketches(sig)[0])
        keys = band_keys(sig, self.threshold)[0].tolist()
        if not self._buckets:
            self._buckets = [defaultdict(lambda: deque(maxlen=2 * WINDOW)) for _ in keys]
        for band, key in enumerate(keys):
            self._buckets[band][key].append(len(self._sets) - 1)

    def check(self, text: str) -> str | None:
        """``"duplicate"``, ``"near_duplicate"`` or None."""
        norm = normalize(text)
        if norm in self._exact:
            return "duplicate"
        if self.threshold >= 1 or not norm or not self._sets:
            return None
        new = _code_set(norm)
        if len(self._sets) <= self._exhaustive:
            others: Sequence[int] = range(len(self._sets))
        else:
            sig, _ = signatures([norm])
            keys = band_keys(sig, self.threshold)[0].tolist()
            near = sorted({i for band, key in enumerate(keys) for i in self._buckets[band].get(key, ())})
            estimate = _estimate(np.stack([self._sketches[i] for i in near]), sketches(sig)[0]) if near \
                else np.zeros(0)
            others = [near[k] for k in np.argsort(-estimate, kind="stable")[:MAX_CHECKS]
                      if estimate[k] >= self.threshold - ESTIMATE_MARGIN]
        for i in others:
            other = self._sets[i]
            if not self.threshold * len(new) <= len(other) <= len(new) / self.threshold:
                continue
            self.comparisons += 1
            if jaccard(new, other) >= self.threshold:
                return "near_duplicate"
        return None
