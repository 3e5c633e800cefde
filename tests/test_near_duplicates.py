"""gpt2lab.near_duplicates: the near-duplicate check of `augment` and `review serve`, exact for few texts,
MinHash LSH beyond, with work linear in the number of texts (asserted on the comparisons made, not on time)."""

from __future__ import annotations

import itertools
import random
import time

import pytest

from gpt2lab import near_duplicates as nd


def zipf_texts(rng: random.Random, n: int, words: int = 20000) -> list[str]:
    """Made-up sentences with English's word-frequency shape (so unrelated texts share common 3-grams)."""
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(words)]
    cumulative = list(itertools.accumulate(1 / (i + 1) for i in range(words)))
    return [" ".join(rng.choices(vocab, cum_weights=cumulative, k=rng.randint(8, 40))) for _ in range(n)]


def edited(rng: random.Random, text: str) -> str:
    """A near-copy: about one word in ten replaced, the case and spacing changed."""
    words = text.split()
    for _ in range(max(1, len(words) // 10)):
        words[rng.randrange(len(words))] = rng.choice(["x", "yes", "nope", "again"])
    return "  ".join(words).upper()


def exact_pairs(texts: list[str], threshold: float, groups: list[int] | None = None) -> set[tuple[int, int]]:
    sets = [nd.shingles(t) if t.strip() else None for t in texts]
    return {(i, j) for i in range(len(texts)) for j in range(i + 1, len(texts))
            if sets[i] and sets[j] and (groups is None or groups[i] != groups[j])
            and nd.jaccard(sets[i], sets[j]) >= threshold}


def pairs_of(found: list[list[int]]) -> set[tuple[int, int]]:
    return {(i, j) for i, near in enumerate(found) for j in near if i < j}


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.9])
def test_lsh_finds_what_comparing_every_pair_finds(threshold):
    """Past the exhaustive size the candidates come from MinHash LSH: on 2,000 texts with 500 edited copies
    it finds every near-duplicate pair all-pairs comparison finds, reports none that is not one, and makes
    a small fraction of the 2 million comparisons."""
    rng = random.Random(0)
    base = zipf_texts(rng, 1500)
    texts = base + [edited(rng, t) for t in base[:500]]
    rng.shuffle(texts)
    result = nd.find_near_duplicates(texts, threshold)
    assert not result.exhaustive
    want = exact_pairs(texts, threshold)
    assert len(want) > 50 and pairs_of(result.found) == want
    assert result.comparisons < 2 * len(texts)


def test_few_texts_are_compared_exactly():
    texts = ["the cat sat", "The  cat sat!", "a dog", "", "ab", "AB"]
    result = nd.find_near_duplicates(texts, 0.5, groups=[0, 1, 2, 3, 4, 4])
    assert result.exhaustive and result.candidates == 0
    assert result.found == [[1], [0], [], [], [], []]  # "ab"/"AB" are the same group: never paired


@pytest.mark.slow
def test_a_100000_item_review_file_is_screened_with_linear_work(tmp_path):
    """`review serve` screened every pair of candidates: 3,000 look-alike items took 13-22 s and 969 MB,
    20,000 distinct ones 5.5 minutes, and a review file may hold 100,000. Now: 200,000 texts, planted
    near-copies all found, a bounded number of comparisons; and the real start-up path on that file."""
    rng = random.Random(1)
    n_items = 100_000
    texts = zipf_texts(rng, 2 * n_items)
    groups = [i // 2 for i in range(len(texts))]  # the two candidates of an item
    planted = rng.sample(range(0, len(texts), 2), 300)
    for i in planted:  # item i's first candidate nearly copies another item's
        texts[i] = edited(rng, texts[(i + 2 * 7919) % len(texts)])
    result = nd.find_near_duplicates(texts, 0.7, groups=groups)
    bands, _ = nd.bands_for(0.7)
    assert result.candidates <= len(texts) * bands * nd.WINDOW  # each text: WINDOW neighbours per band
    assert result.comparisons <= len(texts) * nd.MAX_CHECKS // 2
    assert result.comparisons < len(texts) // 10  # in fact a few thousand, for 2 * 10^10 pairs
    found = pairs_of(result.found)
    hits = sum((min(i, j), max(i, j)) in found for i in planted for j in [(i + 2 * 7919) % len(texts)])
    assert hits >= 0.98 * len(planted)
    for i, near in enumerate(result.found):  # every pair reported is one
        for j in near[:2]:
            assert nd.jaccard(nd.shingles(texts[i]), nd.shingles(texts[j])) >= 0.7

    # the same texts as a review file, through what `review serve` does before it listens
    from gpt2lab.review.app import create_app
    from gpt2lab.review.reviewset import Candidate, Item, ReviewSet, write_review_set

    items = [Item(f"i{k}", "p", [Candidate("a", texts[2 * k]), Candidate("b", texts[2 * k + 1])])
             for k in range(n_items)]
    review = write_review_set(ReviewSet("pairwise", items, sources={"a": {}, "b": {}}), tmp_path / "big.jsonl")
    start = time.perf_counter()
    app = create_app(review, tmp_path / "log.jsonl")
    print(f"review serve's start-up on {n_items} items: {time.perf_counter() - start:.1f} s")  # reported, not asserted
    assert app.title == "gpt2lab review"


def test_look_alike_texts_are_bounded_too():
    """6,000 texts that all nearly copy each other: 18 million true pairs. Each text takes part in at most
    MAX_CHECKS comparisons and still gets near-duplicates to show."""
    texts = [f"the quick brown fox number {i} jumps over the lazy dog again and again" for i in range(6000)]
    result = nd.find_near_duplicates(texts, 0.7, groups=[i // 2 for i in range(6000)])
    assert result.comparisons <= len(texts) * nd.MAX_CHECKS // 2
    assert all(len(near) >= 5 for near in result.found)


def test_the_index_of_augment_checks_new_texts_with_bounded_work():
    rng = random.Random(2)
    texts = zipf_texts(rng, 1200)
    index = nd.NearDuplicateIndex(0.7)
    for t in texts:
        index.add(t)
    assert index.check(texts[5].upper()) == "duplicate"
    before = index.comparisons
    assert [index.check(edited(rng, t)) for t in texts[:50]].count("near_duplicate") >= 49
    assert [index.check(t) for t in zipf_texts(random.Random(3), 50)].count(None) == 50
    assert index.comparisons - before <= 100 * nd.MAX_CHECKS
    with pytest.raises(ValueError, match="similarity must be in"):
        nd.NearDuplicateIndex(1.5)
