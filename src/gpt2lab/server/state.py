"""One server's state apart from HTTP (vLLM's ``init_app_state``): the engine thread and the serving objects.

:meth:`ServerState.create` wires them; :func:`~gpt2lab.server.create_app` puts them behind routes, and a
test can use them as they are (start the scheduler, call a serving method, stop it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import limits as lim
from .metrics import ServerMetrics
from .scheduler import Scheduler
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_health import ServingHealth
from .serving_models import OpenAIServingModels
from .serving_tokenization import OpenAIServingTokenization


@dataclass
class ServerState:
    """The engine thread (``scheduler``, with its ``metrics``) and one serving object per group of endpoints."""

    scheduler: Scheduler
    models: OpenAIServingModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokenization: OpenAIServingTokenization
    health: ServingHealth

    @property
    def metrics(self) -> ServerMetrics:
        return self.scheduler.metrics

    def close(self) -> None:
        """Stop the engine thread and the chat render processes."""
        self.scheduler.stop()
        self.models.close()

    @classmethod
    def create(cls, generator_or_model_ref: Any = None, *, max_batch: int = 16, max_queue: int = 64,
               request_timeout: float = 600.0, model_name: str | None = None, device: str = "auto",
               dtype: str | None = None, quantization: str | None = None,
               limits: lim.Limits | None = None) -> ServerState:
        """The state of a server of ``generator_or_model_ref`` (arguments as :func:`~gpt2lab.server.create_app`'s);
        nothing runs until ``scheduler.start()``, which loads the model on the engine thread.

        Raises ValueError naming ``max_batch`` (an integer >= 1), ``max_queue`` (an integer >= 0),
        ``request_timeout`` (> 0 seconds), or ``device``, ``dtype``, ``quantization`` spelled outside
        :mod:`gpt2lab.placement`'s vocabulary (checked here, before the engine thread loads anything)."""
        from ..placement import check_quantization, device_name, parse_dtype

        device_name(device)
        parse_dtype(dtype)
        check_quantization(quantization)
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")
        limits = limits or lim.Limits()

        def load() -> Any:  # on the engine thread, when the scheduler starts
            from ..generation import Generator
            from ..generation import load as load_generator

            if isinstance(generator_or_model_ref, Generator):
                gen = generator_or_model_ref  # the caller's model: left as it is (it may still train)
            else:
                more = {} if quantization is None else {"quantization": quantization}
                gen = load_generator(generator_or_model_ref, device=device, dtype=dtype, **more)
            return models.prepare(gen)

        scheduler = Scheduler(load, max_batch=max_batch, max_queue=max_queue, metrics=ServerMetrics(),
                              model_is_callers=not isinstance(generator_or_model_ref, (str, Path, type(None))))
        models = OpenAIServingModels(scheduler, model_name, limits)  # before the scheduler starts: before load()
        shared = dict(limits=limits, request_timeout=request_timeout)
        return cls(scheduler, models, completion=OpenAIServingCompletion(scheduler, models, **shared),
                   chat=OpenAIServingChat(scheduler, models, **shared),
                   tokenization=OpenAIServingTokenization(scheduler, models, **shared),
                   health=ServingHealth(scheduler, models))
