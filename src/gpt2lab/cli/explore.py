"""``gpt2lab explore``: the creativity-versus-coherence trade-off over a grid of sampling settings."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from .common import check_output, fail, require_extra, user_errors
from .eval import fmt_value, load_for_eval, print_json
from .options import Runtime, model_option, process_escapes, runtime_options

_HEADERS = {"perplexity": "ppl", "repeated_4gram_rate": "rep-4", "distinct_1": "dist-1", "distinct_2": "dist-2",
            "distinct_3": "dist-3", "self_bleu": "self-BLEU", "mean_length": "words", "mean_tokens": "tokens"}


def _numbers(option: str, text: str, kind: type) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        fail(f"{option}: {text!r} is not a comma-separated list of {'integers' if kind is int else 'numbers'}")
    if not values:
        fail(f"{option}: give at least one value")
    return values


@runtime_options()
def explore(
    prompt: str = typer.Argument(None, help="Prompt to complete (more with --prompts)."),
    prompts_file: Path = typer.Option(None, "--prompts", help="A file of prompts, one per line."),
    temperature: str = typer.Option("0.3,0.7,1.0,1.3", "--temperature", "-t", help="Comma-separated temperatures."),
    top_k: str = typer.Option("0,10,50", "--top-k", "-k", help="Comma-separated top-k values (0 = off)."),
    top_p: str = typer.Option("1.0,0.9", "--top-p", "-p", help="Comma-separated top-p values (1.0 = off)."),
    max_length: int = typer.Option(60, "--max-length", help="Prompt + new tokens per sample."),
    samples: int = typer.Option(8, "--samples", "-n", help="Samples per prompt and setting."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (the same for every setting)."),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for results.csv/.json, plot.png, report.html."),
    model: str = model_option(),
    scoring_model: str = typer.Option(None, "--scoring-model", help="Model for perplexity (default: --model)."),
    max_batch: int = typer.Option(32, "--max-batch", help="Sequences decoded together."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    runtime: Runtime = None,
) -> None:
    """Sample every temperature x top-k x top-p combination and compare coherence with creativity."""
    require_extra("eval", "gpt2lab explore", ("sacrebleu", "matplotlib"))  # self-BLEU, plot.png
    temperatures = _numbers("--temperature", temperature, float)
    top_ks = _numbers("--top-k", top_k, int)
    top_ps = _numbers("--top-p", top_p, float)
    prompts = [] if prompt is None else [process_escapes(prompt)]
    if prompts_file is not None:
        from ..readers import iter_lines

        with user_errors():
            prompts += [line for _, line in iter_lines(prompts_file) if line.strip()]
    if not prompts:
        fail("give a prompt, or --prompts FILE")
    from ..evaluation import explore as run_explore
    from ..evaluation.explore import grid

    with user_errors():
        grid(temperatures, top_ks, top_ps)  # bad values fail before any model loads
    check_output(out, "--out")
    gen = load_for_eval(model, runtime)
    scorer = load_for_eval(scoring_model, runtime) if scoring_model else None
    with user_errors():
        result = run_explore(prompts, gen, temperatures=temperatures, top_ks=top_ks, top_ps=top_ps,
                             max_length=max_length, samples=samples, seed=seed, scoring_model=scorer, out=out,
                             max_batch=max_batch, progress=sys.stderr.isatty())
    if as_json:
        print_json(result.to_dict())
        return
    from ..console import echo, print_table
    from ..evaluation.explore import METRICS

    print_table(f"{result.model}: {len(prompts)} prompt(s) x {samples} samples per setting",
                ("setting", *(_HEADERS.get(m, m) for m in METRICS)),
                [(r.setting.label, *(fmt_value(getattr(r, m)) for m in METRICS)) for r in result.settings])
    echo(f"wrote {out}/results.csv, results.json, plot.png, report.html")
