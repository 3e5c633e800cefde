"""``--ray [ADDRESS]`` and ``--actors N`` of the batch commands (``generate``, ``augment``, ``eval perplexity``),
and ``serve``'s ``--replicas``.

The options and the session they open live here: a command takes them with :func:`ray_options` (or
:func:`replica_options`), built with :func:`gpt2lab.cli.options.command_options` as the runtime and sampling
options are, receives one :class:`RayJob` (:class:`Replicas`) and opens the session with one ``with``. This
module does not import ``ray``: :mod:`gpt2lab.ray` is imported only once ``--ray`` is given and the ``ray``
extra is found (else one line says which extra to install).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import typer

from .common import fail, require_extra, user_errors
from .options import command_options

RAY_FLAG = "--ray"
LOCAL = "local"  # what a bare --ray means (gpt2lab.ray.LOCAL): a cluster on this machine
RAY_PANEL = "Scaling out (Ray)"


def ray_option() -> Any:
    """``--ray [ADDRESS]``: run the job on Ray Data actors."""
    return typer.Option(None, RAY_FLAG, metavar="[ADDRESS]", rich_help_panel=RAY_PANEL,
                        help="Run on Ray Data actors: an existing cluster (auto, ray://HOST:10001) or, with no "
                             "address, one started on this machine. Needs pip install 'gpt2lab\\[ray]'.")


def actors_option() -> Any:
    """``--actors N``: how many Ray actors (each loads the model once)."""
    return typer.Option(None, "--actors", min=1, rich_help_panel=RAY_PANEL,
                        help="Ray actors, each with its own copy of the model (default: one per CPU of the "
                             "cluster, or per GPU with --device cuda).")


@dataclass(frozen=True)
class RayJob:
    """``--ray [ADDRESS]`` and ``--actors N`` as a command receives them: ``address`` None runs in this
    process; :data:`LOCAL` is a bare ``--ray`` (a cluster started on this machine)."""

    address: str | None = None
    actors: int | None = None

    @property
    def on(self) -> bool:
        """Whether ``--ray`` was given."""
        return self.address is not None


def ray_options(command: str) -> Callable[[Callable], Callable]:
    """Add ``--ray [ADDRESS]`` and ``--actors N`` to a typer command (``command``: its name in messages, e.g.
    ``"gpt2lab generate --ray"``). The command receives them as ``ray: RayJob``; with ``--ray`` and without
    the ``ray`` extra it fails in one line naming the extra before it runs; ``--actors`` needs ``--ray``."""
    options = [inspect.Parameter("ray_address", inspect.Parameter.KEYWORD_ONLY, default=ray_option(),
                                 annotation=str | None),
               inspect.Parameter("actors", inspect.Parameter.KEYWORD_ONLY, default=actors_option(),
                                 annotation=int | None)]

    def build(values: dict[str, Any], _annotation: Any) -> RayJob:
        job = RayJob(address=values["ray_address"], actors=values["actors"])
        if job.actors is not None and not job.on:
            raise ValueError("--actors needs --ray")
        check_ray(job.address, command)
        return job

    return command_options("ray", options, build, receives="RayJob", group="Ray")


@dataclass(frozen=True)
class Replicas:
    """``serve``'s ``--replicas N``, ``--ray [ADDRESS]`` and autoscaling options as the command receives them:
    ``on`` when any was given (the server then runs in Ray Serve replicas on the cluster at ``address``)."""

    on: bool = False
    address: str = LOCAL
    count: int = 1
    autoscaling: dict[str, Any] | None = None  # min_replicas, max_replicas, target_ongoing_requests as given


def replica_options() -> Callable[[Callable], Callable]:
    """Add ``--replicas N``, ``--ray [ADDRESS]``, ``--min-replicas``, ``--max-replicas`` and
    ``--target-ongoing-requests`` to ``gpt2lab serve``, received as ``replicas: Replicas``; any of them without
    the ``ray`` extra fails in one line naming it, before anything is bound or loaded."""
    opts = {
        "num_replicas": (int | None, typer.Option(None, "--replicas", min=1, rich_help_panel=RAY_PANEL,
                                                  help="Serve N replicas of this server (each its own engine) "
                                                       "behind Ray Serve's HTTP proxy. Needs pip install "
                                                       "'gpt2lab\\[ray]'.")),
        "ray_address": (str | None, typer.Option(None, RAY_FLAG, metavar="[ADDRESS]", rich_help_panel=RAY_PANEL,
                                                 help="The Ray cluster for the replicas (auto, ray://HOST:10001); "
                                                      "default: one started on this machine.")),
        "min_replicas": (int | None, typer.Option(None, "--min-replicas", min=0, rich_help_panel=RAY_PANEL,
                                                  help="Autoscale the replicas from this many ...")),
        "max_replicas": (int | None, typer.Option(None, "--max-replicas", min=1, rich_help_panel=RAY_PANEL,
                                                  help="... to this many (Ray Serve's autoscaling).")),
        "target_ongoing_requests": (float | None, typer.Option(None, "--target-ongoing-requests", min=0.1,
                                                               rich_help_panel=RAY_PANEL,
                                                               help="Requests per replica the autoscaler aims "
                                                                    "for.")),
    }

    def build(values: dict[str, Any], _annotation: Any) -> Replicas:
        autoscaling = {k: values[k] for k in ("min_replicas", "max_replicas", "target_ongoing_requests")
                       if values[k] is not None}
        count, address = values["num_replicas"], values["ray_address"]
        if count is None and address is None and not autoscaling:
            return Replicas()
        require_extra("ray", "gpt2lab serve --replicas")
        if autoscaling and count is not None:
            raise ValueError("give --replicas N, or autoscaling (--min-replicas, --max-replicas), not both")
        return Replicas(on=True, address=address or LOCAL, count=count or 1, autoscaling=autoscaling or None)

    return command_options("replicas", [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                                          annotation=kind) for name, (kind, option) in opts.items()],
                           build, receives="Replicas", group="Ray Serve")


def optional_value(argv: list[str], flag: str = RAY_FLAG, value: str = LOCAL) -> list[str]:
    """``argv`` with ``value`` after a ``flag`` given without one (last, or followed by another option), as
    click cannot declare an option whose value is optional."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == flag and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out.insert(i + 1, value)
            break
    return out


