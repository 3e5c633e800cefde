"""Ray Data batch jobs: a callable class per job for ``Dataset.map_batches``, and the drivers the commands use.

As vLLM's batch inference does (``ds.map_batches(LLMPredictor, concurrency=N)``, later ``ray.data.llm``),
each class loads the model once per actor in ``__init__`` and completes a batch of rows per call, through
the same code as the one-process commands:

- :class:`GenerationPredictor`: prompt column -> one row per completion (``index``, ``text``, ``token_ids``,
  ``finish_reason``, ``logprobs``), rows through :func:`gpt2lab.generation.batch.generate_rows`;
- :class:`AugmentPredictor`: source row numbers -> the texts ``gpt2lab augment`` generates for them
  (:class:`gpt2lab.apps.augment.AugmentPrompts`); filtering and writing stay in the driver, in row order;
- :class:`PerplexityScorer`: documents -> NLL sum, scored tokens, UTF-8 bytes
  (:func:`gpt2lab.evaluation.perplexity.score_documents`), combined exactly by
  :func:`~gpt2lab.evaluation.perplexity.combine`.

Determinism: a row's seed is ``row_seed(run seed, row key)`` (:func:`gpt2lab.generation.engine.row_seed`),
never the actor's or the block's, so the output is the same on 1 actor, 4 actors, a cluster or one process.
A batch whose actor dies is run again by Ray Data on another actor (actors restart), and its rows come out
once: the output of a batch is a function of its rows only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd

    from ..generation import Generator
    from ..sampling import SamplingParams

# the completion columns GenerationPredictor adds (one output row per completion)
COMPLETION_COLUMNS = ("index", "text", "token_ids", "finish_reason", "logprobs")
DEFAULT_BATCH_SIZE = 16


def _columns(batch: Any) -> dict[str, list[Any]]:
    """A Ray Data batch (``dict[str, np.ndarray]`` or a pandas DataFrame) as plain Python lists."""
    return {name: [v.item() if hasattr(v, "item") and getattr(v, "ndim", 1) == 0 else v for v in values.tolist()]
            for name, values in batch.items()}


def _load(model: Any, device: str, dtype: str | None, quantization: str | None) -> Generator:
    from ..generation import load

    kwargs: dict[str, Any] = {"device": device, "dtype": dtype}
    if quantization is not None:
        kwargs["quantization"] = quantization
    return load(model, **kwargs)


def _frame(columns: dict[str, list[Any]]) -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame(columns)


class GenerationPredictor:
    """``ds.map_batches(GenerationPredictor, fn_constructor_kwargs={"model": ..., "params": ...},
    concurrency=N, batch_size=B)``: each input row's ``prompt_column`` completed ``params.n`` times; one output
    row per completion, with the input's columns and :data:`COMPLETION_COLUMNS` (``logprobs``: a JSON string,
    or None when not asked for).

    ``params``: a :class:`~gpt2lab.sampling.SamplingParams` or a dict of its fields (every control; the
    checkpoint's ``generation_config.json`` gives the defaults). With a seed, row ``key_column``'s value
    (an int >= 0 or a str) seeds the row (``row_seed``): give each row a stable key, e.g. its line number.
    ``device``/``dtype``/``quantization``: as :func:`gpt2lab.load` (``"cuda"`` with ``num_gpus=1`` actors).
    Raises ``ValueError`` (a missing column, a bad control) from the first batch.
    """

    def __init__(self, model: Any = None, *, params: SamplingParams | dict[str, Any] | None = None,
                 prompt_column: str = "prompt", key_column: str = "id", device: str = "cpu",
                 dtype: str | None = None, quantization: str | None = None) -> None:
        from ..sampling import SamplingParams

        self.gen = _load(model, device, dtype, quantization)
        self.params = (self.gen.sampling_params(params) if isinstance(params, SamplingParams)
                       else self.gen.sampling_params(**(params or {})))
        self.prompt_column, self.key_column = prompt_column, key_column

    def __call__(self, batch: Any) -> pd.DataFrame:
        from ..generation.batch import generate_rows, logprobs_record

        cols = _columns(batch)
        if self.prompt_column not in cols:
            raise ValueError(f"prompt_column {self.prompt_column!r} is not a column of the dataset "
                             f"(it has {', '.join(cols)})")
        prompts = [str(p) for p in cols[self.prompt_column]]
        if self.key_column in cols:
            keys = cols[self.key_column]
        elif self.params.seed is None:
            keys = [0] * len(prompts)  # unseeded: the key seeds nothing
        else:
            raise ValueError(f"a seeded job needs a row key: key_column {self.key_column!r} is not a column "
                             f"(it has {', '.join(cols)})")
        out: dict[str, list[Any]] = {name: [] for name in cols if name not in COMPLETION_COLUMNS}
        out.update({name: [] for name in COMPLETION_COLUMNS})
        for row, completions in enumerate(generate_rows(self.gen, prompts, keys, self.params)):
            for c in completions:
                for name, values in cols.items():
                    if name not in COMPLETION_COLUMNS:
                        out[name].append(values[row])
                out["index"].append(c.index)
                out["text"].append(c.text)
                out["token_ids"].append(list(c.token_ids))
                out["finish_reason"].append(c.finish_reason)
                logprobs = logprobs_record(c.logprobs)
                out["logprobs"].append(None if logprobs is None else json.dumps(logprobs))
        return _frame(out)


class AugmentPredictor:
    """``ds.map_batches(AugmentPredictor, ...)`` over a dataset of source row numbers (column ``row``): each
    row's generated texts, as ``gpt2lab augment`` generates them (``generated``: a JSON list of
    ``[method, text, fields]``, ``fields`` the JSON row with ``json_schema``, else null). ``data`` is the
    augment input file, read by each actor (few-shot prompts show other rows of the same label); the other
    arguments are :class:`~gpt2lab.apps.augment.AugmentPrompts`'s."""

    def __init__(self, model: Any = None, *, data: str, text_column: str = "text", label_column: str | None = None,
                 per_example: int = 2, methods: Sequence[str] | None = None,
                 params: SamplingParams | None = None, opening: float = 0.5, shots: int = 3,
                 json_schema: dict[str, Any] | None = None, device: str = "cpu", dtype: str | None = None,
                 quantization: str | None = None) -> None:
        from ..apps.augment import METHODS, AugmentPrompts, read_dataset

        gen = _load(model, device, dtype, quantization)
        dataset = read_dataset(data, text_column, label_column)
        self.prompts = AugmentPrompts(gen, dataset, text_column=text_column, label_column=label_column,
                                      per_example=per_example, methods=methods or METHODS, params=params,
                                      opening=opening, shots=shots, json_schema=json_schema)

    def __call__(self, batch: Any) -> pd.DataFrame:
        rows = [int(i) for i in _columns(batch)["row"]]
        made = self.prompts.generate(rows)
        return _frame({"row": rows, "generated": [json.dumps(made.get(i, [])) for i in rows]})


