"""``--ray [ADDRESS]`` and ``--actors N`` of the batch commands (``generate``, ``augment``, ``eval perplexity``).

The options and the session they open live here, so each command adds two parameters and one ``with``. This
module does not import ``ray``: :mod:`gpt2lab.ray` is imported only once ``--ray`` is given and the ``ray``
extra is found (else one line says which extra to install).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer

from .common import fail, require_extra, user_errors

RAY_FLAG = "--ray"
LOCAL = "local"  # what a bare --ray means (gpt2lab.ray.LOCAL): a cluster on this machine
RAY_PANEL = "Scaling out (Ray)"


def ray_option() -> Any:
    """``--ray [ADDRESS]``: run the job on Ray Data actors."""
    return typer.Option(None, RAY_FLAG, metavar="[ADDRESS]", rich_help_panel=RAY_PANEL,
                        help="Run on Ray Data actors: an existing cluster (auto, ray://HOST:10001) or, with no "
                             "address, one started on this machine. Needs pip install 'gpt2lab[ray]'.")


def actors_option() -> Any:
    """``--actors N``: how many Ray actors (each loads the model once)."""
    return typer.Option(None, "--actors", min=1, rich_help_panel=RAY_PANEL,
                        help="Ray actors, each with its own copy of the model (default: one per CPU of the "
                             "cluster, or per GPU with --device cuda).")


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
