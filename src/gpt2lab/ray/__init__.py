"""gpt2lab on Ray: Ray Data batch jobs and Ray Serve replicas (``pip install 'gpt2lab[ray]'``).

A front end, beside :mod:`gpt2lab.cli` and :mod:`gpt2lab.server`: it imports generation, apps, evaluation and
server; only the command line imports it (when ``--ray`` or ``--replicas`` is given), so the base install
never imports ``ray``. See docs/scaling.md.

- :class:`GenerationPredictor`, :class:`AugmentPredictor`, :class:`PerplexityScorer`: callable classes for
  ``ray.data.Dataset.map_batches`` (one model load per actor);
- :func:`deployment`: the FastAPI app of ``gpt2lab serve`` as a Ray Serve application of N replicas;
- :func:`connect`: join a cluster (``"auto"``, ``"ray://host:10001"``) or start a local one.
"""

from __future__ import annotations

from typing import Any

from .data import AugmentPredictor, GenerationPredictor, PerplexityScorer
from .serve import deployment

__all__ = ["GenerationPredictor", "AugmentPredictor", "PerplexityScorer", "deployment", "connect", "LOCAL"]

LOCAL = "local"  # --ray with no address: a cluster on this machine, stopped when the command ends


def connect(address: str | None = None, *, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Initialise Ray for this process: ``address`` an existing cluster (``"auto"``, ``"ray://host:10001"``,
    ``"host:6379"``), or ``None``/``"local"`` for a new one on this machine (``num_cpus`` of its cores, default
    all). Already initialised: nothing is done. Returns whether this call initialised Ray (the caller then
    calls ``ray.shutdown()`` when done). This process's ``PYTHONPATH`` (made absolute) is passed on to
    the workers, so a source checkout's gpt2lab runs there too. Raises ``ConnectionError`` naming the
    address when it cannot connect."""
    import logging
    import os

    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False}
    if os.environ.get("PYTHONPATH"):  # a source checkout (PYTHONPATH=src): workers import the same gpt2lab
        path = os.pathsep.join(os.path.abspath(p) for p in os.environ["PYTHONPATH"].split(os.pathsep) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path}}
    if quiet:
        kwargs.update(logging_level=logging.WARNING, log_to_driver=False, configure_logging=True)
    if address in (None, LOCAL):
        ray.init(num_cpus=num_cpus, **kwargs)
    else:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConnectionError(f"cannot connect to the Ray cluster at {address}: {exc}") from exc
    return True
