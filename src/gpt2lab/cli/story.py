"""``gpt2lab story``: drafts of a story from a premise, or the continuation of a text file."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from ..apps.story import DEFAULTS
from .common import check_output, fail, user_errors
from .options import (
    BEAM_OPTIONS,
    Runtime,
    SamplingChoice,
    load_generator,
    model_option,
    process_escapes,
    runtime_options,
    sampling_options,
)

# story counts its length with --length, makes --drafts samples and cannot beam-search varied drafts
_EXCLUDE = {"n", "logprobs", "max_new_tokens", "max_length", "truncate_prompt", *BEAM_OPTIONS}


@sampling_options(defaults=DEFAULTS, exclude=_EXCLUDE, defaults_win=True)
@runtime_options()
def story(
    premise: str = typer.Argument("", help="What the story is about; it starts the story and stays in view."),
    drafts: int = typer.Option(1, "--drafts", "-d", help="Number of drafts (each with seed + draft number)."),
    length: int = typer.Option(300, "--length", "-l", help="New tokens per draft; may exceed the model's window."),
    continue_file: Path = typer.Option(None, "--continue", help="Continue the text of this file instead."),
    out: Path = typer.Option(Path("stories"), "--out", "-o", help="Folder for the drafts (created if needed)."),
    model: str = model_option(),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Do not stream the first draft to the terminal."),
    runtime: Runtime = None,
    sampling: SamplingChoice = None,
) -> None:
    """Write story drafts from a premise (or continue a text file); each draft goes to a file in --out.

    The first draft is streamed to the terminal as it is written. Stories longer than the model's
    context window are written by sliding it: the premise and the most recent text stay in view.
    """
    from ..apps.story import save_stories, slug, write_stories

    premise = process_escapes(premise)
    start = None
    if continue_file is not None:
        from ..readers import read_text

        try:
            start = read_text(continue_file)
        except FileNotFoundError:
            fail(f"--continue {continue_file}: file not found")
        except ValueError as exc:
            fail(f"--continue {exc}")
        if not start.strip():
            fail(f"--continue {continue_file}: the file is empty")
    elif not premise.strip():
        fail("give a premise (or --continue FILE)")
    check_output(out, "--out")
    gen = load_generator(model, runtime)
    from contextlib import ExitStack

    from ..console import echo, progress_bar, write

    opening = premise if start is None else start  # what the streamed draft is printed after
    streamed = {"shown": False, "ended": quiet}
    bar = None

    def show(delta: str) -> None:
        if not streamed["shown"]:
            streamed["shown"] = True
            write(opening, flush=False)
        write(delta)

    def progress(p) -> None:  # noqa: ANN001 - apps.story.StoryProgress
        nonlocal bar
        if 0 in p.finished and not streamed["ended"]:  # the streamed draft is done: end its line
            streamed["ended"] = True
            write(("" if streamed["shown"] else opening) + "\n")
        if bar is None and streamed["ended"] and len(p.finished) < drafts:
            # the other drafts may run for minutes more: say so (on a terminal; a log gets the summary)
            bar = stack.enter_context(progress_bar(p.total_tokens, f"{drafts} drafts, tokens"))
        if bar is not None:
            bar.update(p.tokens)

    with user_errors((OSError,)), ExitStack() as stack:
        stories = write_stories(gen, premise, drafts=drafts, length=length, params=sampling.resolve(gen),
                                continue_from=start, on_text=None if quiet else show, on_progress=progress)
    with user_errors((OSError,)):
        paths = save_stories(stories, out, slug(premise or continue_file.stem))
    if not streamed["ended"]:
        write(("" if streamed["shown"] else stories[0].text) + "\n")
    for s, path in zip(stories, paths):
        note = "" if s.finish_reason == "length" else " (ended early: the model finished the story; " \
            "--ignore-eos keeps going)"
        echo(f"gpt2lab: draft {s.draft + 1}: {path} ({s.new_tokens} new tokens){note}", sys.stderr)
