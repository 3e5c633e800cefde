"""A chat reply is one text, however it is read: the non-streamed ``content``, the streamed deltas joined,
and the logprob entries' ``token`` texts joined are equal (vLLM's test_chat_streaming, llama.cpp's
test_logprobs), with the whitespace GPT-2 writes around a reply (the space after ``Bot:``, a space or a
newline before the next turn) left out of all three."""

from __future__ import annotations

import pytest

openai = pytest.importorskip("openai")

from gpt2lab.generation.outputs import TokenLogprob  # noqa: E402

HELLO = 18435  # " Hello"
SPACE = 220  # " "
NEWLINE = 198  # "\n"
MESSAGES = [{"role": "user", "content": "Say hello."}]


def _read_all(client, model: str, **kwargs) -> tuple[str, str, str, str]:
    """(content, streamed text, joined logprob tokens of the whole reply, of the stream)."""
    whole = client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=2, **kwargs)
    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=2,
                                                 stream=True, **kwargs))
    content = whole.choices[0].message.content
    tokens = "".join(e.token for e in whole.choices[0].logprobs.content)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    stream_tokens = "".join(e.token for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content)
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices[0].logprobs) == \
        whole.usage.completion_tokens == len(whole.choices[0].logprobs.content)  # every token keeps its entry
    return content, streamed, tokens, stream_tokens


def test_the_reported_cases(model, client):
    # logprob tokens joined to ' Hello Hello Hello' against content 'Hello Hello Hello'
    content, streamed, tokens, stream_tokens = _read_all(client, model, max_tokens=3, temperature=0,
                                                         logit_bias={str(HELLO): 100})
    assert content == streamed == tokens == stream_tokens == "Hello Hello Hello"
    # a reply ending in whitespace: the stream kept it ('... Berkshire ' against '... Berkshire'); here the
    # text ends in a space because the kept stop string does, inside the next " Hello" token
    for stop, expected in (("o ", "Hello"), ("o Hello ", "Hello Hello")):
        content, streamed, tokens, stream_tokens = _read_all(client, model, max_tokens=4, temperature=0, stop=[stop],
                                                             logit_bias={str(HELLO): 100},
                                                             extra_body={"include_stop_str_in_output": True})
        assert content == streamed == tokens == stream_tokens == expected, stop
    # whitespace inside the reply stays: the stream gives it once text follows it
    content, streamed, tokens, stream_tokens = _read_all(client, model, max_tokens=6, temperature=3.0, seed=11,
                                                         logit_bias={str(HELLO): 9, str(NEWLINE): 9, str(SPACE): 9})
    assert content == streamed == tokens == stream_tokens
    assert content == content.strip() and any(c.isspace() for c in content), content


@pytest.mark.parametrize("seed", range(12))
def test_content_stream_and_logprob_tokens_agree(model, client, seed):
    """Sampled replies of a random model: any whitespace, stop strings of the layout, EOS, length."""
    kwargs = dict(max_tokens=12, temperature=2.0, seed=seed, logit_bias={str(SPACE): 4, str(NEWLINE): 4})
    content, streamed, tokens, stream_tokens = _read_all(client, model, **kwargs)
    assert content == streamed == tokens == stream_tokens
    assert content == content.strip()


def _entry(token: str, start: int) -> TokenLogprob:
    return TokenLogprob(0, token, -1.0, [], 1, text_span=(start, start + len(token)))


def test_reply_text_holds_trailing_whitespace_and_trims_the_edges():
    from gpt2lab.server.response_builder import ReplyText

    reply = ReplyText()
    steps = [(" ", [" "]), (" Hi", [" Hi"]), (" ", [" "]), ("\n", ["\n"]), ("there", ["there"]), (" ", [" "])]
    deltas, pieces, at = [], [], 0
    for i, (text, tokens) in enumerate(steps):
        entries = []
        for token in tokens:
            entries.append(_entry(token, at))
            at += len(token)
        delta, out = reply.push(text, entries, finished=i == len(steps) - 1)
        deltas.append(delta)
        pieces += [e.token if piece is None else piece for e, piece in out]
    assert deltas == ["", "Hi", "", "", " \nthere", ""]  # the inner whitespace comes with the text after it
    assert pieces == ["", "Hi", " ", "\n", "there", ""] and "".join(pieces) == "Hi \nthere"
    # a stop-string cut inside a token: the token's text is cut with it
    cut = ReplyText()
    delta, out = cut.push(" a.", [TokenLogprob(0, " a.\n", -1.0, [], 1, text_span=(0, 4))], finished=True)
    assert delta == "a." and [piece for _, piece in out] == ["a."]
    # a character split over two tokens: the first has no text of its own, the second the character
    split = ReplyText()
    entries = [TokenLogprob(0, "\ufffd", -1.0, [], 1, text_span=(0, 0)), TokenLogprob(1, "\ufffd", -1.0, [], 1,
                                                                                       text_span=(0, 1))]
    delta, out = split.push("\u00e9", entries, finished=True)
    assert delta == "\u00e9" and "".join(piece for _, piece in out) == "\u00e9"
