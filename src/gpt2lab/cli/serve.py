"""``gpt2lab serve``: the OpenAI-compatible HTTP server and the browser playground."""

from __future__ import annotations

import re
import socket

import typer

from ..http_guard import is_loopback
from .common import fail, require_extra, user_errors
from .distributed import Replicas, replica_options
from .options import Runtime, allowed_host_option, host_names, load_kwargs, model_option, runtime_options

_ORIGIN = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s?#]+")  # scheme://host[:port], as browsers send it


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
    model: str = model_option(),
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
    hosts = host_names(host, allowed_host)

    try:  # the port first: a busy one fails now, in a second, not after the model is found and loaded
        sock = bind(host, port)
    except OSError as exc:
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    if on_ray:  # Ray Serve's proxy listens there instead
        port = sock.getsockname()[1]
        sock.close()

    from ..checkpoints import resolve_model
    from ..placement import resolve_device, resolve_dtype

    with user_errors():  # a bad reference or device fails here, in one line; the weights load on the engine thread
        resolved = resolve_model(model, quiet=True)
        resolve_dtype(runtime.dtype, resolve_device(runtime.device, "--device"), name="--dtype")
        check_chat_template(resolved)
    load = load_kwargs(runtime)

    from ..server import create_app
    from ..server.http import serve as serve_http
    from ..server.limits import Limits

    if on_ray:
        _serve_on_ray(model, replicas.address, host, port, replicas.count, replicas.autoscaling,
                      dict(api_key=api_key, max_batch=max_batch, max_queue=max_queue, request_timeout=request_timeout,
                           cors_allow_origins=origins, max_body_mb=max_body_mb, allowed_hosts=hosts, **load))
        return
    limits = Limits()
    try:
        app = create_app(model, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                         request_timeout=request_timeout, cors_allow_origins=origins, max_body_mb=max_body_mb,
                         limits=limits, allowed_hosts=hosts, **load)
    except ValueError as exc:
        fail(str(exc).replace("max_batch", "--max-batch").replace("max_queue", "--max-queue")
             .replace("request_timeout", "--request-timeout"))
    _announce_when_ready(app, sock)
    serve_http(app, sock, log_level=log_level, limits=limits)


def _serve_on_ray(model: str | None, address: str, host: str, port: int, replicas: int,
                  autoscaling: dict | None, app_kwargs: dict) -> None:
    """``gpt2lab serve --replicas``: the app in Ray Serve replicas behind its proxy on ``host:port``, until
    Ctrl-C (then the application and a cluster started here are shut down)."""
    import sys
    import time

    from ..console import echo
    from .distributed import model_ref, ray_session

    with ray_session(address, "gpt2lab serve --replicas") as gray:
        from ray import serve

        gpu = str(app_kwargs.get("device", "")).startswith("cuda")
        try:
            with user_errors():
                application = gray.deployment(model_ref(model), num_replicas=replicas, autoscaling=autoscaling,
                                              num_gpus=1 if gpu else 0, **app_kwargs)
            serve.start(http_options={"host": host, "port": port})
            serve.run(application, name="gpt2lab", route_prefix="/")
            scale = (f"autoscaling {autoscaling}" if autoscaling else f"{replicas} replica(s)")
            echo(f"gpt2lab: serving {model or 'the default model'} on http://{host}:{port} ({scale}, Ray Serve); "
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
    """Print ``gpt2lab: serving MODEL on http://HOST:PORT`` on stderr once the model has loaded (it loads on
    the engine thread when the server starts; the socket already accepts connections)."""
    import sys
    import threading

    from ..console import echo

    scheduler, url = app.state.scheduler, url_of(sock)

    def announce() -> None:
        scheduler.ready.wait()
        if scheduler.load_error is None:  # a failed load is reported by the server itself
            echo(f"gpt2lab: serving {scheduler.generator.name} on {url}", sys.stderr)

    threading.Thread(target=announce, name="gpt2lab-announce", daemon=True).start()
