"""The generation options every generating command shares (``--temperature``, ``--top-k``, ...).

Declared once here so ``generate``, ``story``, ``chat`` and ``augment`` spell, document and validate
them identically. A command opts in with :func:`sampling_options` and receives one validated
:class:`~gpt2lab.sampling.SamplingParams` in its ``sampling`` parameter::

    @sampling_options(defaults={"temperature": 0.8, "top_k": 50}, exclude={"n"})
    def story(premise: str = typer.Argument(...), sampling: SamplingParams = None) -> None: ...

Every option defaults to "not given" so a command's own ``defaults`` (then SamplingParams' own) apply;
the help text shows the value that applies.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import typer

from .common import fail, user_errors

MODEL_HELP = ("Local directory, bundled name or Hub id (default: gpt2, or the bundled model when gpt2 cannot "
              "be had; a model named here never falls back).")


def model_option() -> Any:
    """``--model/-m``, spelled the same in every command."""
    return typer.Option(None, "--model", "-m", help=MODEL_HELP)


ALLOWED_HOST_HELP = ("Also answer requests for this host name (the name clients use to reach the server); "
                     ".example.org for a domain and its subdomains, * for any. Repeatable. By default only "
                     "localhost, loopback addresses and --host are answered: a web page that re-points its own "
                     "name here (DNS rebinding) gets 403.")


def allowed_host_option() -> Any:
    """``--allowed-host`` of the local web servers (``serve``, ``review serve``)."""
    return typer.Option(None, "--allowed-host", help=ALLOWED_HOST_HELP)


def host_names(host: str, extra: list[str] | None) -> tuple[str, ...]:
    """The ``Host`` names a server bound to ``host`` answers, with the ``--allowed-host`` entries ``extra``
    (:func:`gpt2lab.http_guard.allowed_hosts`); a bad entry is a one-line error."""
    from ..http_guard import allowed_hosts

    try:
        return allowed_hosts(host, extra or ())
    except ValueError as exc:
        fail(str(exc))


# -- text options: backslash escapes ------------------------------------------------------------
_SIMPLE_ESCAPES = {"n": b"\n", "r": b"\r", "t": b"\t", "'": b"'", '"': b'"', "\\": b"\\"}
_HEX = frozenset("0123456789abcdefABCDEF")


def process_escapes(text: str) -> str:
    r"""Backslash escapes in a command-line text option, as llama.cpp's ``string_process_escapes``.

    ``\n``, ``\r``, ``\t``, ``\'``, ``\"`` and ``\\`` are the characters; ``\xNN`` is the byte
    ``NN`` (two hex digits; bytes join into UTF-8, so ``\xc3\xa9`` is "é"); ``\uNNNN`` (four hex digits,
    an addition to llama.cpp's set) is that code point. Anything else, a lone trailing backslash
    included, stays as written, so Windows paths and regex-like text survive. Undecodable bytes become
    U+FFFD.
    """
    if "\\" not in text:
        return text
    out = bytearray()
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch != "\\" or i + 1 == n:
            out += ch.encode("utf-8", "surrogatepass")
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[nxt]
            i += 2
        elif nxt == "x" and len(text[i + 2:i + 4]) == 2 and set(text[i + 2:i + 4]) <= _HEX:
            out.append(int(text[i + 2:i + 4], 16))
            i += 4
        elif nxt == "u" and len(text[i + 2:i + 6]) == 4 and set(text[i + 2:i + 6]) <= _HEX:
            out += chr(int(text[i + 2:i + 6], 16)).encode("utf-8", "surrogatepass")
            i += 6
        else:  # unknown escape: kept, backslash and all (llama.cpp does the same)
            out += ("\\" + nxt).encode("utf-8", "surrogatepass")
            i += 2
    return out.decode("utf-8", "replace")


def process_escapes_all(values: list[str] | None) -> list[str] | None:
    """:func:`process_escapes` over a repeatable option's values (None stays None)."""
    return None if values is None else [process_escapes(v) for v in values]


# -- where and how a model runs -------------------------------------------------------------------
DEVICE_HELP = "auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N."
DTYPE_HELP = ("auto (a checkpoint stored in float16/bfloat16 keeps its dtype; else bfloat16 on a GPU that "
              "supports it, else float32), float32, bfloat16 or float16.")
# the commands that load a model default to gpt2lab.load's dtype=None: a half-precision checkpoint would
# otherwise stay fp16 on the CPU, where gpt2lab's kernels (fp32, or --quantization) do not run it
LOAD_DTYPE_HELP = ("float32, bfloat16, float16, or auto (a checkpoint stored in float16/bfloat16 keeps its "
                   "dtype). Default: bfloat16 on a GPU that supports it, else float32.")
QUANTIZATION_NONE = "none"  # the CLI's word for the library's quantization=None
QUANTIZATION_HELP = "Weight-only quantization of the linear layers: none, int8, bf16 or int4."
THREADS_HELP = "CPU threads for torch's operators (default: torch's choice; on a busy machine fewer can be faster)."
RUNTIME_THREADS_HELP = ("CPU threads: auto (default: gpt2lab's kernels time each kind of forward and keep the "
                        "fastest count, which follows other processes' load) or N to pin N (torch's too).")
RUNTIME_PANEL = "Device and precision"


def device_option(default: str = "auto") -> Any:
    """``--device``, spelled and documented the same in every command."""
    return typer.Option(default, "--device", help=DEVICE_HELP, rich_help_panel=RUNTIME_PANEL)


def dtype_option(default: str | None = "auto", help: str = DTYPE_HELP) -> Any:  # noqa: A002 - typer's word
    """``--dtype``, spelled the same in every command."""
    return typer.Option(default, "--dtype", help=help, rich_help_panel=RUNTIME_PANEL)


def threads_option(help: str = THREADS_HELP) -> Any:  # noqa: A002 - typer's word
    """``--threads``, spelled the same in every command."""
    return typer.Option(None, "--threads", help=help, rich_help_panel=RUNTIME_PANEL)


@dataclass(frozen=True)
class Runtime:
    """Where and how a command runs its model: ``--device``, ``--dtype``, ``--quantization``, ``--threads``."""

    device: str = "auto"
    dtype: str | None = None  # None: gpt2lab.load's default (float32 on a CPU, whatever the checkpoint stores)
    quantization: str | None = None  # None: not asked for (the library's default)
    threads: int | str | None = None  # None: not asked for (auto); "auto"; or a pinned count

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`gpt2lab.load`; ``quantization`` only when asked for."""
        kwargs: dict[str, Any] = {"device": self.device, "dtype": self.dtype}
        if self.quantization is not None:
            kwargs["quantization"] = None if self.quantization == QUANTIZATION_NONE else self.quantization
        return kwargs


def load_generator(model: str | None, runtime=None, *, load: Callable | None = None):  # noqa: ANN001
    """Load a model for a command (``runtime``: its ``--device``/``--dtype``/``--quantization``, a
    :class:`~gpt2lab.cli.options.Runtime`), with the user-facing error handling."""
    from ..generation import load as default_load

    loader = load or default_load
    kwargs = load_kwargs(runtime, loader)
    with user_errors():
        return loader(model, **kwargs)


def load_kwargs(runtime, loader: Callable | None = None) -> dict:  # noqa: ANN001 - a cli.options.Runtime
    """``runtime``'s keyword arguments for ``loader`` (default :func:`gpt2lab.load`); fails in one line when
    ``--quantization`` asks for what this ``loader`` cannot do."""
    import inspect

    if loader is None:
        from ..generation import load as loader
    kwargs = (runtime or Runtime()).load_kwargs()
    if "quantization" in kwargs and "quantization" not in inspect.signature(loader).parameters:
        if kwargs["quantization"] is not None:
            fail(f"--quantization {kwargs['quantization']} is not available in this version of gpt2lab")
        del kwargs["quantization"]  # "none" is what it does anyway
    return kwargs


def apply_threads(threads: int | str | None) -> None:
    """``--threads N``: the kernels' count and torch's intra-op and inter-op thread pools (checked: an
    integer in [1, 1024]); ``--threads auto``: the kernels choose (:mod:`gpt2lab.runtime.threads`)."""
    if threads is not None:
        from ..runtime import set_threads

        set_threads(threads)


def _threads_value(threads: int | str | None) -> int | str | None:
    """``--threads``' value: None, ``"auto"`` or an integer in [1, MAX_THREADS]; ValueError naming it otherwise."""
    from ..placement import MAX_THREADS, check_threads

    if threads is None or (isinstance(threads, str) and threads.strip().lower() == "auto"):
        return None if threads is None else "auto"
    message = f"--threads must be auto or an integer in [1, {MAX_THREADS}], got {threads!r}"
    try:
        return check_threads(int(threads), "--threads")
    except ValueError:  # not a number, or out of range: one message for both
        raise ValueError(message) from None


def build_runtime(device: str, dtype: str | None, quantization: str | None,
                  threads: int | str | None) -> Runtime:
    """Check the runtime options with :mod:`gpt2lab.placement`'s vocabulary (whether the device is there is
    checked when the model loads). ``ValueError`` naming the option and its choices."""
    from ..placement import QUANTIZATIONS, check_quantization, device_name, dtype_name

    if quantization is not None:
        spelled = quantization.strip().lower()
        if spelled != QUANTIZATION_NONE and spelled not in QUANTIZATIONS:
            raise ValueError(f"--quantization must be one of {', '.join((QUANTIZATION_NONE, *QUANTIZATIONS))}, "
                             f"got {quantization!r}")
        quantization = spelled if spelled == QUANTIZATION_NONE else check_quantization(spelled, "--quantization")
    threads = _threads_value(threads)
    if dtype is not None:
        dtype_name(dtype, "--dtype")  # checked; passed on as spelled (gpt2lab.load reads the same names)
    return Runtime(device=device_name(device, "--device"), dtype=dtype.strip().lower() if dtype is not None else None,
                   quantization=quantization, threads=threads)


def command_options(receiver: str, options: Sequence[inspect.Parameter], build: Callable[[dict[str, Any], Any], Any],
                    *, receives: str, group: str) -> Callable[[Callable], Callable]:
    """The one way a group of options is added to typer commands: ``options`` (keyword-only parameters whose
    defaults are ``typer.Option``s) join the command's own parameters, and the command receives
    ``build(values, annotation)`` as its ``receiver`` parameter instead (``values``: each option's value by
    name; ``annotation``: the command's annotation of ``receiver``). A ``ValueError``/``TypeError`` from
    ``build`` fails the command in one line; a command without ``receiver``, or with a parameter named as one
    of the options, is a ``TypeError`` when it is decorated."""
    names = [p.name for p in options]

    def decorate(func: Callable) -> Callable:
        hints = typing.get_type_hints(func, include_extras=True)
        sig = inspect.signature(func)
        if receiver not in sig.parameters:
            raise TypeError(f"{func.__name__} needs a {receiver!r} parameter to receive {receives}")
        own = [p.replace(annotation=hints.get(p.name, p.annotation))
               for p in sig.parameters.values() if p.name != receiver]
        clash = {p.name for p in own} & set(names)
        if clash:
            raise TypeError(f"{func.__name__}: parameters {sorted(clash)} clash with the {group} options")
        annotation = hints.get(receiver)

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name, None) for name in names}
            try:
                value = build(values, annotation)
            except (ValueError, TypeError) as exc:
                fail(str(exc))
            return func(*args, **{receiver: value}, **kwargs)

        own_positional = [p.replace(kind=inspect.Parameter.POSITIONAL_OR_KEYWORD) if
                          p.kind == inspect.Parameter.KEYWORD_ONLY else p for p in own]
        params = [*own_positional, *options]
        wrapper.__signature__ = sig.replace(parameters=params, return_annotation=sig.return_annotation)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        del wrapper.__wrapped__  # typer must read the new signature, not the original's
        return wrapper

    return decorate


