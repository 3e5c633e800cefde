"""``gpt2lab chat``: talk with a model in the terminal, or answer one message (``--message``)."""

from __future__ import annotations

import shlex
from pathlib import Path

import typer

from ..apps.chat import DEFAULTS, UNSUPPORTED
from ..console import echo, write
from .common import check_output, fail, user_errors
from .options import (
    Runtime,
    SamplingChoice,
    load_generator,
    model_option,
    process_escapes,
    runtime_options,
    sampling_options,
)

HELP = """commands:
  /reset              forget the conversation (the persona stays)
  /save FILE          write the transcript to FILE (load it later with --transcript FILE)
  /set NAME VALUE     change a generation option, e.g. /set temperature 0.7, /set stop ["."]
  /set                show the options that differ from the defaults
  /help               this help
  /quit               leave (Ctrl-D too)"""


def _repl(session, prompt: str, save: Path | None) -> None:
    from ..apps.chat import describe
    from ..errors import GenerationFailed
    from ..generation.chat_template import ChatTemplateFault

    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:  # pragma: no cover - Windows
        pass
    bot = session.style.bot_name
    echo(f"Chatting with {session.generator.name} as {bot}. /help lists the commands, /quit leaves.")
    while True:
        try:
            line = input(prompt)
        except EOFError:
            echo()
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, rest = line.partition(" ")
            rest = rest.strip()
            if command in ("/quit", "/exit", "/q"):
                return
            if command == "/help":
                echo(HELP)
            elif command == "/reset":
                session.reset()
                echo("(conversation cleared)")
            elif command == "/save":
                if not rest:
                    echo("usage: /save FILE")
                    continue
                try:
                    path = session.save(Path(shlex.split(rest)[0]).expanduser())
                    echo(f"(saved {len(session.turns)} turns to {path})")
                except (OSError, ValueError) as exc:
                    echo(f"error: {exc}")
            elif command == "/set":
                if not rest:
                    echo(describe(session.params))
                    continue
                name, _, value = rest.partition(" ")
                try:
                    session.set_option(name, value)
                    key = name.replace("-", "_").lower()
                    echo(f"({key} = {getattr(session.params, key)!r})")
                except ValueError as exc:
                    echo(f"error: {exc}")
            else:
                echo(f"unknown command {command}; /help lists them")
            continue
        write(f"{bot}: ")
        try:
            reply = session.reply(line, on_text=write)
        # GenerationFailed and a template crossing its bounds on this message ended the session with a traceback
        except (ValueError, GenerationFailed, ChatTemplateFault) as exc:
            echo(f"\nerror: {exc}")
            continue
        except KeyboardInterrupt:
            echo("\n(interrupted)")
            continue
        echo("" if reply else "...")
        if save is not None:
            try:
                session.save(save)
            except OSError as exc:
                echo(f"error: --save {save}: {exc}")


@sampling_options(defaults=DEFAULTS, exclude=set(UNSUPPORTED))
@runtime_options()
def chat(
    persona: str = typer.Option(None, "--persona", "-p", help="Who the bot is: the preamble of the conversation."),
    message: str = typer.Option(None, "--message", help="Answer this one message, print the reply and exit."),
    transcript: Path = typer.Option(None, "--transcript", help="Continue the conversation saved in this file."),
    save: Path = typer.Option(None, "--save", help="Write the transcript to this file after every reply."),
    bot_name: str = typer.Option(None, "--bot-name", help="The bot's name in the transcript (default: Bot)."),
    user_name: str = typer.Option(None, "--user-name", help="The user's name in the transcript (default: User)."),
    model: str = model_option(),
    runtime: Runtime = None,
    sampling: SamplingChoice = None,
) -> None:
    """Chat with a model in the terminal (/help lists the slash commands), or answer one --message.

    GPT-2 continues text, so the conversation is laid out as a transcript (persona, then "User:" and
    bot lines) and the reply stops where the next user turn would start; DialoGPT models get their own
    layout. The oldest turns are dropped when the conversation outgrows the model's window.
    """
    from ..apps.chat import ChatSession

    # text options understand backslash escapes ("\\n"), as every command's do
    persona, message, bot_name, user_name = (None if v is None else process_escapes(v)
                                              for v in (persona, message, bot_name, user_name))
    if message is not None and not message.strip():
        fail("--message is empty")
    if save is not None:
        check_output(save, "--save", kind="file")
    gen = load_generator(model, runtime)
    with user_errors((OSError,)):
        session = ChatSession(gen, persona=persona, params=sampling.resolve(gen), user_name=user_name,
                              bot_name=bot_name)
        session.style.chat_template.probe()  # a broken checkpoint template fails now, in one line
        if transcript is not None:
            session.load(transcript, keep_persona=persona is not None)
    if message is not None:
        with user_errors((OSError,)):
            echo(session.reply(message))
            if save is not None:
                session.save(save)
        return
    _repl(session, f"{session.style.user_name}> ", save)
