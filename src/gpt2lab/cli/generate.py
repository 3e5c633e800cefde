"""``gpt2lab generate``: complete prompts from the command line, a file or stdin."""

from __future__ import annotations

import codecs
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import typer

from ..console import echo, progress_bar, write
from .common import check_output, fail, user_errors
from .distributed import RayJob, actor_resources, driver_runtime, model_ref, no_ray_without, ray_options, ray_session
from .options import (
    Runtime,
    SamplingChoice,
    load_generator,
    model_option,
    process_escapes_all,
    runtime_options,
    sampling_options,
)
from .structured import choice_option, grammar_option, json_schema_option, regex_option, structured_outputs

_CHUNK = 16  # prompts generated together in --json mode (results print as each chunk finishes)


def read_prompts(lines: list[str], source: str) -> list[str]:
    """Prompts from text lines: JSONL objects with a "prompt" field, or else one prompt per line."""
    lines = [line.rstrip("\r\n") for line in lines]
    numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
    if not numbered:
        fail(f"{source}: no prompts (expected one prompt per line, or JSONL with a \"prompt\" field)")
    if not numbered[0][1].lstrip().startswith("{"):
        return [line for _, line in numbered]
    from ..readers import parse_jsonl

    prompts = []
    try:
        for number, record in parse_jsonl(lines, source):
            if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
                fail(f"{source}:{number}: expected a JSON object with a string \"prompt\" field")
            prompts.append(record["prompt"])
    except ValueError as exc:
        fail(f"{exc}; a JSONL file needs one object per line")
    return prompts


def _print_logprobs(logprobs: list) -> None:
    for t in logprobs:
        alternatives = ", ".join(f"{s!r} {v:.3f}" for _, s, v in t.top)
        echo(f"  {t.token!r:>20} {t.logprob:8.3f}" + (f"   top: {alternatives}" if alternatives else ""))


# the seed's recipe: generate_text(prompt, max_length=100, temperature=0.8, top_k=50)
DEFAULTS = {"max_length": 100, "temperature": 0.8, "top_k": 50}


@sampling_options(defaults=DEFAULTS)
@runtime_options()
@ray_options("gpt2lab generate --ray")
def generate(
    prompts: list[str] = typer.Argument(None, help="Prompts to complete (default: read --file, else stdin)."),
    file: Path = typer.Option(None, "--file", "-f", help="Read prompts from a file: one per line, or JSONL "
                              "objects with a \"prompt\" field. '-' reads stdin."),
    model: str = model_option(),
    as_json: bool = typer.Option(False, "--json", help="Write one JSON object per completion instead of streaming."),
    out: Path = typer.Option(None, "--out", "-o", help="Write the --json objects (JSONL) to this file instead, "
                             "atomically (it appears when every prompt is done)."),
    json_schema: Path = json_schema_option(),
    regex: str = regex_option(),
    choice: list[str] = choice_option(),
    grammar: Path = grammar_option(),
    ray: RayJob = None,
    runtime: Runtime = None,
    sampling: SamplingChoice = None,
) -> None:
    """Complete prompts with a GPT-2 model, streaming the text as it is generated.

    Prompts: the arguments, else --file, else stdin (one per line, or JSONL with a "prompt" field).

    Prompt arguments and text options understand backslash escapes (\\n, \\t, \\\\, \\xNN, \\uNNNN).

    Defaults: the model's generation_config.json, else the classic recipe: temperature 0.8, top-k 50,
    100 tokens in all unless --max-new-tokens. Options given here win over both.

    With --seed, prompt i (0-based, in input order) is seeded with row_seed(seed, i): the same text
    whichever batch, process or Ray actor completes it (prompt 0 uses the seed itself).

    --json-schema, --regex, --choice or --grammar hold every output to that shape (docs/structured-outputs.md).
    """
    if ray.on:
        no_ray_without("--out FILE", out is not None)
    structured = structured_outputs("gpt2lab generate", json_schema=json_schema, regex=regex, choice=choice,
                                    grammar=grammar)
    if structured is not None:
        with user_errors():  # with the flags given (beam search, say), before any model loads
            sampling.params.with_(structured_outputs=structured)
    prompt_list = _collect_prompts(process_escapes_all(prompts) or [], file)
    if out is not None:
        check_output(out, "--out", kind="file")
    gen = load_generator(model, driver_runtime(runtime, ray.address))
    with user_errors():
        params = sampling.resolve(gen)  # flags > the checkpoint's generation_config.json > DEFAULTS
        if structured is not None:
            params = params.with_(structured_outputs=structured)
    from ..generation import fit_prompt

    with user_errors():  # a request the engine ended with an error (GenerationFailed) too: its reason, in one line
        for p in prompt_list:  # fail on an unusable prompt before printing anything
            fit_prompt(gen.encode_prompt(p), params, gen.config.n_positions)
        if out is not None:
            from ..atomic import write_file

            def write_records(f: BinaryIO) -> None:
                with progress_bar(len(prompt_list), "generate") as bar:
                    advance = bar.update
                    records = (_ray_records(gen, prompt_list, params, model, ray, runtime, advance)
                               if ray.on else _records(gen, prompt_list, params, advance))
                    for record in records:
                        f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

            write_file(out, write_records)  # the file appears when every prompt is done
        elif as_json:
            for record in _records(gen, prompt_list, params):
                echo(json.dumps(record, ensure_ascii=False))
        else:
            _stream(gen, prompt_list, params)


