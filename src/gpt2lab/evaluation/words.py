"""How the text metrics split text into words, by script: sacrebleu's tokenizers, chosen from the text.

Whitespace does not separate words in Chinese, Japanese or Thai, so metrics that count words (BLEU's
n-grams, ROUGE, distinct-n, repetition, length) need a tokenizer that knows the script, as sacrebleu's
``--tokenize`` option provides: ``13a`` (its default, for text with spaces between words), ``zh``
(each Chinese character a word, other text as ``13a``), ``ja-mecab`` (MeCab's morphemes with the IPA
dictionary: ``pip install 'sacrebleu[ja]'``), ``char`` (every character a word) and others.

:func:`choose_tokenizer` picks one from the characters of the texts (``auto``):

- any Japanese kana -> ``ja-mecab`` (``char`` where MeCab is not installed);
- else any Chinese character -> ``zh``;
- else any Thai, Lao, Khmer, Myanmar or Tibetan letter -> ``char``;
- else ``13a``, with words split on whitespace as before (Latin, Cyrillic, Greek, Korean, Arabic, ...).

ROUGE is computed by ``rouge-score``, whose own tokenizer keeps only ``a-z0-9`` (identical Russian or
Chinese sentences score 0): for text with letters outside ASCII it gets :class:`RougeTokenizer`, the
chosen tokenizer's words case-folded, punctuation dropped. Metrics report the tokenizer they used.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from functools import cache

_NOT_WORD = re.compile(r"[\W_]+")  # what rouge-score's [^a-z0-9]+ means, for every script
AUTO = "auto"
DEFAULT = "13a"  # sacrebleu's default: words separated by whitespace, punctuation split off
# the sacrebleu tokenizers these metrics accept (flores101/200 and spm download a model: not offered)
TOKENIZERS = ("13a", "intl", "zh", "ja-mecab", "ko-mecab", "char", "none")
_EXTRAS = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}

_KANA = ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F))
_HAN = ((0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3134F))
_UNSPACED = ((0x0E00, 0x0EFF), (0x0F00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF))  # Thai, Lao, Tibetan, ...


def _in(code: int, ranges: tuple[tuple[int, int], ...]) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def ja_mecab_available() -> bool:
    """Whether sacrebleu's ``ja-mecab`` tokenizer can run (``mecab-python3`` and ``ipadic`` installed)."""
    try:
        import ipadic  # noqa: F401
        import MeCab  # noqa: F401
    except ImportError:
        return False
    return True


def choose_tokenizer(texts: Iterable[str]) -> str:
    """The sacrebleu tokenizer for ``texts``, from the scripts of their characters (see the module)."""
    han = unspaced = False
    for text in texts:
        if text.isascii():
            continue
        for ch in text:
            code = ord(ch)
            if code < 0x0E00:
                continue
            if _in(code, _KANA):
                return "ja-mecab" if ja_mecab_available() else "char"
            han = han or _in(code, _HAN)
            unspaced = unspaced or _in(code, _UNSPACED)
    return "zh" if han else "char" if unspaced else DEFAULT


def resolve(tokenize: str, texts: Iterable[str]) -> str:
    """``tokenize`` checked (``ValueError`` naming it and the choices), ``auto`` chosen from ``texts``."""
    if tokenize == AUTO:
        return choose_tokenizer(texts)
    if tokenize not in TOKENIZERS:
        raise ValueError(f"tokenize must be auto or one of {', '.join(TOKENIZERS)}, got {tokenize!r}")
    if tokenize in _EXTRAS:
        try:
            _sacrebleu_tokenizer(tokenize)
        except RuntimeError:  # sacrebleu's own "install the extra" failure
            raise ValueError(f"tokenize {tokenize!r} needs MeCab and its dictionary: pip install "
                             f"'{_EXTRAS[tokenize]}'") from None
    return tokenize


@cache
def _sacrebleu_tokenizer(name: str) -> Callable[[str], str]:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=name).tokenizer  # the tokenizer exactly as sacrebleu's BLEU applies it


def words(text: str, tokenize: str) -> list[str]:
    """``text``'s words under the sacrebleu tokenizer ``tokenize`` (a resolved name); ``13a`` splits on
    whitespace alone, as these metrics always have for text with spaces between words."""
    if tokenize == DEFAULT:
        return text.split()
    return _sacrebleu_tokenizer(tokenize)(text).split()


class RougeTokenizer:
    """``rouge-score``'s tokenizer interface (``tokenize(text) -> tokens``) for any script, made as
    rouge-score's own (lower-cased, every run of characters that are not letters or digits a separator,
    words over 3 characters Porter-stemmed with ``use_stemmer``) with Unicode letters and digits kept and
    the words of the sacrebleu tokenizer ``name`` (each Chinese character, MeCab's morphemes). On ASCII
    text it gives rouge-score's tokens."""

    def __init__(self, name: str, use_stemmer: bool = False) -> None:
        self.name = name
        self.stemmer = None
        if use_stemmer:
            from nltk.stem import porter  # rouge-score's own stemmer (nltk is its dependency)

            self.stemmer = porter.PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        if self.name not in (DEFAULT, "none"):
            text = _sacrebleu_tokenizer(self.name)(text)
        tokens = _NOT_WORD.sub(" ", text.lower()).split()
        if self.stemmer is not None:  # Porter is English: ASCII words only
            tokens = [self.stemmer.stem(t) if len(t) > 3 and t.isascii() else t for t in tokens]
        return tokens


def needs_unicode_rouge(texts: Iterable[str]) -> bool:
    """Whether ``texts`` hold letters or digits outside ASCII, which rouge-score's own tokenizer drops."""
    return any(not t.isascii() and any(not c.isascii() and c.isalnum() for c in t) for t in texts)
