"""The review file: what reviewers judge, with each text's source kept on the server side only.

A review file is JSON Lines (documented in docs/review.md): a header object, then one object per item::

    {"format": "gpt2lab-review", "version": 1, "mode": "pairwise", "criteria": [...],
     "sources": {"T=0.7": {...how it was made...}, ...}, "dataset": null, "created": "2026-..."}
    {"id": "i0001", "prompt": "ROMEO:", "candidates": [{"source": "T=0.7", "text": "..."},
                                                      {"source": "T=1.2", "text": "..."}]}

``pairwise`` items hold two candidates from different sources; ``ratings`` and ``curation`` items
hold one. Curation items also carry ``row``: the 0-based row of the dataset (an ``augment`` output)
the candidate is. Item ids are opaque (``i0001``...), so they tell a reviewer nothing about the sources.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import write_file
from ..readers import iter_jsonl, read_json

if TYPE_CHECKING:
    from ..generation import Generator
    from ..sampling import SamplingParams

FORMAT, VERSION = "gpt2lab-review", 1
MODES = ("pairwise", "ratings", "curation")
DEFAULT_CRITERIA = ("fluency", "coherence", "relevance")
FLAGS = ("offensive", "misleading", "off-topic", "other")
MAX_ITEMS = 100_000
MAX_TEXT_CHARS = 20_000  # a prompt or a candidate; longer ones are cut (with a visible mark) by make
MAX_CRITERIA = 10
MAX_NAME_CHARS = 64  # criterion names, item ids, reviewer names
MAX_SOURCE_CHARS = 256


@dataclass
class Candidate:
    source: str  # hidden from reviewers
    text: str


@dataclass
class Item:
    id: str
    prompt: str
    candidates: list[Candidate]
    row: int | None = None  # curation: the dataset row this candidate is

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "prompt": self.prompt,
                               "candidates": [{"source": c.source, "text": c.text} for c in self.candidates]}
        if self.row is not None:
            out["row"] = self.row
        return out


@dataclass
class ReviewSet:
    """A review file in memory. ``dataset`` (curation only): ``path``, ``format``, ``text_column``."""

    mode: str
    items: list[Item]
    criteria: list[str] = field(default_factory=lambda: list(DEFAULT_CRITERIA))
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    dataset: dict[str, Any] | None = None
    created: str = ""

    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "mode": self.mode, "criteria": self.criteria,
                "sources": self.sources, "dataset": self.dataset,
                "created": self.created or datetime.now(timezone.utc).isoformat(timespec="seconds")}

    def item(self, item_id: str) -> Item | None:
        if not hasattr(self, "_by_id"):
            self._by_id = {it.id: it for it in self.items}
        return self._by_id.get(item_id)


def check_criteria(criteria: Sequence[str]) -> list[str]:
    """Validated criterion names (1-10 distinct names of 1-64 characters)."""
    names = [c.strip() for c in criteria]
    if not 1 <= len(names) <= MAX_CRITERIA:
        raise ValueError(f"criteria: give 1 to {MAX_CRITERIA} names, got {len(names)}")
    for c in names:
        if not 1 <= len(c) <= MAX_NAME_CHARS:
            raise ValueError(f"criteria: each name must have 1 to {MAX_NAME_CHARS} characters, got {c!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"criteria: names must be distinct, got {', '.join(names)}")
    return names


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT_CHARS else text[:MAX_TEXT_CHARS] + " [...]"


# -- building ------------------------------------------------------------------------------------------
Rows = list[tuple[str, str]]  # (prompt, completion) in order


def build(sources: Mapping[str, Rows], mode: str = "pairwise", *, criteria: Sequence[str] = DEFAULT_CRITERIA,
          descriptions: Mapping[str, dict[str, Any]] | None = None, seed: int = 0,
          max_items: int | None = None) -> ReviewSet:
    """A review set from two or more sources' completions of the same prompts.

    The ``j``-th completion of a prompt in one source is matched with the ``j``-th completion of the
    same prompt in every other source; prompts or samples missing from some source are left out.
    ``pairwise``: one item per prompt, sample and pair of sources (all pairs); ``ratings``: one item
    per prompt, sample and source. Items are shuffled with ``seed`` so that no source or prompt comes
    in a run; ``max_items`` keeps the first ones after shuffling. Raises ``ValueError`` when fewer than
    two sources are given or no prompt is shared by all of them.
    """
    if mode not in ("pairwise", "ratings"):
        raise ValueError(f"mode must be pairwise or ratings for completions, got {mode!r}")
    names = list(sources)
    if len(names) < 2:
        raise ValueError(f"give two or more sources to compare, got {len(names)}")
    for n in names:
        if not 1 <= len(n) <= MAX_SOURCE_CHARS:
            raise ValueError(f"source names must have 1 to {MAX_SOURCE_CHARS} characters, got {n!r}")
    if max_items is not None and max_items < 1:
        raise ValueError(f"max_items must be >= 1, got {max_items}")
    by_prompt: dict[str, dict[str, list[str]]] = {}
    for name in names:
        for prompt, text in sources[name]:
            by_prompt.setdefault(prompt, {}).setdefault(name, []).append(text)
    groups: list[tuple[str, dict[str, str]]] = []  # (prompt, source -> text)
    for prompt, per_source in by_prompt.items():
        if len(per_source) < len(names):
            continue
        for j in range(min(len(v) for v in per_source.values())):
            groups.append((prompt, {n: per_source[n][j] for n in names}))
    if not groups:
        raise ValueError("the sources share no prompt: each source must complete the same prompts (matched by "
                         "their exact text)")
    raw: list[tuple[str, list[Candidate]]] = []
    rng = random.Random(seed)
    for prompt, texts in groups:
        if mode == "pairwise":
            for a, b in combinations(names, 2):
                pair = [Candidate(a, _clip(texts[a])), Candidate(b, _clip(texts[b]))]
                rng.shuffle(pair)
                raw.append((prompt, pair))
        else:
            raw.extend((prompt, [Candidate(n, _clip(texts[n]))]) for n in names)
    rng.shuffle(raw)
    raw = raw[:max_items or MAX_ITEMS]
    width = max(4, len(str(len(raw))))
    items = [Item(f"i{k + 1:0{width}d}", _clip(prompt), cands) for k, (prompt, cands) in enumerate(raw)]
    desc = dict(descriptions or {})
    return ReviewSet(mode, items, check_criteria(criteria), {n: desc.get(n, {}) for n in names})


def generate_rows(gen: Generator, prompts: Sequence[str], params: SamplingParams, samples: int = 1,
                  on_progress: Callable[[int], None] | None = None) -> Rows:
    """``samples`` completions of each prompt by ``gen`` with ``params`` (completions only, prompts apart).

    ``on_progress(n)`` is told each time ``n`` more prompts are done (they run in groups of about 64
    completions; a seeded prompt's completions do not depend on its group)."""
    if not 1 <= samples <= 64:
        raise ValueError(f"samples must be in [1, 64], got {samples}")
    prompts, rows = list(prompts), []
    group = max(1, 64 // samples)
    for start in range(0, len(prompts), group):
        part = prompts[start:start + group]
        rows += [(c.prompt, c.text) for c in gen.generate(part, params.with_(n=samples))]
        if on_progress is not None:
            on_progress(len(part))
    return rows


# SamplingParams fields a completion request of ``gpt2lab serve`` takes under the same name (vLLM's and OpenAI's)
_SERVER_FIELDS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "no_repeat_ngram_size", "seed", "ignore_eos", "min_tokens")


def server_rows(url: str, model: str, prompts: Sequence[str], params: SamplingParams, samples: int = 1, *,
                api_key: str | None = None, timeout: float = 600.0,
                on_progress: Callable[[int], None] | None = None, chat: bool = False,
                system: str | None = None) -> Rows:
    """As :func:`generate_rows`, by the served model (or LoRA adapter) ``model`` of a running ``gpt2lab serve``
    (or any OpenAI-compatible server) at ``url``: one ``/v1/completions`` request per prompt, ``n=samples``
    (``on_progress(1)`` after each). ``chat``: each prompt is instead the user's first message of its own
    conversation, one ``/v1/chat/completions`` request each (``system``: its system message; None: the
    served model's default), and the rows hold the replies.
    ``ValueError`` naming the server, the model and its answer when it refuses a request or cannot be reached;
    and for settings a completion request cannot carry (``num_beams``)."""
    import httpx

    from ..sampling import SamplingParams

    if not 1 <= samples <= 64:
        raise ValueError(f"samples must be in [1, 64], got {samples}")
    if params.num_beams > 1:
        raise ValueError("num_beams cannot be sent to a server; generate with the model itself (no --server)")
    default = SamplingParams()
    body: dict[str, Any] = {name: getattr(params, name) for name in _SERVER_FIELDS
                            if getattr(params, name) != getattr(default, name)}
    body["stop"] = list(params.stop) or None
    if params.max_new_tokens is not None:
        body["max_tokens"] = params.max_new_tokens
    if params.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in params.logit_bias.items()}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rows: Rows = []
    with httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout) as client:
        for prompt in prompts:
            try:
                if chat:
                    messages = [*([{"role": "system", "content": system}] if system is not None else []),
                                {"role": "user", "content": prompt}]
                    r = client.post("/v1/chat/completions",
                                    json={**body, "model": model, "messages": messages, "n": samples})
                else:
                    r = client.post("/v1/completions", json={**body, "model": model, "prompt": prompt, "n": samples})
            except httpx.HTTPError as exc:
                raise ValueError(f"{url}: cannot reach the server ({exc})") from None
            if r.status_code != 200:
                try:
                    message = r.json()["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = r.text[:300]
                raise ValueError(f"{url}: model {model!r} answered {r.status_code}: {message}")
            choices = sorted(r.json()["choices"], key=lambda c: c["index"])
            rows += [(prompt, c["message"]["content"] if chat else c["text"]) for c in choices]
            if on_progress is not None:
                on_progress(1)
    return rows


def read_completions(path: str | Path, prompt_column: str = "prompt", completion_column: str = "completion") -> Rows:
    """(prompt, completion) rows of a CSV/TSV (with a header) or JSONL file; ``ValueError`` names the problem."""
    from ..apps.augment import read_dataset

    data = read_dataset(path, completion_column, prompt_column)
    return [(str(r.get(prompt_column) or ""), str(r.get(completion_column) or "")) for r in data.rows]


def read_explore(directory: str | Path, labels: Sequence[str] = ()) -> dict[str, Rows]:
    """The samples of an ``explore`` run (its ``results.json``), one source per setting label.

    ``labels``: the settings to keep (e.g. ``"T=0.7 k=50 p=0.9"``); all when empty.
    """
    path = Path(directory) / "results.json"
    try:
        data = read_json(path)
        settings = {s["label"]: [(x["prompt"], x["text"]) for x in s["samples"]] for s in data["settings"]}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; give the --out directory of a `gpt2lab explore` run") from None
    except ValueError as exc:  # the reader's error names the file
        raise ValueError(f"{exc}; not an explore results.json") from None
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not an explore results.json ({type(exc).__name__}: {exc})") from None
    missing = [x for x in labels if x not in settings]
    if missing:
        raise ValueError(f"{path}: no setting {missing[0]!r}; settings: {', '.join(settings)}")
    return {k: v for k, v in settings.items() if not labels or k in labels}


def from_augment(path: str | Path, text_column: str = "text") -> ReviewSet:
    """A curation set: one item per generated row of an ``augment`` output; its prompt is the original
    row it was made from (shown as context)."""
    from ..apps.augment import ORIGIN, SOURCE_ROW, read_dataset

    data = read_dataset(path, text_column, augmented=True)
    items: list[Item] = []
    originals: dict[str, str] = {}
    for row in data.rows:
        if row.get(ORIGIN) == "original":
            originals[str(row.get(SOURCE_ROW))] = str(row.get(text_column) or "")
    for i, row in enumerate(data.rows):
        if row.get(ORIGIN) != "generated":
            continue
        context = originals.get(str(row.get(SOURCE_ROW)), "")
        items.append(Item(f"i{len(items) + 1:05d}", _clip(context), [Candidate(str(row.get("aug_method") or "augment"),
                                                                     _clip(str(row.get(text_column) or "")))], row=i))
    if not items:
        raise ValueError(f"{path}: has no generated rows to curate")
    dataset = {"path": str(Path(path).resolve()), "format": data.format, "text_column": text_column,
               "columns": data.columns, "rows": len(data.rows)}
    return ReviewSet("curation", items, list(DEFAULT_CRITERIA), {}, dataset)


# -- files ---------------------------------------------------------------------------------------------
def write_review_set(review: ReviewSet, path: str | Path) -> Path:
    """Write the review file atomically (JSON Lines: U+2028 and the like stay raw inside strings, and
    the reader splits lines on ``\\n`` only)."""
    lines = [json.dumps(review.header(), ensure_ascii=False)]
    lines += [json.dumps(it.to_dict(), ensure_ascii=False) for it in review.items]
    return write_file(path, "\n".join(lines) + "\n")


def read_review_set(path: str | Path) -> ReviewSet:
    """Read and validate a review file; ``ValueError`` names the file, the line and the problem."""
    path = Path(path)
    records = iter_jsonl(path, objects=True)  # the one JSONL reader: lines end at "\n" only, BOM dropped
    try:
        first = next(records, None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: review file not found") from None
    if first is None or first[1].get("format") != FORMAT:
        raise ValueError(f"{path}: not a gpt2lab review file (its first line must be the header with "
                         f"\"format\": \"{FORMAT}\"; make one with `gpt2lab review make`)")
    _, head = first
    if head.get("version") != VERSION:
        raise ValueError(f"{path}: review file version {head.get('version')!r}; this gpt2lab reads version {VERSION}")
    mode = head.get("mode")
    if mode not in MODES:
        raise ValueError(f"{path}:1: mode must be one of {', '.join(MODES)}, got {mode!r}")
    criteria = check_criteria(head.get("criteria") or DEFAULT_CRITERIA)
    want = 2 if mode == "pairwise" else 1
    items: list[Item] = []
    seen: set[str] = set()
    for number, rec in records:
        where = f"{path}:{number}"
        try:
            item = Item(str(rec["id"]), str(rec["prompt"]),
                        [Candidate(str(c["source"]), str(c["text"])) for c in rec["candidates"]],
                        None if rec.get("row") is None else int(rec["row"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}: an item needs id, prompt and candidates [{{source, text}}] ({exc!r})") from None
        if not 1 <= len(item.id) <= MAX_NAME_CHARS or item.id in seen:
            raise ValueError(f"{where}: item id {item.id!r} is empty, too long or repeated")
        if len(item.candidates) != want:
            raise ValueError(f"{where}: a {mode} item has {want} candidate(s), this one {len(item.candidates)}")
        if mode == "pairwise" and item.candidates[0].source == item.candidates[1].source:
            raise ValueError(f"{where}: the two candidates come from the same source {item.candidates[0].source!r}")
        if mode == "curation" and item.row is None:
            raise ValueError(f"{where}: a curation item needs the dataset row it is (\"row\")")
        seen.add(item.id)
        items.append(item)
        if len(items) > MAX_ITEMS:
            raise ValueError(f"{path}: more than {MAX_ITEMS} items")
    if not items:
        raise ValueError(f"{path}: has no items")
    return ReviewSet(mode, items, criteria, dict(head.get("sources") or {}), head.get("dataset"),
                     str(head.get("created", "")))