def runtime_options(*, quantization: bool = True, threads: bool = True) -> Callable[[Callable], Callable]:
    """Add ``--device``, ``--dtype`` (and ``--quantization``, ``--threads``) to a typer command.

    The command receives them checked as ``runtime: Runtime``; ``--threads`` is applied before it runs.
    """
    added = [("device", str, device_option()), ("dtype", str | None, dtype_option(None, LOAD_DTYPE_HELP))]
    if quantization:
        added.append(("quantization", str | None, typer.Option(None, "--quantization", help=QUANTIZATION_HELP,
                                                               rich_help_panel=RUNTIME_PANEL)))
    if threads:
        added.append(("threads", str | None, threads_option(RUNTIME_THREADS_HELP)))

    def build(values: dict[str, Any], _annotation: Any) -> Runtime:
        runtime = build_runtime(values["device"], values["dtype"], values.get("quantization"), values.get("threads"))
        apply_threads(runtime.threads)
        return runtime

    return command_options("runtime", [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                                         annotation=kind) for name, kind, opt in added],
                           build, receives="Runtime", group="runtime")


@dataclass(frozen=True)
class _Opt:
    name: str  # SamplingParams field
    type: Any
    help: str
    flag: str | None = None  # defaults to --field-name
    short: str | None = None


