"""``gpt2lab review``: blind human evaluation and curation of generated text in the browser.

``make`` writes a review file from two or more sources of completions, ``serve`` runs the review page,
``summary`` turns the judgement log into win rates, ratings and agreement, ``export`` writes the curated
dataset of an ``augment`` output.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ..console import echo
from ..sampling import SamplingParams
from .common import fail, user_errors
from .options import (
    Runtime,
    allowed_host_option,
    host_names,
    load_generator,
    process_escapes_all,
    runtime_options,
    sampling_options,
)

app = typer.Typer(help="Blind side-by-side ratings, 1-5 ratings and curation of generated text, in the browser.",
                  no_args_is_help=True)

MAKE_DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_new_tokens": 40, "seed": 0}


def parse_setting(text: str, base: SamplingParams) -> SamplingParams:
    """``'temperature=0.7,top_k=40'`` applied over ``base``; ``ValueError`` names a bad key or value."""
    changes: dict[str, Any] = {}
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ValueError(f"--setting {text!r}: write NAME=VALUE pairs separated by commas, e.g. "
                             "'temperature=0.7,top_k=40'")
        if key not in SamplingParams.field_names() or key in ("n", "logprobs"):
            raise ValueError(f"--setting {text!r}: unknown generation parameter {key!r}")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value.strip()
    if not changes:
        raise ValueError(f"--setting {text!r}: give at least one NAME=VALUE")
    if "max_length" in changes:
        changes.setdefault("max_new_tokens", None)
    return base.with_(**changes)


def _described(params: SamplingParams) -> dict[str, Any]:
    default = SamplingParams().to_dict()
    return {k: v for k, v in params.to_dict().items() if v != default.get(k)}


def _read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    out = process_escapes_all(prompts) or []
    if prompts_file is not None:
        from ..readers import iter_lines

        with user_errors():  # one prompt per line, lines ending at "\n" only (as generate --file and explore)
            out += [line for _, line in iter_lines(prompts_file) if line.strip()]
    return out


def _is_chat_model(gen: Any) -> bool:
    """A model with its own chat template (a chat fine-tune, an instruction model): it expects messages."""
    from ..generation.chat_format import style_for_model

    return style_for_model(gen.name, gen.path).kind == "template"


@app.command("make")
@runtime_options()
@sampling_options(defaults=MAKE_DEFAULTS, exclude={"n", "logprobs"})
def make(
    prompts: list[str] = typer.Argument(None, help="Prompts to complete (more with --prompts)."),
    out: Path = typer.Option(..., "--out", "-o", help="The review file to write (JSONL)."),
    prompts_file: Path = typer.Option(None, "--prompts", help="A file of prompts, one per line."),
    models: list[str] = typer.Option(None, "--model", "-m", help="A model to generate with (repeatable: one "
                                     "source per model, shared settings)."),
    server: str = typer.Option(None, "--server", help="Generate with a running `gpt2lab serve` at this URL instead of "
                               "loading models: each --model names one of its models or LoRA adapters."),
    api_key: str = typer.Option(None, "--api-key", envvar="GPT2LAB_API_KEY", help="The --server's API key."),
    settings: list[str] = typer.Option(None, "--setting", help="Generation settings of one source, e.g. "
                                       "'temperature=0.7,top_k=40' (repeatable; over the shared options)."),
    explore_dir: Path = typer.Option(None, "--explore", help="An `explore` --out directory: its settings' samples "
                                     "are sources."),
    explore_settings: list[str] = typer.Option(None, "--explore-setting", help="Keep only this explore setting "
                                               "label, e.g. 'T=0.7 k=50 p=0.9' (repeatable)."),
    completions: list[str] = typer.Option(None, "--completions", help="A JSONL/CSV/TSV file of completions, "
                                          "[LABEL=]FILE (repeatable: one source per file)."),
    prompt_column: str = typer.Option("prompt", "--prompt-column", help="Prompt column of --completions files."),
    completion_column: str = typer.Option("completion", "--completion-column", help="Completion column of "
                                          "--completions files."),
    augment_file: Path = typer.Option(None, "--augment", help="Curate this `augment` output instead (mode "
                                      "curation)."),
    text_column: str = typer.Option("text", "--text-column", help="Text column of the --augment output."),
    mode: str = typer.Option("pairwise", "--mode", help="pairwise (A/B) or ratings (1-5 per criterion)."),
    criteria: str = typer.Option("fluency,coherence,relevance", "--criteria", help="Comma-separated rating "
                                 "criteria."),
    samples: int = typer.Option(1, "--samples", help="Completions per prompt and generating source."),
    chat: bool = typer.Option(None, "--chat/--no-chat", help="Send each prompt to a model as the user's message "
                              "of a chat and review its replies (default: for models with their own chat "
                              "template, such as chat fine-tunes; with --server, only when given)."),
    system: str = typer.Option(None, "--system", help="The system message of those chats (default: the model's "
                               "own: a chat fine-tune's is the one it was trained with)."),
    max_items: int = typer.Option(None, "--max-items", help="Keep at most this many items (after shuffling)."),
    sampling: SamplingParams = None,
    runtime: Runtime = None,
) -> None:
    """Write a review file: the same prompts completed by two or more hidden sources (or an augment output)."""
    from ..apps.chat import first_replies
    from ..review import reviewset as rv

    if system is not None and chat is False:
        fail("--system is the system message of a chat; it cannot be used with --no-chat")
    system = None if system is None else process_escapes_all([system])[0]

    crit = [c for c in criteria.split(",")]
    if augment_file is not None:
        if models or settings or explore_dir or completions:
            fail("--augment curates one file: give no other source")
        with user_errors():
            review = rv.from_augment(augment_file, text_column)
            rv.write_review_set(review, out)
        echo(f"wrote {out}: {len(review.items)} generated rows to curate (accept / reject / edit)")
        return
    if mode not in ("pairwise", "ratings"):
        fail(f"--mode must be pairwise or ratings (curation: use --augment), got {mode!r}")
    with user_errors():
        rv.check_criteria(crit)
    sources: dict[str, rv.Rows] = {}
    described: dict[str, dict[str, Any]] = {}

    def add(label: str, rows: rv.Rows, desc: dict[str, Any]) -> None:
        if label in sources:
            fail(f"two sources are both called {label!r}; label them (e.g. --completions NAME=FILE)")
        sources[label], described[label] = rows, desc

    with user_errors():
        if explore_dir is not None:
            for label, rows in rv.read_explore(explore_dir, explore_settings or ()).items():
                add(label, rows, {"explore": str(explore_dir), "setting": label})
        elif explore_settings:
            fail("--explore-setting needs --explore DIR")
        for spec in completions or ():
            label, sep, path = spec.partition("=")
            if not sep or Path(spec).exists():
                label, path = Path(spec).stem, spec
            add(label, rv.read_completions(path, prompt_column, completion_column), {"completions": path})
        if models or settings:
            prompt_list = _read_prompts(prompts, prompts_file)
            if not prompt_list:
                fail("give prompts (arguments or --prompts FILE) for the models to complete")
            params_list = [(s, parse_setting(s, sampling)) for s in settings or [None]] if settings else [(None,
                                                                                                          sampling)]
            if server is not None and not models:
                fail("--server needs --model NAME for each served model or adapter to compare")
            from ..console import progress_bar

            generated = []  # added after the bars: an error line must not be drawn over by a bar
            for model in models or [None]:
                gen = load_generator(model, runtime) if server is None else None  # else the served one of that name
                title = gen.name if gen is not None else f"{model} at {server}"
                with progress_bar(len(params_list) * len(prompt_list), f"generating with {title}") as bar:
                    for text, params in params_list:
                        name = Path(model).name if model and Path(model).is_dir() else model
                        label = " | ".join(x for x in ((name if len(models or []) > 1 else None), text) if x) \
                            or (gen.name if gen is not None else model)
                        # a served model's template is the server's: chat there only when asked (--chat)
                        chatting = bool(chat) if gen is None else _is_chat_model(gen) if chat is None else chat
                        chat_desc = {"chat": True, "system": system} if chatting else {}
                        if gen is None:
                            rows = rv.server_rows(server, model, prompt_list, params, samples, api_key=api_key,
                                                  on_progress=bar, chat=chatting, system=system)
                            desc = {"model": model, "server": server, "params": _described(params), **chat_desc}
                        elif chatting:
                            rows = first_replies(gen, prompt_list, params, samples, system=system)
                            bar(len(prompt_list))
                            desc = {"model": gen.name, "params": _described(params), **chat_desc}
                        else:
                            rows = rv.generate_rows(gen, prompt_list, params, samples, on_progress=bar)
                            desc = {"model": gen.name, "params": _described(params)}
                        generated.append((label, rows, desc))
            for label, rows, desc in generated:
                add(label, rows, desc)
        if len(sources) < 2:
            fail("give two or more sources: --model A --model B, --setting S1 --setting S2, --explore DIR or "
                 "--completions FILE (any mix)")
        review = rv.build(sources, mode, criteria=crit, descriptions=described, seed=sampling.seed or 0,
                          max_items=max_items)
        rv.write_review_set(review, out)
    echo(f"wrote {out}: {len(review.items)} {mode} items from {len(sources)} sources ({', '.join(sources)})")


@app.command("serve")
def serve(
    review_file: Path = typer.Argument(..., help="A review file from `gpt2lab review make`."),
    log: Path = typer.Option(None, "--log", help="The judgement log (JSONL, appended; default: "
                             "REVIEW_FILE with .log.jsonl)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; anything but loopback needs --allow-remote."),
    port: int = typer.Option(8008, help="TCP port (0 picks a free one)."),
    allow_remote: bool = typer.Option(False, "--allow-remote", help="Bind a non-loopback address (the page has no "
                                      "login: anyone who reaches it can judge)."),
    blocklist: Path = typer.Option(None, "--blocklist", help="Words or phrases to flag, one per line."),
    similarity: float = typer.Option(0.7, "--similarity", help="Character 3-gram Jaccard similarity at which two "
                                     "texts are flagged as near-duplicates."),
    criteria: str = typer.Option(None, "--criteria", help="Comma-separated rating criteria (default: the review "
                                 "file's)."),
    log_level: str = typer.Option("warning", "--log-level", help="uvicorn log level."),
    allowed_host: list[str] = allowed_host_option(),
) -> None:
    """Serve the review page: reviewers judge in the browser; every judgement is appended to --log at once."""
    from ..http_guard import is_loopback

    if not is_loopback(host) and not allow_remote:
        fail(f"--host {host} is reachable from other machines and the page has no login; add --allow-remote "
             "to serve it anyway")
    if not 0 <= port <= 65535:
        fail(f"--port must be in [0, 65535], got {port}")
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        fail(f"--log-level must be one of critical, error, warning, info, debug, trace; got {log_level!r}")
    hosts = host_names(host, allowed_host)
    try:
        import uvicorn

        from ..review.app import create_app
    except ImportError as exc:
        fail(f"gpt2lab review serve needs {exc.name}: pip install 'gpt2lab[review]'")
    from ..review import read_review_set
    from ..review.reviewset import check_criteria
    from ..review.screening import read_blocklist

    log = log or review_file.with_name(review_file.name.removesuffix(".jsonl") + ".log.jsonl")
    with user_errors():
        review = read_review_set(review_file)
        if criteria:
            review.criteria = check_criteria(criteria.split(","))
        words = read_blocklist(blocklist) if blocklist else []
        app_ = create_app(review, log, blocklist=words, similarity=similarity, title=review_file.name,
                          allowed_hosts=hosts)
    if port == 0:  # pick the free port here, so the address printed is the one served
        import socket

        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
    echo(f"reviewing {review_file} ({review.mode}, {len(review.items)} items); judgements go to {log}")
    echo(f"open http://{host}:{port}/ in a browser")
    uvicorn.run(app_, host=host, port=port, log_level=log_level)


@app.command("summary")
def summary(
    log: Path = typer.Argument(..., help="A judgement log written by `gpt2lab review serve`."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
    out: Path = typer.Option(None, "--out", "-o", help="Also write summary.json, plot.png and report.html here."),
) -> None:
    """Win rates (Wilson 95% CI), Bradley-Terry, mean ratings (t 95% CI) and reviewer agreement of a log."""
    from ..review import read_log
    from ..review.stats import require_extras
    from ..review.summary import summarize, tables, write_outputs

    with user_errors((ImportError,)):
        require_extras()
        records = read_log(log)
        if not records:
            fail(f"{log}: holds no judgements yet")
        result = summarize(records)
        paths = write_outputs(result, out, title=log.name) if out is not None else None
    if as_json:
        echo(json.dumps(result))
        return
    from ..console import print_table

    # reviewer names, sources and comments are text from the log: printed literally (never as markup)
    echo(f"{result['counted']} judgements of {result['items']} items by {len(result['reviewers'])} "
         f"reviewer(s): {', '.join(result['reviewers'])}")
    for caption, head, rows in tables(result):
        print_table(caption, head, rows, width=160)  # piped: wide enough for every column
    if paths:
        echo(f"wrote {', '.join(str(p) for p in paths.values())}")


@app.command("export")
def export(
    review_file: Path = typer.Argument(..., help="A curation review file (made with --augment)."),
    log: Path = typer.Option(..., "--log", help="Its judgement log."),
    out: Path = typer.Option(..., "--out", "-o", help="The curated dataset (same format as the augment output)."),
    keep_unreviewed: bool = typer.Option(False, "--keep-unreviewed", help="Keep generated rows nobody reviewed "
                                         "(default: drop them)."),
    as_json: bool = typer.Option(False, "--json", help="Print the counts as one JSON object."),
) -> None:
    """Write the curated dataset: originals, accepted and edited rows; rejected (and unreviewed) ones dropped."""
    from ..review import read_log, read_review_set
    from ..review.curate import export_curated

    with user_errors():
        result = export_curated(read_review_set(review_file), read_log(log), out, keep_unreviewed=keep_unreviewed)
    if as_json:
        echo(json.dumps(result.to_dict()))
        return
    echo(f"rows in {result.rows_in}, out {result.rows_out}: {result.accepted} accepted, {result.edited} edited, "
          f"{result.rejected} rejected, {result.unreviewed} unreviewed"
          f"{' (kept)' if keep_unreviewed else ' (dropped)'} -> {result.output}")