class PerplexityScorer:
    """``ds.map_batches(PerplexityScorer, ...)`` over documents (columns ``doc``, ``name``, ``text``): each
    document's NLL sum (nats), scored tokens and UTF-8 bytes, windowed on its own with ``block_size`` and
    ``stride`` (checked with their defaults by :func:`~gpt2lab.evaluation.perplexity.window_settings`). A
    document's figures do not depend on its batch, so :func:`~gpt2lab.evaluation.perplexity.combine` over
    them equals one-process ``gpt2lab eval perplexity``."""

    def __init__(self, model: Any = None, *, block_size: int | None = None, stride: int | None = None,
                 batch_tokens: int | None = None, device: str = "cpu", dtype: str | None = None,
                 quantization: str | None = None) -> None:
        from ..evaluation.perplexity import window_settings
        from ..evaluation.scoring import DEFAULT_BATCH_TOKENS

        self.gen = _load(model, device, dtype, quantization)
        self.batch_tokens = batch_tokens or DEFAULT_BATCH_TOKENS
        self.block_size, self.stride = window_settings(self.gen.config.n_positions, block_size, stride,
                                                       self.batch_tokens)

    def __call__(self, batch: Any) -> pd.DataFrame:
        from ..evaluation.perplexity import score_documents

        cols = _columns(batch)
        docs = score_documents(self.gen, [str(t) for t in cols["text"]], [str(n) for n in cols["name"]],
                               block_size=self.block_size, stride=self.stride, batch_tokens=self.batch_tokens)
        return _frame({"doc": cols["doc"], "nll": [d.nll for d in docs], "tokens": [d.tokens for d in docs],
                       "bytes": [d.bytes for d in docs]})


# -- drivers: what `gpt2lab generate/augment/eval perplexity --ray` run ------------------------------------
Progress = Callable[[int], None]  # called with the number of input rows finished so far