# The order is the order shown in --help.
SAMPLING_OPTIONS: list[_Opt] = [
    _Opt("max_new_tokens", int | None, "New tokens to generate (not counting the prompt)."),
    _Opt("max_length", int | None, "Prompt + new tokens, as in transformers (give this or --max-new-tokens)."),
    _Opt("temperature", float | None, "Sampling temperature; 0 = greedy.", short="-t"),
    _Opt("top_k", int | None, "Keep the K most likely tokens (0 = off)."),
    _Opt("top_p", float | None, "Nucleus sampling: smallest set with this probability mass (1 = off)."),
    _Opt("min_p", float | None, "Drop tokens below min_p x the top probability (0 = off)."),
    _Opt("typical_p", float | None, "Locally typical sampling mass (1 = off)."),
    _Opt("repetition_penalty", float | None, "Penalise tokens already in prompt or output (1 = off)."),
    _Opt("presence_penalty", float | None, "OpenAI presence penalty over generated tokens, in [-2, 2]."),
    _Opt("frequency_penalty", float | None, "OpenAI frequency penalty over generated tokens, in [-2, 2]."),
    _Opt("no_repeat_ngram_size", int | None, "Never repeat an n-gram of this size (0 = off)."),
    _Opt("stop", list[str] | None, "Stop string (repeatable); removed from the output."),
    _Opt("stop_token_ids", list[int] | None, "Stop at this token id (repeatable).", "--stop-token-id"),
    _Opt("bad_words", list[str] | None, "A string that may never be generated (repeatable).", "--bad-word"),
    _Opt("bad_words_ids", list[str] | None, "Comma-separated token ids that may never be generated in a row "
         "(repeatable).", "--bad-words-ids"),
    _Opt("logit_bias", list[str] | None, "TOKEN_ID:BIAS added to a token's logit (repeatable).", "--logit-bias"),
    _Opt("ignore_eos", bool | None, "Keep generating past <|endoftext|>.", "--ignore-eos"),
    _Opt("n", int | None, "Completions per prompt.", short="-n"),
    _Opt("num_beams", int | None, "Beam search with this many beams (1 = sampling)."),
    _Opt("length_penalty", float | None, "Beam search: exponent of the length in the score."),
    _Opt("early_stopping", bool | None, "Beam search: stop when num_beams hypotheses are done.", "--early-stopping"),
    _Opt("seed", int | None, "Random seed: the same seed gives the same text."),
    _Opt("logprobs", int | None, "Report the chosen token's logprob and the top K alternatives."),
    _Opt("truncate_prompt", bool | None, "Drop the oldest prompt tokens instead of failing when too long.",
         "--truncate-prompt"),
    # vLLM's names and meanings
    _Opt("min_tokens", int | None, "No end of text, stop token or stop string before this many new tokens."),
    _Opt("truncate_prompt_tokens", int | None, "Keep only the last K prompt tokens (-1: the model's context)."),
    _Opt("prompt_logprobs", int | None, "Also score the prompt: each prompt token's logprob and top K."),
    _Opt("include_stop_str_in_output", bool | None, "Keep the stop string at the end of the output.",
         "--include-stop-str-in-output"),
    # on by default, so the flag turns it off (build_sampling_params inverts it)
    _Opt("skip_special_tokens", bool | None, "Keep special tokens (<|endoftext|>) in the text.",
         "--keep-special-tokens"),
]


