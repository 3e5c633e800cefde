"""``gpt2lab serve``: the OpenAI-compatible HTTP server and the browser playground."""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any

import typer

from ..http_guard import is_loopback
from .common import fail, require_extra, user_errors
from .distributed import Replicas, replica_options
from .options import MODEL_HELP, Runtime, allowed_host_option, host_names, load_kwargs, runtime_options

_ORIGIN = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s?#]+")  # scheme://host[:port], as browsers send it
_NAME = re.compile(r"[\w.:@-]+")  # a served name: no slash, so NAME=... never swallows a path holding "="
_MODEL_KEYS = ("device", "dtype", "quantization")


def _split_options(value: str, keys: tuple[str, ...], option: str) -> tuple[str, dict[str, str]]:
    """``"REF,key=value,..."`` -> ``("REF", {key: value})`` for trailing ``key=value`` parts whose key is one of
    ``keys`` (anything else stays part of the reference)."""
    options: dict[str, str] = {}
    while "," in value:
        head, _, last = value.rpartition(",")
        key, eq, item = last.partition("=")
        if not eq or key.strip() not in keys:
            break
        if not item.strip():
            fail(f"{option} {value!r}: {key.strip()}= needs a value")
        options[key.strip()] = item.strip()
        value = head
    return value, options


def _named(value: str) -> tuple[str | None, str]:
    """``"NAME=REF"`` -> ``("NAME", "REF")``; a plain reference (or a path that holds "=") -> ``(None, value)``."""
    name, eq, ref = value.partition("=")
    if eq and _NAME.fullmatch(name) and ref and not Path(value).exists():
        return name, ref
    return None, value


def parse_models(values: list[str]) -> dict[str | None, dict[str, Any]]:
    """``--model`` values -> served name (None: the only model, under its own name) -> ``{"model": REF, device,
    dtype, quantization}``. Several unnamed models are served under their references."""
    models: dict[str | None, dict[str, Any]] = {}
    for value in values:
        ref, options = _split_options(value, _MODEL_KEYS, "--model")
        name, ref = _named(ref)
        if name is None and len(values) > 1:
            name = ref
        if name in models:
            fail(f"--model: the name {name!r} is given twice; give each model a name of its own with NAME=MODEL")
        models[name] = {"model": ref, **options}
    return models


def parse_loras(values: list[str], models: dict[str | None, dict[str, Any]]) -> dict[str | None, dict[str, str]]:
    """``--lora NAME=DIR[,base=MODEL]`` values -> served model name -> {adapter name: folder}. Without ``base=``,
    an adapter goes to the served model its ``base_model_name_or_path`` names, else to the first model."""
    from ..checkpoints.adapters import read_adapter_config

    out: dict[str | None, dict[str, str]] = {}
    for value in values:
        spec, options = _split_options(value, ("base",), "--lora")
        name, folder = _named(spec)
        if name is None:
            fail(f"--lora must be NAME=ADAPTER_DIR (the name requests give as their model), got {value!r}")
        with user_errors():
            config = read_adapter_config(folder)
        base = options.get("base")
        if base is not None:
            owner = next((n for n, m in models.items() if base in (n, m["model"])), ...)
            if owner is ...:
                fail(f"--lora {name}: base={base} is not one of the served models "
                     f"({', '.join(str(n or m['model']) for n, m in models.items())})")
        else:
            wanted = config.get("base_model_name_or_path")
            owner = next((n for n, m in models.items() if wanted is not None and wanted in (n, m["model"])),
                         next(iter(models)))
        if any(name in adapters for adapters in out.values()) or name in models:
            fail(f"--lora: the name {name!r} is taken by another adapter or a model")
        out.setdefault(owner, {})[name] = folder
    return out


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``OSError`` if it cannot be had, e.g. the port is busy)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT does not block
        sock.bind((host.strip("[]"), port))
        sock.listen(2048)
        sock.set_inheritable(True)
    except OSError:
        sock.close()
        raise
    return sock


def check_chat_template(resolved) -> None:  # noqa: ANN001 - a checkpoints.ResolvedModel
    """The model's chat template renders the probe conversation before anything loads or is served: a
    broken one raises its ChatTemplateFault naming it, which the command reports in one line (exit 2).
    The server renders it once more in its render process before it turns ready."""
    from ..generation.chat_format import style_for_model
    from ..generation.chat_worker import probe_style

    probe_style(style_for_model(resolved.name, resolved.path))


