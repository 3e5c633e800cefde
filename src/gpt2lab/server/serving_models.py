"""The served models (vLLM's ``OpenAIServingModels``): ``/v1/models``, LoRA adapters loaded and unloaded at
run time, and the routing of every request by its ``model`` field.

A server serves one or more base models, each on its own engine thread (:class:`~.scheduler.Scheduler`),
and any number of LoRA adapters on them (``--lora NAME=DIR``, or ``POST /v1/load_lora_adapter`` when the
server allows it). A request's ``model`` names one of them (a base model by its served name, its own
name or its path; an adapter by its name) and :meth:`OpenAIServingModels.target` gives the
:class:`Target` it runs on: the base model's scheduler, and the adapter its rows add. A request without
``model`` goes to the first model; any other name is a 404 ``model_not_found``, as OpenAI answers. A model
still loading answers 503.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits as lim
from . import protocol as p
from .scheduler import Scheduler

RETRY_AFTER_S = 1  # the Retry-After of a 503 while loading and of a 429 (full): the engine frees rows every step


@dataclass
class ServedModel:
    """One base model of the server: its served ``name`` (None: the model's own), the ``scheduler`` that
    loads and runs it, and its LoRA adapters (name -> folder; filled on the engine thread)."""

    name: str | None
    scheduler: Scheduler
    adapters: dict[str, str] = field(default_factory=dict)
    limits: lim.Limits = field(default_factory=lim.Limits)  # the server's (chat render workers, probe timeout)
    max_prompt_chars: int = 0  # the longest prompt text that can fit the context (set by ``prepare``)
    chat_renderer: Any = None  # the model's ChatRenderPool (set by ``prepare``)

    @property
    def id(self) -> str:
        """The id clients see (``/v1/models``, each response's ``model``); the model's own name until loaded."""
        gen = self.scheduler.generator
        return self.name or (gen.name if gen is not None else "model")

    def prepare(self, gen: Any) -> Any:
        """Called with the loaded Generator on the engine thread, before the model turns ready: works out
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
        """The loaded Generator; :class:`~.protocol.APIError` 503 while it loads (``Retry-After``) or if loading
        failed."""
        scheduler = self.scheduler
        if not scheduler.ready.is_set():
            raise p.APIError(503, f"the model {self.name or ''} is still loading; retry shortly".replace("  ", " "),
                             type="server_error", code="model_loading", headers={"Retry-After": str(RETRY_AFTER_S)})
        if scheduler.load_error is not None:
            raise p.APIError(503, f"the model failed to load: {scheduler.load_error}", type="server_error",
                             code="model_load_failed")
        return scheduler.generator

    def names(self) -> set[str]:
        """Every name a request's ``model`` may give this base model by."""
        gen = self.scheduler.generator
        names = {self.id}
        if gen is not None:
            names |= {gen.name} | ({str(gen.path)} if gen.path else set())
        return names


@dataclass(frozen=True)
class Target:
    """What a request runs on: the base model ``served``, its loaded ``generator``, the LoRA ``adapter`` (None:
    the base model) and ``name``, the id its response carries."""

    served: ServedModel
    generator: Any
    adapter: str | None
    name: str

    @property
    def scheduler(self) -> Scheduler:
        return self.served.scheduler

    @property
    def max_prompt_chars(self) -> int:
        return self.served.max_prompt_chars

    @property
    def chat_renderer(self) -> Any:
        """The base model's ChatRenderPool (an adapter renders with its base model's template)."""
        return self.served.chat_renderer


class OpenAIServingModels:
    """The server's base models (``served``, the first is the default) and their LoRA adapters.

    ``allow_runtime_lora``: whether ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter`` may change them
    (vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``; off by default)."""

    def __init__(self, served: list[ServedModel], *, allow_runtime_lora: bool = False) -> None:
        if not served:
            raise ValueError("a server needs at least one model")
        self.served = served
        self.allow_runtime_lora = allow_runtime_lora
        self.created = int(time.time())  # the model cards' "created": when the server was made
        self._lock = threading.Lock()  # adapter names: added and removed on engine threads, read by the loop

    @property
    def default(self) -> ServedModel:
        return self.served[0]

    def close(self) -> None:
        """Stop every model's chat render processes."""
        for served in self.served:
            served.close()

    # -- routing ---------------------------------------------------------------------------------------
    def target(self, model: str | None) -> Target:
        """The :class:`Target` a request's ``model`` names (None: the first model). 404 ``model_not_found``
        for a name no model or adapter has; 503 while the model it names loads."""
        if model is None:
            served = self.default
            return Target(served, served.generator(), None, served.id)
        for served in self.served:
            if served.name == model or (served.scheduler.generator is not None and model in served.names()):
                return Target(served, served.generator(), None, served.id)
        with self._lock:
            owner = next((s for s in self.served if model in s.adapters), None)
        if owner is not None:
            return Target(owner, owner.generator(), model, model)
        raise p.APIError(404, f"The model {model!r} does not exist; this server serves "
                         f"{', '.join(repr(n) for n in self.available_names())} (see /v1/models)",
                         param="model", code="model_not_found")

    def available_names(self) -> list[str]:
        """The ids of every base model and adapter, in ``/v1/models``' order."""
        with self._lock:
            return [n for s in self.served for n in (s.id, *s.adapters)]

    # -- /v1/models ------------------------------------------------------------------------------------
    def model_card(self, served: ServedModel, gen: Any) -> p.ModelCard:
        """A base model as ``/v1/models`` lists it: its context (``max_model_len``, tokens), quantization and
        the checkpoint's generation defaults."""
        return p.ModelCard(id=served.id, created=self.created, max_model_len=gen.config.n_positions,
                           generation_config=gen.generation_config, quantization=getattr(gen, "quantization", None),
                           root=str(gen.path) if gen.path else gen.name)

    def adapter_card(self, served: ServedModel, gen: Any, name: str, path: str) -> p.ModelCard:
        """An adapter as ``/v1/models`` lists it (vLLM's layout: ``root`` its folder, ``parent`` its base)."""
        return p.ModelCard(id=name, created=self.created, max_model_len=gen.config.n_positions,
                           generation_config=gen.generation_config, quantization=getattr(gen, "quantization", None),
                           root=str(Path(path).absolute()), parent=served.id)  # absolute, as a base model's

    def _cards(self) -> list[p.ModelCard]:
        cards = []
        for served in self.served:
            gen = served.generator()
            cards.append(self.model_card(served, gen))
            with self._lock:
                adapters = list(served.adapters.items())
            cards += [self.adapter_card(served, gen, name, path) for name, path in adapters]
        return cards

    @p.returns_errors
    async def show_available_models(self) -> p.ModelList:
        """``GET /v1/models``: every base model and adapter; 503 while a model loads."""
        return p.ModelList(data=self._cards())

    @p.returns_errors
    async def retrieve_model(self, model_id: str) -> p.ModelCard:
        """``GET /v1/models/{model_id}`` (OpenAI's ``models.retrieve``): that model or adapter, 404 for any other id."""
        target = self.target(model_id)
        if target.adapter is not None:
            with self._lock:
                path = target.served.adapters[target.adapter]
            return self.adapter_card(target.served, target.generator, target.adapter, path)
        if model_id != target.served.id:  # another of its names: the cards are by id only
            raise p.APIError(404, f"The model {model_id!r} does not exist; this server serves "
                             f"{', '.join(repr(n) for n in self.available_names())}", param="model",
                             code="model_not_found")
        return self.model_card(target.served, target.generator)

    # -- LoRA adapters -----------------------------------------------------------------------------------
    def attach(self, served: ServedModel, gen: Any, name: str, path: str | Path) -> None:
        """Load adapter ``path`` under ``name`` on ``served``'s Generator (on its engine thread) and route
        requests naming it there. ``ValueError`` / ``FileNotFoundError`` as :meth:`Generator.load_lora_adapter`."""
        if name in self.available_names():
            raise ValueError(f"the name {name!r} is taken by a model or adapter of this server")
        gen.load_lora_adapter(name, path)
        with self._lock:
            served.adapters[name] = str(path)

    def detach(self, served: ServedModel, gen: Any, name: str) -> None:
        """Unload adapter ``name`` (on its engine thread): new requests naming it get 404, running ones finish."""
        with self._lock:
            served.adapters.pop(name, None)
        gen.unload_lora_adapter(name)

    def _check_runtime_lora(self) -> None:
        if not self.allow_runtime_lora:
            raise p.APIError(403, "loading and unloading LoRA adapters at run time is off on this server; start it "
                             "with --allow-runtime-lora", type="permission_error", code="runtime_lora_disabled")

    @p.returns_errors
    async def load_lora_adapter(self, request: p.LoadLoRAAdapterRequest) -> str:
        """``POST /v1/load_lora_adapter`` (vLLM's body: ``lora_name``, ``lora_path``; ``base_model_name``: the
        base model, default the first): 200 with a message, 400 naming the field for a name already taken or a
        folder that is not an adapter of that model, 403 when the server does not allow it."""
        self._check_runtime_lora()
        served = self.default
        if request.base_model_name is not None:
            target = self.target(request.base_model_name)
            if target.adapter is not None:
                raise p.invalid(f"base_model_name {request.base_model_name!r} is an adapter, not a base model",
                                "base_model_name")
            served = target.served
        served.generator()  # 503 while it loads
        if request.lora_name in self.available_names():
            raise p.invalid(f"The lora adapter {request.lora_name!r} has already been loaded (or the name is a "
                            "model's)", "lora_name")
        try:
            await served.scheduler.call(lambda g: self.attach(served, g, request.lora_name, request.lora_path))
        except (ValueError, OSError) as exc:  # the reader's message names the file and what is wrong
            param = "lora_name" if "already" in str(exc) or "taken" in str(exc) else "lora_path"
            raise p.invalid(str(exc), param) from None
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    @p.returns_errors
    async def unload_lora_adapter(self, request: p.UnloadLoRAAdapterRequest) -> str:
        """``POST /v1/unload_lora_adapter`` (vLLM's body: ``lora_name``): 200 with a message, 404 for a name no
        adapter has, 403 when the server does not allow it. Requests already running with it finish."""
        self._check_runtime_lora()
        with self._lock:
            owner = next((s for s in self.served if request.lora_name in s.adapters), None)
        if owner is None:
            raise p.APIError(404, f"The lora adapter {request.lora_name!r} cannot be found.", param="lora_name",
                             code="model_not_found")
        await owner.scheduler.call(lambda g: self.detach(owner, g, request.lora_name))
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."