# the generation options that carry text: backslash escapes apply (process_escapes)
_TEXT_OPTIONS = frozenset({"stop", "bad_words"})

# for commands that sample varied texts and cannot use beam search
BEAM_OPTIONS = frozenset({"num_beams", "length_penalty", "early_stopping"})


def _parse_logit_bias(items: list[str]) -> dict[int, float]:
    bias: dict[int, float] = {}
    for item in items:
        token, sep, value = item.partition(":")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise ValueError(f"--logit-bias must be TOKEN_ID:BIAS (e.g. 50256:-100), got {item!r}") from None
        if not sep:
            raise ValueError(f"--logit-bias must be TOKEN_ID:BIAS (e.g. 50256:-100), got {item!r}")
    return bias


def _parse_token_ids(item: str) -> list[int]:
    try:
        return [int(t) for t in item.split(",")]
    except ValueError:
        raise ValueError(f"--bad-words-ids must be comma-separated token ids (e.g. 464,3290), got {item!r}") from None


def build_sampling_params(given: Mapping[str, Any], defaults: Mapping[str, Any] | None = None):
    """SamplingParams from CLI values (``None`` = not given) over a command's ``defaults``.

    Raises ``ValueError`` naming the parameter when a value is out of range.
    """
    from ..sampling import SamplingParams

    values = dict(defaults or {})
    values.update(explicit_values(given))
    if given.get("max_length") is not None and given.get("max_new_tokens") is not None:
        raise ValueError("give --max-length or --max-new-tokens, not both")
    if "max_length" in values and "max_new_tokens" in values:
        # the user's choice of one length wins over the command's default for the other
        drop = "max_new_tokens" if given.get("max_length") is not None else "max_length"
        values.pop(drop)
    return SamplingParams.from_kwargs(**values)


