"""``gpt2lab eval``: perplexity of text files, and metrics of generated text."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer

from ..console import echo, print_table
from .common import fail, require_extra, user_errors
from .distributed import RayJob, actor_resources, driver_runtime, model_ref, ray_options, ray_session
from .options import Runtime, load_generator, model_option, runtime_options

app = typer.Typer(help="Measure models and generated text: perplexity, BLEU, ROUGE, diversity.",
                  no_args_is_help=True)


def fmt_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}" if abs(value) < 10000 else f"{value:.3g}"
    return str(value)


def load_for_eval(model: str | None, runtime: Runtime | None = None):
    """Load a model for evaluation, where ``runtime`` says (its ``--device``/``--dtype``/``--quantization``)."""
    return load_generator(model, runtime)


def print_json(record: dict[str, Any]) -> None:
    """One JSON object on stdout (NaN, which JSON lacks, as null)."""
    from ..evaluation.common import json_safe

    echo(json.dumps(json_safe(record)))


@app.command("perplexity")
@runtime_options()
@ray_options("gpt2lab eval perplexity --ray")
def perplexity_cmd(
    files: list[Path] = typer.Argument(..., help="UTF-8 text files; each is windowed on its own."),
    model: str = model_option(),
    stride: int = typer.Option(None, "--stride", help="Tokens between window starts (default: block size / 2)."),
    block_size: int = typer.Option(None, "--block-size", help="Tokens per window (default: the model's context)."),
    batch_tokens: int = typer.Option(8192, "--batch-tokens", help="Tokens per forward pass (memory vs speed)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    ray: RayJob = None,
    runtime: Runtime = None,
) -> None:
    """Sliding-window perplexity and bits per byte of text files (the Hugging Face guide's method).

    With --ray, Ray Data actors score the files (each on its own, as here) and their sums give exactly the
    one-process figures."""
    from ..evaluation import perplexity

    gen = load_for_eval(model, driver_runtime(runtime, ray.address))
    with user_errors():
        if not ray.on:
            result = perplexity(files=files, model=gen, stride=stride, block_size=block_size,
                                batch_tokens=batch_tokens, progress=sys.stderr.isatty())
        else:
            result = _perplexity_on_ray(gen, files, model, ray, runtime, block_size=block_size,
                                        stride=stride, batch_tokens=batch_tokens)
    if as_json:
        print_json(result.to_dict())
        return
    from rich.text import Text

    weights = f", {result.quantization}" if result.quantization else ""
    rows = [(doc.name, doc) for doc in result.files]
    if len(result.files) > 1:
        rows.append((Text("all", style="bold"), result))
    print_table(f"perplexity of {result.model}{weights} (block {result.block_size}, stride {result.stride})",
                ("file", "perplexity", "bits/byte", "tokens", "bytes"),
                [(name, fmt_value(r.perplexity), fmt_value(r.bits_per_byte), str(r.tokens), str(r.bytes))
                 for name, r in rows])


def _perplexity_on_ray(gen, files: list[Path], model: str | None, ray: RayJob, runtime,
                       **settings: Any):  # noqa: ANN001, ANN202
    """:func:`gpt2lab.evaluation.perplexity`'s result, the files scored on Ray Data actors."""
    from ..evaluation.perplexity import combine, document_perplexity, read_text_file, window_settings

    block_size, stride = window_settings(gen.config.n_positions, settings["block_size"], settings["stride"],
                                         settings["batch_tokens"])
    texts, names = [read_text_file(path) for path in files], [str(path) for path in files]
    from ..console import progress_bar

    with ray_session(ray.address, "gpt2lab eval perplexity --ray") as gray, \
            progress_bar(len(texts), "perplexity") as bar:
        scores = gray.data.score_rows(model_ref(model), texts, names, block_size=block_size, stride=stride,
                                      batch_tokens=settings["batch_tokens"], progress=bar.update,
                                      **actor_resources(runtime, ray.actors))
    docs = [document_perplexity(name, *score) for name, score in zip(names, scores)]
    return combine(docs, model=gen.name, block_size=block_size, stride=stride, quantization=gen.quantization)


@app.command("text")
@runtime_options()
def text_cmd(
    predictions: Path = typer.Option(..., "--predictions", "-p",
                                     help="Generated texts: .txt (one per line) or .jsonl (strings or objects)."),
    references: Path = typer.Option(None, "--references", "-r",
                                    help="References, paired line by line with the predictions (.txt or .jsonl)."),
    model: str = typer.Option(None, "--model", "-m", help="Scoring model: adds the predictions' perplexity under it."),
    use_stemmer: bool = typer.Option(False, "--stemmer", help="Porter-stem words before ROUGE."),
    tokenize: str = typer.Option("auto", "--tokenize", help="How words are split, by script (sacrebleu's "
                                 "tokenizers): auto (chosen from the text: zh for Chinese, ja-mecab for Japanese, "
                                 "char for Thai and the like, else 13a), 13a, intl, zh, ja-mecab, ko-mecab, char, "
                                 "none. The one used is shown."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    runtime: Runtime = None,
) -> None:
    """BLEU, chrF, ROUGE against references; distinct-n, self-BLEU, repetition, length, perplexity."""
    require_extra("eval", "gpt2lab eval text", ("sacrebleu", "rouge_score"))
    from ..evaluation import read_predictions, read_references, text_metrics
    from ..evaluation.words import resolve as resolve_tokenizer

    with user_errors():
        preds, inline_refs = read_predictions(predictions)
        refs = read_references(references) if references is not None else inline_refs
        if not preds:
            fail(f"{predictions}: no predictions in this file")
    try:  # before any model loads
        resolve_tokenizer(tokenize, [])
    except ValueError as exc:
        fail(f"--{exc}")
    scorer = load_for_eval(model, runtime) if model is not None else False
    with user_errors():
        metrics = text_metrics(preds, refs, model=scorer, use_stemmer=use_stemmer, progress=sys.stderr.isatty(),
                               tokenize=tokenize)
    if as_json:
        print_json(metrics)
        return
    print_table(f"{len(preds)} predictions" + (f", {len(refs)} references" if refs else ""), ("metric", "value"),
                [(key, fmt_value(value)) for key, value in metrics.items()])