@runtime_options()
@replica_options()
def serve(
    model: list[str] = typer.Option(None, "--model", "-m",
                                    help=MODEL_HELP + " Repeatable: NAME=MODEL serves several models, each with its "
                                    "own engine, chosen by the request's model field; ',quantization=int8', "
                                    "',dtype=...', ',device=...' after one apply to it alone."),
    lora: list[str] = typer.Option(None, "--lora", help="NAME=ADAPTER_DIR: serve a LoRA adapter (peft's format, as "
                                   "finetune --lora-rank writes) on a base model, as the model NAME; ',base=MODEL' "
                                   "picks the base (default: the one its adapter_config.json names, else the first). "
                                   "Repeatable."),
    allow_runtime_lora: bool = typer.Option(False, "--allow-runtime-lora",
                                            help="Let clients (with the API key) load and unload LoRA adapters: "
                                                 "POST /v1/load_lora_adapter, /v1/unload_lora_adapter."),
    max_models_memory: str = typer.Option(None, "--max-models-memory",
                                          help="Refuse to start when the models (weights, KV caches, prefix caches, "
                                               "adapters) would need more than this, e.g. 8GB."),
    prefix_cache_mb: float = typer.Option(None, "--prefix-cache-mb",
                                          help="Memory per model for cached prompt prefixes, reused by requests that "
                                               "start the same way (default: 5% of the machine's memory, at most "
                                               "4 GiB; 0 turns it off)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. Anything but loopback needs --api-key or "
                                                "--allow-remote."),
    port: int = typer.Option(8000, help="TCP port (0 picks a free one)."),
    api_key: str = typer.Option(None, "--api-key", envvar="GPT2LAB_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on the API routes (or set GPT2LAB_API_KEY)."),
    allow_remote: bool = typer.Option(False, "--allow-remote",
                                      help="Bind a non-loopback address without an API key (anyone who can reach "
                                           "it can use the model)."),
    max_batch: int = typer.Option(16, "--max-batch", help="Sequences decoded together in one step."),
    max_queue: int = typer.Option(64, "--max-queue", help="Sequences waiting for the batch before requests get 429."),
    request_timeout: float = typer.Option(600.0, "--request-timeout", help="Seconds before a request is stopped."),
    max_body_mb: float = typer.Option(4.0, "--max-body-mb", help="Largest request body in megabytes (413 beyond)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level (debug, info, warning, error)."),
    cors_allow_origin: list[str] = typer.Option(None, "--cors-allow-origin",
                                                help="Let browser pages from this origin (e.g. "
                                                     "https://app.example:3000, or * for any) call the API; "
                                                     "repeatable. Off by default."),
    allowed_host: list[str] = allowed_host_option(),
    replicas: Replicas = None,
    runtime: Runtime = None,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API, with a playground page at /."""
    require_extra("server", "gpt2lab serve")
    on_ray = replicas.on
    if not is_loopback(host) and not api_key and not allow_remote:
        fail(f"--host {host} is reachable from other machines; give --api-key KEY (or --allow-remote to serve "
             "without one)")
    if not 0 <= port <= 65535:
        fail(f"--port must be in [0, 65535], got {port}")
    if api_key is not None and not api_key.strip():
        fail("--api-key must not be empty")
    origins = list(cors_allow_origin or [])
    for origin in origins:
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            fail(f"--cors-allow-origin must be an origin like https://host or http://host:port (no path), or *; "
                 f"got {origin!r}")
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        fail(f"--log-level must be one of critical, error, warning, info, debug, trace; got {log_level!r}")
    if not 0 < max_body_mb <= 1024:
        fail(f"--max-body-mb must be in (0, 1024], got {max_body_mb:g}")
    if prefix_cache_mb is not None and not prefix_cache_mb >= 0:
        fail(f"--prefix-cache-mb must be >= 0 (0 turns prefix reuse off), got {prefix_cache_mb:g}")
    if max_models_memory is not None:
        from ..server.memory import parse_size

        try:
            parse_size(max_models_memory, "--max-models-memory")
        except ValueError as exc:
            fail(str(exc))
    models = parse_models(list(model)) if model else {None: {"model": None}}  # none: the default model
    loras = parse_loras(list(lora or []), models)
    hosts = host_names(host, allowed_host)

    try:  # the port first: a busy one fails now, in a second, not after the model is found and loaded
        sock = bind(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    if on_ray:  # Ray Serve's proxy listens there instead
        port = sock.getsockname()[1]
        sock.close()

    from ..checkpoints import resolve_model
    from ..placement import check_quantization, resolve_device, resolve_dtype

    with user_errors():  # a bad reference or device fails here, in one line; the weights load on the engine thread
        for spec in models.values():
            resolved = resolve_model(spec["model"], quiet=True)
            device_name = "--device" if "device" not in spec else f"--model {spec['model']},device="
            dtype_name = "--dtype" if "dtype" not in spec else f"--model {spec['model']},dtype="
            resolve_dtype(spec.get("dtype", runtime.dtype), resolve_device(spec.get("device", runtime.device),
                                                                           device_name), name=dtype_name)
            if spec.get("quantization") != "none":
                check_quantization(spec.get("quantization"))
            check_chat_template(resolved)
    load = load_kwargs(runtime)

    from ..server import ModelConfig, create_app
    from ..server.http import serve as serve_http
    from ..server.limits import Limits

    if len(models) == 1 and None in models and len(models[None]) == 1:  # the plain --model M
        served: Any = models[None]["model"]
        more = {"lora_modules": loras.get(None, {})}
    else:
        served = {name: ModelConfig(spec["model"], device=spec.get("device"), dtype=spec.get("dtype"),
                                    quantization=spec.get("quantization"),
                                    lora_modules=loras.get(name, {})) for name, spec in models.items()}
        if None in served:  # one model with its own options: served under its own name
            served = {str(models[None]["model"]): served.pop(None)}
        more = {}
    more.update(allow_runtime_lora=allow_runtime_lora, max_models_memory=max_models_memory,
                prefix_cache_mb=prefix_cache_mb)
    if on_ray:  # each replica serves every model and adapter, as this process would
        _serve_on_ray(_on_ray_refs(served), replicas.address, host, port, replicas.count, replicas.autoscaling,
                      dict(api_key=api_key, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout,
                           cors_allow_origins=origins, max_body_mb=max_body_mb, allowed_hosts=hosts,
                           **_on_ray_loras(more), **load))
        return
    limits = Limits()
    with user_errors():
        try:
            app = create_app(served, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                             request_timeout=request_timeout, cors_allow_origins=origins, max_body_mb=max_body_mb,
                             limits=limits, allowed_hosts=hosts, **more, **load)
        except ValueError as exc:  # the library names its parameters; the user typed options
            message = str(exc)
            for name in ("max_batch", "max_queue", "request_timeout", "max_body_mb", "prefix_cache_mb",
                         "max_models_memory"):
                message = message.replace(name, "--" + name.replace("_", "-"))
            raise ValueError(message) from None
    _announce_when_ready(app, sock)
    serve_http(app, sock, log_level=log_level, limits=limits)


def _on_ray_refs(served: Any) -> Any:
    """The served model(s) as Ray replicas should see them: local folders as absolute paths
    (:func:`~.distributed.model_ref`), in a mapping of ModelConfigs too."""
    from dataclasses import replace

    from .distributed import model_ref

    if not isinstance(served, dict):
        return model_ref(served)
    return {name: replace(config, model=model_ref(config.model),
                          lora_modules={a: model_ref(str(p)) for a, p in config.lora_modules.items()})
            for name, config in served.items()}


def _on_ray_loras(more: dict[str, Any]) -> dict[str, Any]:
    from .distributed import model_ref

    if not more.get("lora_modules"):
        return more
    return {**more, "lora_modules": {a: model_ref(str(p)) for a, p in more["lora_modules"].items()}}


def _serve_on_ray(model: Any, address: str, host: str, port: int, replicas: int,
                  autoscaling: dict | None, app_kwargs: dict) -> None:
    """``gpt2lab serve --replicas``: the app in Ray Serve replicas behind its proxy on ``host:port``, until
    Ctrl-C (then the application and a cluster started here are shut down)."""
    import sys
    import time

    from ..console import echo
    from .distributed import ray_session

    with ray_session(address, "gpt2lab serve --replicas") as gray:
        from ray import serve

        gpu = str(app_kwargs.get("device", "")).startswith("cuda")
        try:
            with user_errors():
                application = gray.deployment(model, num_replicas=replicas, autoscaling=autoscaling,
                                              num_gpus=1 if gpu else 0, **app_kwargs)
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name="gpt2lab", route_prefix="/")
            scale = (f"autoscaling {autoscaling}" if autoscaling else f"{replicas} replica(s)")
            what = ", ".join(model) if isinstance(model, dict) else model or "the default model"
            echo(f"gpt2lab: serving {what} on http://{host}:{port} ({scale}, Ray Serve); "
                 "Ctrl-C stops", sys.stderr)
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            serve.shutdown()


def url_of(sock: socket.socket) -> str:
    """``http://HOST:PORT`` of a listening socket (the port it really got, for ``--port 0``)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


def _announce_when_ready(app, sock: socket.socket) -> None:  # noqa: ANN001 - the FastAPI app
    """Print ``gpt2lab: serving MODEL on http://HOST:PORT`` on stderr once each model has loaded (they load on
    their engine threads when the server starts; the socket already accepts connections)."""
    import sys
    import threading

    from ..console import echo

    served, url = app.state.serving.models.served, url_of(sock)

    def announce() -> None:
        for model in served:  # each model and its adapters, by the names requests give
            model.scheduler.ready.wait()
            if model.scheduler.load_error is None:  # a failed load is reported by the server itself
                names = ", ".join([model.id, *model.adapters])
                echo(f"gpt2lab: serving {names} on {url}", sys.stderr)

    threading.Thread(target=announce, name="gpt2lab-announce", daemon=True).start()