def map_rows(items: list[dict[str, Any]], fn: type, kwargs: dict[str, Any], *, key: str, actors: int = 1,
             batch_size: int = DEFAULT_BATCH_SIZE, num_cpus: float = 1, num_gpus: float = 0,
             progress: Progress | None = None) -> Iterator[list[dict[str, Any]]]:
    """Run ``fn`` (one of this module's classes) over ``items`` on ``actors`` Ray actors, ``batch_size`` rows a
    call; yield, in input order, each input row's output rows (those sharing its ``key`` value, an int
    distinct per input row). Ray must be initialised (:func:`gpt2lab.ray.connect`). Raises
    ``ValueError`` for ``actors`` or ``batch_size`` < 1; an actor's exception comes back as Ray raised it."""
    import ray

    for name, value in (("actors", actors), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not items:  # e.g. a resumed augment job with every row done: no actor to start
        return
    import logging

    import ray.data

    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its per-dataset INFO lines: the command has a bar
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # rows come back in input order: the output streams to disk
    ctx.enable_progress_bars = False  # the command draws one bar, from the rows that come back
    ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items), actors * 4)))
    ds = ds.map_batches(fn, fn_constructor_kwargs=kwargs, compute=ray.data.ActorPoolStrategy(size=actors),
                        batch_size=batch_size,
                        num_cpus=num_cpus, num_gpus=num_gpus, batch_format="pandas")
    keys = [int(item[key]) for item in items]
    j, pending = 0, []  # pending: the output rows of input row j
    for row in ds.iter_rows():
        k = int(row[key])
        if k != keys[j]:  # the next input row's outputs begin
            if not pending or j + 1 == len(keys) or k != keys[j + 1]:
                raise RuntimeError(f"Ray Data returned row {k} where row {keys[j]}'s outputs were due: "
                                   "rows lost or out of order")
            yield pending
            j, pending = j + 1, []
            if progress:
                progress(j)
        pending.append(row)
    if j != len(keys) - 1 or not pending:
        raise RuntimeError(f"Ray Data returned {j + bool(pending)} of {len(keys)} rows")
    yield pending
    if progress:
        progress(len(keys))


def generation_rows(model: Any, prompts: Sequence[str], params: SamplingParams, *, actors: int = 1,
                    batch_size: int = DEFAULT_BATCH_SIZE, device: str = "cpu", dtype: str | None = None,
                    quantization: str | None = None, num_gpus: float = 0,
                    progress: Progress | None = None) -> Iterator[list[dict[str, Any]]]:
    """Each prompt's completion rows (:class:`GenerationPredictor`'s output), prompt by prompt in order;
    prompt ``i``'s key is ``i``, as one-process ``gpt2lab generate`` seeds it."""
    items = [{"id": i, "prompt": p} for i, p in enumerate(prompts)]
    kwargs = {"model": model, "params": params, "device": device, "dtype": dtype, "quantization": quantization}
    return map_rows(items, GenerationPredictor, kwargs, key="id", actors=actors, batch_size=batch_size,
                    num_gpus=num_gpus, progress=progress)


def augment_rows(model: Any, start: int, n_rows: int, prompt_kwargs: dict[str, Any], *, actors: int = 1,
                 batch_size: int = 8, device: str = "cpu", dtype: str | None = None,
                 quantization: str | None = None, num_gpus: float = 0,
                 progress: Progress | None = None) -> Iterator[tuple[int, list[tuple[str, str | None, dict | None]]]]:
    """``(row, [(method, text), ...])`` of source rows ``start .. n_rows - 1`` in order: what
    :meth:`gpt2lab.apps.augment.Augmenter.run` takes as ``generated``. ``prompt_kwargs``: the data file and
    :class:`AugmentPredictor`'s settings."""
    items = [{"row": i} for i in range(start, n_rows)]
    kwargs = {"model": model, "device": device, "dtype": dtype, "quantization": quantization, **prompt_kwargs}
    for rows in map_rows(items, AugmentPredictor, kwargs, key="row", actors=actors, batch_size=batch_size,
                         num_gpus=num_gpus, progress=progress):
        (row,) = rows
        yield int(row["row"]), [(m, t, f) for m, t, f in json.loads(row["generated"])]


def score_rows(model: Any, texts: Sequence[str], names: Sequence[str], *, block_size: int | None = None,
               stride: int | None = None, batch_tokens: int | None = None, actors: int = 1, batch_size: int = 1,
               device: str = "cpu", dtype: str | None = None, quantization: str | None = None,
               num_gpus: float = 0, progress: Progress | None = None) -> list[tuple[float, int, int]]:
    """Each document's ``(nll, tokens, bytes)`` from :class:`PerplexityScorer` actors, in document order."""
    items = [{"doc": i, "name": n, "text": t} for i, (n, t) in enumerate(zip(names, texts))]
    kwargs = {"model": model, "block_size": block_size, "stride": stride, "batch_tokens": batch_tokens,
              "device": device, "dtype": dtype, "quantization": quantization}
    return [(float(r["nll"]), int(r["tokens"]), int(r["bytes"]))
            for (r,) in map_rows(items, PerplexityScorer, kwargs, key="doc", actors=actors, batch_size=batch_size,
                                 num_gpus=num_gpus, progress=progress)]
