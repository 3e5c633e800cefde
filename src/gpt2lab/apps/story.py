"""Story writer: drafts of any length from a premise, or a continuation of an existing text.

GPT-2 sees at most ``n_positions`` tokens (1024). A longer story is written in chunks; each chunk
is generated from a sliding window made of the premise (always kept, it is what the story is about)
followed by the most recent tokens of the story. All drafts run together in one continuous-batching
engine, each with its own seed (``seed + draft``), so a draft does not depend on how many were asked.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import write_file
from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..generation import Generator

DEFAULTS = {"temperature": 0.8, "top_k": 50}  # the seed's generate_text defaults


@dataclass
class Story:
    """One draft: ``text`` is the full story (premise or continued text, then the new text)."""

    text: str
    new_text: str
    new_tokens: int
    finish_reason: str  # "length" (reached the requested length) or "stop" (EOS or a stop string)
    seed: int | None
    draft: int
    token_ids: list[int]  # the new tokens (what the windows were made of)


@dataclass(frozen=True)
class StoryProgress:
    """Where a :func:`write_stories` run stands, as its drafts advance: ``tokens`` of ``total_tokens``
    written (all drafts together; a draft that ended early counts as complete), ``finished`` the drafts
    (0-based) that are done."""

    tokens: int
    total_tokens: int
    finished: frozenset[int]


@dataclass
class _Draft:
    index: int
    params: SamplingParams
    body: list[int]  # story tokens after the head: the continued text's then the generated ones
    stream: object  # StopTextStream over the generated tokens (UTF-8 safe across chunks, stop strings)
    generated: int = 0
    chunk: int = 0
    finish_reason: str | None = None


def _plan_chunk(head: int, body: int, remaining: int, window: int) -> tuple[int, int]:
    """(new tokens for the next chunk, body tokens to keep in its context)."""
    step = max(1, window // 4)  # sliding by a quarter window: few re-prefills, long memory
    chunk = min(remaining, max(step, window - head - body))
    return chunk, min(body, window - head - chunk)


def write_stories(generator: Generator, premise: str = "", *, drafts: int = 1, length: int = 300,
                  params: SamplingParams | None = None, continue_from: str | None = None,
                  on_text: Callable[[str], None] | None = None,
                  on_progress: Callable[[StoryProgress], None] | None = None) -> list[Story]:
    """Write ``drafts`` stories of ``length`` new tokens each.

    ``premise`` starts the story (and is kept in every window); with ``continue_from`` (a text) the
    story continues that text instead, the premise then only steering it (when empty, the text's
    opening is kept in the window as the premise). ``params`` are the sampling controls (their
    length fields are ignored: ``length`` counts); ``on_text`` receives the first draft's text as it is
    written, ``on_progress`` a :class:`StoryProgress` as the drafts advance. Drafts stop early only at
    ``<|endoftext|>`` (unless ``ignore_eos``) or a stop string.
    """
    from ..generation.engine import sample_seed
    from ..generation.stopping import StopTextStream

    if not isinstance(drafts, int) or isinstance(drafts, bool) or not 1 <= drafts <= 64:
        raise ValueError(f"drafts must be an integer in [1, 64], got {drafts!r}")
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ValueError(f"length must be an integer >= 1 (new tokens), got {length!r}")
    if not premise and not continue_from:
        raise ValueError("give a premise or a text to continue")
    base = (params or SamplingParams(**DEFAULTS)).with_(max_new_tokens=None, max_length=None, n=1)
    if base.num_beams > 1:
        raise ValueError("story writes sampled drafts: num_beams must be 1")
    tok, window = generator.tokenizer, generator.config.n_positions
    if continue_from:
        body = tok.encode(continue_from)
        head = tok.encode(premise.rstrip() + "\n\n") if premise else body[: window // 8]
        if not premise:
            body = body[len(head):]
        prefix_text = continue_from
    else:
        head, body, prefix_text = tok.encode(premise), [], premise
    if len(head) > window // 2:
        raise ValueError(f"the premise is {len(head)} tokens; at most {window // 2} fit in the model's "
                         f"{window}-token window with room to write")

    eos = generator.eos_token_id
    states = []
    for d in range(drafts):
        seed = None if base.seed is None else (base.seed + d) % 2**63
        states.append(_Draft(d, base.with_(seed=seed), list(body), StopTextStream(tok, base.stop)))
    runner = generator.runner(collect=False)  # chunks are submitted as the ones before them finish

    def submit(st: _Draft) -> None:
        chunk, keep = _plan_chunk(len(head), len(st.body), length - st.generated, window)
        context = head + (st.body[len(st.body) - keep:] if keep else [])
        seed = None if st.params.seed is None else sample_seed(st.params.seed, st.chunk)
        runner.add(context, st.params.with_(max_new_tokens=chunk, seed=seed), request_id=f"{st.index}:{st.chunk}")
        st.chunk += 1

    def emit(st: _Draft, delta: str) -> None:
        if delta and on_text is not None and st.index == 0:
            on_text(delta)

    for st in states:
        submit(st)
    # on_text runs between the steps: the weights are promised unchanged one step at a time. A failed chunk
    # raises GenerationFailed (it used to be submitted again, failing again, forever)
    for out in runner.outputs():
        st = states[int(out.request_id.split(":")[0])]
        if st.finish_reason is not None:
            continue
        for token in out.token_ids:
            if (token == eos and not st.params.ignore_eos) or token in st.params.stop_token_ids:
                st.finish_reason = "stop"
                break
            st.body.append(token)
            st.generated += 1
            delta, stopped = st.stream.push(token)
            emit(st, delta)
            if stopped:  # a stop string, possibly across a chunk boundary the engine did not see
                st.finish_reason = "stop"
                runner.abort(out.request_id)
                break
        if st.finish_reason is None and out.finished:
            if st.generated >= length:
                st.finish_reason = "length"
            else:
                submit(st)
        if st.finish_reason is not None:
            emit(st, st.stream.flush())
        if on_progress is not None:
            finished = frozenset(st.index for st in states if st.finish_reason is not None)
            on_progress(StoryProgress(sum(length if st.index in finished else st.generated for st in states),
                                      drafts * length, finished))
    return [Story(text=prefix_text + st.stream.text, new_text=st.stream.text, new_tokens=st.generated,
                  finish_reason=st.finish_reason or "length", seed=st.params.seed, draft=st.index,
                  token_ids=st.body[len(st.body) - st.generated:])
            for st in states]


def write_story(generator: Generator, premise: str = "", **kwargs) -> Story:
    """One story: :func:`write_stories` with ``drafts=1``."""
    return write_stories(generator, premise, drafts=1, **kwargs)[0]


def slug(text: str, limit: int = 40) -> str:
    """A file-name stem from the first words of a text."""
    words = re.findall(r"[A-Za-z0-9]+", text.lower())
    return "-".join(words)[:limit].strip("-") or "story"


def save_stories(stories: list[Story], out_dir: str | Path, stem: str = "story") -> list[Path]:
    """Write each draft to ``out_dir/<stem>-<n>.txt`` (numbered from 1, never overwriting a file)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    n = 1
    for story in stories:
        while (out / f"{stem}-{n}.txt").exists():
            n += 1
        path = out / f"{stem}-{n}.txt"
        paths.append(write_file(path, story.text if story.text.endswith("\n") else story.text + "\n"))
    return paths