@dataclass(frozen=True)
class SamplingChoice:
    """A command's generation settings before its model is loaded: the flags the user gave and the
    command's own defaults. :meth:`resolve` adds the checkpoint's ``generation_config.json`` once the model
    is known (:meth:`gpt2lab.generation.Generator.resolve_sampling`: flags > checkpoint > command defaults;
    ``defaults_win``: flags > command defaults > checkpoint). ``params`` is the checkpoint-blind result,
    built at parse time so a bad flag fails before any model loads."""

    explicit: Mapping[str, Any]
    defaults: Mapping[str, Any]
    params: Any  # SamplingParams
    defaults_win: bool = False
    skip: frozenset[str] = frozenset()

    def resolve(self, gen: Any) -> Any:
        """The :class:`SamplingParams` for ``gen`` (a :class:`~gpt2lab.generation.Generator`)."""
        return gen.resolve_sampling(self.explicit, self.defaults, defaults_win=self.defaults_win, skip=self.skip)


def explicit_values(given: Mapping[str, Any]) -> dict[str, Any]:
    """The options the user gave (``None`` / empty = not given), parsed: ``--logit-bias`` pairs,
    backslash escapes in text options."""
    values = {}
    for name, value in given.items():
        if value is None or (isinstance(value, list) and not value):
            continue
        if name == "logit_bias":
            value = _parse_logit_bias(value)
        elif name in _TEXT_OPTIONS:  # "\\n\\n" on a command line means two newlines, as in llama.cpp
            value = process_escapes_all(value)
        elif name == "skip_special_tokens":  # given as --keep-special-tokens
            value = not value
        elif name == "bad_words_ids":
            value = [_parse_token_ids(item) for item in value]
        values[name] = value
    return values


def _help(opt: _Opt, defaults: Mapping[str, Any]) -> str:
    from ..sampling import SamplingParams  # light module: dataclass only

    default = defaults.get(opt.name, getattr(SamplingParams, opt.name, None))
    if opt.name in ("max_new_tokens", "max_length") and default is None:
        return opt.help
    if default in (None, [], {}) or isinstance(default, bool):
        return opt.help
    return f"{opt.help} (default: {default})"  # [..] would be rich markup


def sampling_options(*, defaults: Mapping[str, Any] | None = None, exclude: Collection[str] = (),
                     defaults_win: bool = False) -> Callable[[Callable], Callable]:
    """Add every generation option to a typer command; it receives ``sampling: SamplingParams``, or
    ``sampling: SamplingChoice`` when annotated so (resolved against the model's ``generation_config.json``
    after loading it: see :class:`SamplingChoice`).

    ``defaults`` are the command's own defaults (shown in --help); ``exclude`` names options that make
    no sense for the command (e.g. ``n`` where the command has its own count; a checkpoint cannot set
    them either). ``defaults_win``: the command's defaults go above the checkpoint's.
    """
    defaults = dict(defaults or {})
    opts = [o for o in SAMPLING_OPTIONS if o.name not in set(exclude)]
    added = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, annotation=o.type,
                               default=typer.Option(None, o.flag or "--" + o.name.replace("_", "-"),
                                                    *([o.short] if o.short else []), help=_help(o, defaults),
                                                    rich_help_panel="Generation options", show_default=False))
             for o in opts]

    def build(given: dict[str, Any], annotation: Any) -> Any:
        params = build_sampling_params(given, defaults)
        if annotation is SamplingChoice:
            return SamplingChoice(explicit_values(given), defaults, params, defaults_win, frozenset(exclude))
        return params

    return command_options("sampling", added, build, receives="SamplingParams", group="generation")
