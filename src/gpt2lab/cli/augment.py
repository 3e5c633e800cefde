"""``gpt2lab augment``: new labelled examples for a small text dataset, resumable."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from ..apps.augment import DEFAULTS, METHODS
from .common import check_output, user_errors
from .distributed import RayJob, actor_resources, driver_runtime, model_ref, ray_options, ray_session
from .options import (
    BEAM_OPTIONS,
    Runtime,
    SamplingChoice,
    load_generator,
    model_option,
    runtime_options,
    sampling_options,
)
from .structured import json_schema_option, structured_outputs

_EXCLUDE = {"n", "logprobs", "max_length", "truncate_prompt", *BEAM_OPTIONS}


@sampling_options(defaults=DEFAULTS, exclude=_EXCLUDE, defaults_win=True)
@runtime_options()
@ray_options("gpt2lab augment --ray")
def augment(
    data: Path = typer.Argument(..., help="Dataset: .csv / .tsv (with a header) or .jsonl."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .csv / .tsv / .jsonl; rerun to resume it."),
    text_column: str = typer.Option("text", "--text-column", help="Column holding the text."),
    label_column: str = typer.Option(None, "--label-column", help="Column holding the label (kept as is)."),
    per_example: int = typer.Option(2, "--per-example", "-k", help="New examples to make from each row."),
    method: list[str] = typer.Option(None, "--method", help=f"Way(s) to make them: {', '.join(METHODS)} "
                                     "(repeatable; default: alternate both)."),
    similarity: float = typer.Option(0.8, "--similarity", help="Drop a new example whose character 3-gram "
                                     "Jaccard similarity to any kept text is at least this (1 = exact only)."),
    min_words: int = typer.Option(3, "--min-words", help="Drop new examples with fewer words."),
    max_words: int = typer.Option(None, "--max-words", help="Drop longer ones (default: twice the longest "
                                  "original)."),
    opening: float = typer.Option(0.5, "--opening", help="Fraction of an example's words a continuation keeps."),
    shots: int = typer.Option(3, "--shots", help="Examples shown in a few-shot prompt."),
    model: str = model_option(),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    json_schema: Path = json_schema_option("Write each new row as one JSON object valid under this JSON Schema "
                                           "(a .json file; its properties are columns, the text column among "
                                           "them; the label's is pinned to the source row's)."),
    ray: RayJob = None,
    runtime: Runtime = None,
    sampling: SamplingChoice = None,
) -> None:
    """Make --per-example new rows from each row of a labelled dataset, with the same label.

    New text comes from continuing an example's opening and from few-shot prompts made of other
    examples with the same label. Empty, too short/long and (near-)duplicate texts are dropped. The
    output keeps every original column plus aug_origin (original/generated), aug_source_row and
    aug_method; it is written row by row and an interrupted run resumes where it stopped.

    With --ray, Ray Data actors generate the texts and this process filters and writes them, row by row:
    the same file as without it.
    """
    from ..apps.augment import Augmenter, read_dataset

    spec = structured_outputs("gpt2lab augment", json_schema=json_schema)
    with user_errors():
        dataset = read_dataset(data, text_column, label_column)
    check_output(out, "--out", kind="file")
    gen = load_generator(model, driver_runtime(runtime, ray.address))
    with user_errors():
        job = Augmenter(gen, dataset, out, text_column=text_column, label_column=label_column,
                        per_example=per_example, methods=method or METHODS, params=sampling.resolve(gen),
                        similarity=similarity, min_words=min_words, max_words=max_words, opening=opening, shots=shots,
                        json_schema=spec.json if spec is not None else None)
    from ..console import echo, progress_bar

    try:  # the bar goes to stderr: stdout is the summary (JSON with --json)
        # errors are printed by user_errors after the bar is gone (a bar redrawn over them would hide them)
        with user_errors(), progress_bar(len(dataset.rows), "augment") as bar:
            if not ray.on:
                summary = job.run(lambda done, total: bar.update(done, total))
            else:
                prompt_kwargs = {"data": str(data.resolve()), "text_column": text_column,
                                 "label_column": label_column, "per_example": per_example,
                                 "methods": method or METHODS, "params": job.params, "opening": opening,
                                 "shots": shots, "json_schema": spec.json if spec is not None else None}
                with ray_session(ray.address, "gpt2lab augment --ray") as gray:
                    resources = actor_resources(runtime, ray.actors)

                    def generated(start: int):  # noqa: ANN202 - the actors' texts of rows start..
                        return gray.data.augment_rows(model_ref(model), start, len(dataset.rows), prompt_kwargs,
                                                      **resources)

                    summary = job.run(lambda done, total: bar.update(done, total), generated=generated)
    except typer.Exit as exc:
        if exc.exit_code == 130:
            echo(f"gpt2lab: interrupted; rerun the same command to resume {out}", sys.stderr)
        raise
    if as_json:
        echo(json.dumps(summary.to_dict()))
        return
    filtered = sum(summary.filtered.values())
    echo(f"rows in          {summary.rows_in}" + (f" ({summary.rows_resumed} done by an earlier run)"
                                                  if summary.rows_resumed else ""))
    echo(f"attempts         {summary.attempts} ({summary.per_example} per row)")
    echo(f"generated, kept  {summary.generated}")
    echo(f"filtered         {filtered}" + "".join(f"\n  {reason:15}{count}" for reason, count in
                                                  summary.filtered.items() if count))
    echo(f"rows out         {summary.rows_out} -> {summary.output}")
