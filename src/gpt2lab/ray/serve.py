"""``gpt2lab serve`` on Ray Serve: the same FastAPI app (:func:`gpt2lab.server.create_app`), unchanged, in each
of N replicas behind Ray Serve's HTTP proxy, as ``ray.serve.llm`` and KServe run vLLM's server.

Each replica builds its own app, so it has its own engine, queue and back-pressure: ``/health``, ``/metrics``
and the 429 of a full queue are per replica (the proxy spreads requests over replicas; Ray restarts a dead
one). The app's lifespan (its engine thread) runs in the replica, as under uvicorn.
"""

from __future__ import annotations

from typing import Any

from ray import serve

# Ray Serve's autoscaling fields that `deployment` passes through (AutoscalingConfig)
AUTOSCALING_KEYS = ("min_replicas", "max_replicas", "initial_replicas", "target_ongoing_requests",
                    "upscale_delay_s", "downscale_delay_s")


@serve.ingress()
class GPT2LabServer:
    """One replica: the app of :func:`gpt2lab.server.create_app` (``model`` and ``app_kwargs`` as it takes
    them), built on the replica when it starts."""

    def __init__(self, model: Any, app_kwargs: dict[str, Any]) -> None:
        from ..server import create_app

        self._app = create_app(model, **app_kwargs)

    def __serve_build_asgi_app__(self) -> Any:
        return self._app


def deployment(model: Any = None, *, num_replicas: int = 1, autoscaling: dict[str, Any] | None = None,
               num_cpus: float = 1, num_gpus: float = 0, name: str = "gpt2lab", **app_kwargs: Any) -> Any:
    """A Ray Serve application (``serve.run(deployment(...), route_prefix="/")``) of ``num_replicas`` replicas of
    ``gpt2lab serve``'s app, each with ``num_cpus``/``num_gpus`` and its own engine. ``autoscaling``: Ray
    Serve's autoscaling fields (:data:`AUTOSCALING_KEYS`: ``min_replicas``, ``max_replicas``,
    ``target_ongoing_requests`` ...) instead of a fixed ``num_replicas``. ``app_kwargs``: as
    :func:`gpt2lab.server.create_app` (``api_key``, ``max_batch``, ``max_queue``, ``device`` ...; the replicas
    check them). Raises ValueError naming a bad ``num_replicas`` or autoscaling field."""
    if autoscaling is not None:
        unknown = sorted(set(autoscaling) - set(AUTOSCALING_KEYS))
        if unknown:
            raise ValueError(f"autoscaling: unknown field(s) {', '.join(unknown)}; "
                             f"known: {', '.join(AUTOSCALING_KEYS)}")
    elif not isinstance(num_replicas, int) or num_replicas < 1:
        raise ValueError(f"num_replicas must be an integer >= 1, got {num_replicas!r}")
    options: dict[str, Any] = {"name": name, "ray_actor_options": {"num_cpus": num_cpus, "num_gpus": num_gpus}}
    if autoscaling is not None:
        options["autoscaling_config"] = dict(autoscaling)
    else:
        options["num_replicas"] = num_replicas
    # room in each replica for its batch, its queue and more: a full replica answers 429 itself (the proxy
    # would otherwise hold requests back at Serve's default of 5 per replica)
    options["max_ongoing_requests"] = app_kwargs.get("max_batch", 16) + app_kwargs.get("max_queue", 64) + 16
    return serve.deployment(GPT2LabServer, **options).bind(model, app_kwargs)