def _records(gen, prompts: list[str], params, advance=None) -> Iterator[dict[str, Any]]:  # noqa: ANN001
    """The --json objects of every completion, prompt by prompt, ``_CHUNK`` prompts in one batch."""
    from ..generation.batch import completion_record, generate_rows

    for start in range(0, len(prompts), _CHUNK):
        chunk = prompts[start:start + _CHUNK]
        for row in generate_rows(gen, chunk, range(start, start + len(chunk)), params):
            for c in row:
                yield completion_record(gen.name, c)
        if advance:
            advance(start + len(chunk))


def _ray_records(gen, prompts: list[str], params, model: str | None, ray: RayJob, runtime,  # noqa: ANN001
                 advance) -> Iterator[dict[str, Any]]:
    """The same objects as :func:`_records`, from Ray Data actors (each loads ``model`` as this process did)."""
    from ..generation.batch import completion_record
    from ..generation.outputs import Completion

    with ray_session(ray.address, "gpt2lab generate --ray") as gray:
        rows = gray.data.generation_rows(model_ref(model), prompts, params, progress=advance,
                                         **actor_resources(runtime, ray.actors))
        for row in rows:
            for r in row:
                c = Completion(text=r["text"], token_ids=[int(t) for t in r["token_ids"]],
                               finish_reason=r["finish_reason"], prompt=r["prompt"], index=int(r["index"]))
                record = completion_record(gen.name, c)
                record["logprobs"] = None if r["logprobs"] is None else json.loads(r["logprobs"])
                yield record


def _collect_prompts(prompts: list[str], file: Path | None) -> list[str]:
    if prompts and file is not None:
        fail("give prompts as arguments or with --file, not both")
    if prompts:
        return prompts
    from ..readers import decode, iter_lines

    if file is not None and str(file) != "-":
        try:
            return read_prompts([line for _, line in iter_lines(file)], str(file))
        except (OSError, ValueError) as exc:
            fail(f"--file {file}: cannot read ({exc})" if isinstance(exc, OSError) else str(exc))
    if sys.stdin.isatty() and file is None:
        fail("no prompt: give one as an argument, with --file, or on stdin")
    with user_errors():  # the same rules as a file: BOM dropped, lines end at "\n" only
        text = decode(sys.stdin.buffer.read().removeprefix(codecs.BOM_UTF8), "stdin")
    return read_prompts(text.split("\n"), "stdin")


def _stream(gen, prompts: list[str], params) -> None:
    """Print each prompt with its completions (blank line between them); sample 0 streams live (beams are
    only known at the end). The text is written as :mod:`gpt2lab.console` writes: exactly to a file or a
    pipe, its control characters escaped on a terminal. Prompt ``k`` is seeded with ``row_seed(seed, k)``."""
    from ..generation.batch import row_params

    for k, prompt in enumerate(prompts):
        if k:
            echo()
        for j, (text, logprobs) in enumerate(_stream_first(gen, prompt, row_params(params, k))):
            if j:
                echo()
                echo(prompt + text)
            if logprobs:
                _print_logprobs(logprobs)


def _stream_first(gen, prompt: str, params) -> list[tuple[str, list | None]]:
    """Run one prompt's ``n`` samples (or beams) together, printing sample 0 as it comes; return all of them."""
    from ..errors import GenerationFailed

    runner = gen.runner(num_beams=params.num_beams)
    request_id = runner.add(gen.encode_prompt(prompt), params)
    write(prompt)
    try:
        for out in runner.outputs():
            if out.index == 0 and out.text:
                write(out.text)
    except GenerationFailed:  # the error goes on a line of its own
        echo()
        raise
    echo()
    return [(c.text, c.logprobs) for c in runner.completions(request_id)]
