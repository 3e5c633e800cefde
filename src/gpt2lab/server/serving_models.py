"""The served model (vLLM's ``OpenAIServingModels``): ``/v1/models``, and what every endpoint asks of it.

The model loads on the engine thread (:class:`~gpt2lab.server.scheduler.Scheduler`); until it is
ready, or when loading failed, :meth:`OpenAIServingModels.generator` answers 503. A request's
``model`` field may name the served model by its served name, its own name or its path.
"""

from __future__ import annotations

import time
from typing import Any

from . import limits as lim
from . import protocol as p
from .scheduler import Scheduler

RETRY_AFTER_S = 1  # the Retry-After of a 503 while loading and of a 429 (full): the engine frees rows every step


class OpenAIServingModels:
    """The model ``scheduler`` loads, served under ``model_name`` (default: the model's own name)."""

    def __init__(self, scheduler: Scheduler, model_name: str | None = None,
                 limits: lim.Limits | None = None) -> None:
        self.scheduler, self.model_name = scheduler, model_name
        self.limits = limits or lim.Limits()
        self.created = int(time.time())  # the model cards' "created": when the server was made
        self.max_prompt_chars = 0  # the longest prompt text that can fit the context (set by ``prepare``)
        self.chat_renderer: Any = None  # the model's ChatRenderPool (set by ``prepare``)

    def prepare(self, gen: Any) -> Any:
        """Called with the loaded Generator on the engine thread, before the server turns ready: works out
        (once, off the event loop: it reads every token of the vocabulary) the longest prompt text that can
        fit the context, so that a longer one is refused before it is tokenized; starts the processes that
        render the model's chat template (:class:`~gpt2lab.generation.chat_worker.ChatRenderPool`) and has
        one render the probe conversation: a broken template fails the load (a
        :class:`~gpt2lab.errors.CheckpointError` naming it). Returns ``gen``."""
        from ..errors import CheckpointError
        from ..generation.chat_format import style_for_model
        from ..generation.chat_worker import ChatRenderPool, RenderFailed

        self.max_prompt_chars = lim.max_prompt_chars(gen.tokenizer, gen.config.n_positions)
        pool = ChatRenderPool(gen.tokenizer, style_for_model(gen.name, gen.path), self.limits.chat_render_workers)
        try:
            pool.probe(self.limits.chat_probe_timeout_s)
        except RenderFailed as exc:
            pool.close()
            raise CheckpointError(f"the chat template does not work: {exc}") from None
        except BaseException:
            pool.close()
            raise
        self.chat_renderer = pool
        return gen

    def close(self) -> None:
        """Stop the chat render processes."""
        if self.chat_renderer is not None:
            self.chat_renderer.close()

    def generator(self) -> Any:
        """The loaded Generator; :class:`~.protocol.APIError` 503 while it loads (``Retry-After``) or if
        loading failed."""
        scheduler = self.scheduler
        if not scheduler.ready.is_set():
            raise p.APIError(503, "the model is still loading; retry shortly", type="server_error",
                             code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        if scheduler.load_error is not None:
            raise p.APIError(503, f"the model failed to load: {scheduler.load_error}", type="server_error",
                             code="model_load_failed")
        return scheduler.generator

    def served_name(self, gen: Any) -> str:
        """The id clients see (``/v1/models``, each response's ``model``)."""
        return self.model_name or gen.name

    def check_model(self, gen: Any, model: str | None) -> None:
        """A request's ``model`` (None: not sent) names this server's model, or 400 ``model_not_found``."""
        names = {self.served_name(gen), gen.name, str(gen.path) if gen.path else None}
        if model is not None and model not in names:
            raise p.invalid(f"model {model!r} is not served here; this server serves {self.served_name(gen)!r} "
                            "(see /v1/models)", "model", "model_not_found")

    def model_card(self, gen: Any) -> p.ModelCard:
        """The model as ``/v1/models`` lists it: its context (``max_model_len``, tokens), quantization and
        the checkpoint's generation defaults."""
        return p.ModelCard(id=self.served_name(gen), created=self.created, max_model_len=gen.config.n_positions,
                           generation_config=gen.generation_config, quantization=getattr(gen, "quantization", None))

    @p.returns_errors
    async def show_available_models(self) -> p.ModelList:
        """``GET /v1/models``: the one served model; 503 while loading."""
        return p.ModelList(data=[self.model_card(self.generator())])

    @p.returns_errors
    async def retrieve_model(self, model_id: str) -> p.ModelCard:
        """``GET /v1/models/{model_id}`` (OpenAI's ``models.retrieve``): the served model, 404 for any other id."""
        gen = self.generator()
        if model_id != self.served_name(gen):
            raise p.APIError(404, f"The model {model_id!r} does not exist; this server serves "
                             f"{self.served_name(gen)!r}", param="model", code="model_not_found")
        return self.model_card(gen)