def check_ray(address: str | None, command: str) -> None:
    """With ``--ray``: fail now, before any work, in one line naming the extra when ``ray`` is not installed."""
    if address is not None:
        require_extra("ray", command)


def model_ref(model: str | None) -> str | None:
    """``--model`` as the actors should see it: a local folder as an absolute path (their working folder
    is not this one's; on a cluster the folder must exist on every node), anything else as given."""
    from pathlib import Path

    return str(Path(model).resolve()) if model and Path(model).is_dir() else model


def driver_runtime(runtime: Any, address: str | None) -> Any:
    """The runtime of the command's own copy of the model: with ``--ray`` the CPU (the actors use the
    device; the driver's machine may have none), else ``runtime`` itself."""
    if address is None:
        return runtime
    from dataclasses import replace

    return replace(runtime, device="cpu")


@contextmanager
def ray_session(address: str, command: str) -> Iterator[Any]:
    """Ray initialised for ``command`` (``address`` as ``--ray`` gave it); a cluster it started is stopped
    at the end. Yields :mod:`gpt2lab.ray`. Fails in one line without the ``ray`` extra or the cluster."""
    check_ray(address, command)
    import gpt2lab.ray as gray

    with user_errors((ConnectionError,)):
        started = gray.connect(None if address == LOCAL else address)
    try:
        yield gray
    finally:
        if started:
            import ray

            ray.shutdown()


def actor_resources(runtime: Any, actors: int | None) -> dict[str, Any]:
    """Keyword arguments of the :mod:`gpt2lab.ray.data` drivers for ``runtime`` (``--device`` and co): the
    actors' device, dtype, quantization, GPUs each (1 with a CUDA device) and count (``actors``, else one per
    CPU, or per GPU, of the cluster)."""
    import ray

    gpu = runtime.device.startswith("cuda")
    if actors is None:
        resources = ray.cluster_resources()
        actors = max(1, int(resources.get("GPU" if gpu else "CPU", 1)))
    load = runtime.load_kwargs()
    return {"device": "cuda" if gpu else "cpu" if runtime.device == "auto" else runtime.device,
            "dtype": load["dtype"], "quantization": load.get("quantization"), "num_gpus": 1 if gpu else 0,
            "actors": actors}


def no_ray_without(option: str, given: bool) -> None:
    """Fail when ``--ray`` needs ``option`` and it was not given."""
    if not given:
        fail(f"--ray writes its rows to a file: give {option}")
