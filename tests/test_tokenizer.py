"""Tokenizer: identical ids to transformers' GPT2TokenizerFast and tiktoken, lossless round trip,
and a streaming detokenizer that never emits a broken UTF-8 character."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from gpt2lab.tokenizer import Tokenizer, TokenizerError, _unicode_to_byte, gpt2_tokenizer_dir


def mixed_corpus(size: int = 300_000) -> list[str]:
    """A few hundred KB of English, code, emoji, CJK, accents and whitespace runs."""
    import inspect
    import json as json_mod
    import textwrap

    rng = random.Random(0)
    pieces = [inspect.getsource(textwrap), inspect.getsource(json_mod.decoder), inspect.getsource(random)]
    english = ("It was the best of times, it was the worst of times; it was the age of wisdom. "
               "Don't you think we'll need 3.14159 apples, 42 pears & $1,000,000?! ")
    emoji = "😀🚀👍🏽👨‍👩‍👧‍👦🇫🇷❤️✨🔥🤖"
    cjk = "你好世界，今天天气很好。日本語のテキストも混ぜます。한국어 문장도 있습니다。"
    other = "Ça va? Größe — naïve café. Привет, мир! مرحبا بالعالم. ελληνικά. ॐ नमः"
    words = (english + emoji + cjk + other).split(" ")
    while sum(map(len, pieces)) < size:
        n = rng.randint(1, 40)
        chunk = " ".join(rng.choice(words) for _ in range(n))
        chunk += rng.choice(["", "\n", "\n\n", "   ", "\t\t", " \n  \n", "    \n"]) * rng.randint(1, 3)
        pieces.append(chunk)
    return pieces


def test_hello_world(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.eos_token_id == 50256 and tokenizer.vocab_size == 50257
    assert tokenizer.decode([15496, 995]) == "Hello world"


def test_matches_transformers_and_tiktoken(tokenizer):
    import tiktoken
    from transformers import GPT2TokenizerFast

    hf = GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir())
    vocab = json.loads((gpt2_tokenizer_dir() / "vocab.json").read_text(encoding="utf-8"))
    to_byte = _unicode_to_byte()
    ranks = {bytes(to_byte[c] for c in token): idx for token, idx in vocab.items() if token != "<|endoftext|>"}
    enc = tiktoken.Encoding(
        name="gpt2-local",
        pat_str=r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
        mergeable_ranks=ranks, special_tokens={"<|endoftext|>": 50256})
    texts = mixed_corpus()
    total = sum(len(t.encode()) for t in texts)
    assert total > 250_000
    ours = tokenizer.encode_batch(texts)
    for text, ids in zip(texts, ours):
        assert ids == tokenizer.encode(text)
        assert ids == hf(text)["input_ids"]
        assert ids == enc.encode_ordinary(text)
        assert tokenizer.decode(ids) == text


def test_detokenizer_streams_whole_characters(tokenizer):
    text = "emoji 👨‍👩‍👧‍👦 and 你好世界, then 🇫🇷!"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters really are split across tokens
    detok = tokenizer.detokenizer()
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    for d in deltas:
        assert "\ufffd" not in d


def test_detokenizer_equals_decode_on_invalid_tail(tokenizer):
    ids = tokenizer.encode("你好")[:-1]  # cut inside a character
    detok = tokenizer.detokenizer()
    streamed = "".join(detok.push(i) for i in ids) + detok.flush()
    assert streamed == tokenizer.decode(ids)
    assert streamed.endswith("\ufffd")


def test_tokenizer_json_and_missing_files(tmp_path, tokenizer):
    from transformers import GPT2TokenizerFast

    GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir()).save_pretrained(tmp_path / "fast")
    via_json = Tokenizer.from_dir(tmp_path / "fast")
    assert via_json.encode("Hello world 😀") == tokenizer.encode("Hello world 😀")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"vocab\.json: file not found"):
        Tokenizer.from_dir(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not valid JSON: Expecting property name"):
        Tokenizer.from_dir(broken)


def test_byte_table_covers_all_bytes():
    assert sorted(_unicode_to_byte().values()) == list(range(256))
    assert Path(gpt2_tokenizer_dir(), "merges.txt").is_file()
