"""One server's state apart from HTTP (vLLM's ``init_app_state``): the engine threads and the serving objects.

:meth:`ServerState.create` wires them; :func:`~gpt2lab.server.create_app` puts them behind routes, and a
test can use them as they are (:meth:`ServerState.start`, call a serving method, :meth:`ServerState.stop`).
A server serves one model or several (:class:`ModelConfig`), each with its own engine thread; their
memory is checked against a budget before any loads (:mod:`.memory`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import limits as lim
from .metrics import ServerMetrics
from .scheduler import Scheduler, TurnLock
from .serving_chat import OpenAIServingChat
from .serving_completion import OpenAIServingCompletion
from .serving_health import ServingHealth
from .serving_models import OpenAIServingModels, ServedModel
from .serving_tokenization import OpenAIServingTokenization


@dataclass(frozen=True)
class ModelConfig:
    """One model of a server: ``model`` (anything :func:`gpt2lab.load` accepts, or a loaded Generator), how it
    runs (``device``, ``dtype``, ``quantization``: as :func:`gpt2lab.load`'s, ``"none"`` for none; None: the
    server's) and its LoRA
    adapters (``lora_modules``: name -> adapter folder, vLLM's ``--lora-modules``)."""

    model: Any = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    lora_modules: Mapping[str, str | Path] = field(default_factory=dict)


@dataclass
class ServerState:
    """The served models (``models``, each with its engine thread) and one serving object per group of
    endpoints; ``metrics``: the server's registry."""

    models: OpenAIServingModels
    completion: OpenAIServingCompletion
    chat: OpenAIServingChat
    tokenization: OpenAIServingTokenization
    health: ServingHealth
    metrics: ServerMetrics

    @property
    def scheduler(self) -> Scheduler:
        """The first model's engine thread (a one-model server's only one)."""
        return self.models.default.scheduler

    @property
    def schedulers(self) -> list[Scheduler]:
        return [served.scheduler for served in self.models.served]

    def start(self) -> None:
        """Start every engine thread (each loads its model)."""
        for scheduler in self.schedulers:
            scheduler.start()

    def close(self) -> None:
        """Stop every engine thread and every model's chat render processes."""
        for scheduler in self.schedulers:
            scheduler.stop()
        self.models.close()

    stop = close  # the name the multi-model tests use

    @classmethod
    def create(cls, generator_or_model_ref: Any = None, *, max_batch: int = 16, max_queue: int = 64,
               request_timeout: float = 600.0, model_name: str | None = None, device: str = "auto",
               dtype: str | None = None, quantization: str | None = None, limits: lim.Limits | None = None,
               lora_modules: Mapping[str, str | Path] | None = None, allow_runtime_lora: bool = False,
               max_models_memory: int | str | None = None, prefix_cache_mb: float | None = None) -> ServerState:
        """The state of a server of ``generator_or_model_ref`` (arguments as :func:`~gpt2lab.server.create_app`'s);
        nothing runs until :meth:`start`, which loads each model on its engine thread.

        Raises ValueError naming ``max_batch`` (an integer in [1, 1024]), ``max_queue`` (in [0, 65536]),
        ``request_timeout`` (> 0 seconds), ``prefix_cache_mb`` (in [0, 2**20] megabytes) or a model name used
        twice, or a model's ``device``, ``dtype``, ``quantization`` spelled outside :mod:`gpt2lab.placement`'s
        vocabulary (checked here, before an engine thread loads anything), and the models (with what each needs)
        when they would not fit ``max_models_memory``."""
        from ..placement import check_quantization, device_name, parse_dtype

        for name, value, low, high in (("max_batch", max_batch, 1, lim.MAX_BATCH_LIMIT),
                                       ("max_queue", max_queue, 0, lim.MAX_QUEUE_LIMIT)):
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in [{low}, {high}], got {value!r}")
        if not request_timeout > 0:
            raise ValueError(f"request_timeout must be > 0 seconds, got {request_timeout!r}")
        if prefix_cache_mb is not None and not (isinstance(prefix_cache_mb, (int, float))
                                                and 0 <= prefix_cache_mb <= lim.MAX_PREFIX_CACHE_MB):
            raise ValueError(f"prefix_cache_mb must be a number in [0, {lim.MAX_PREFIX_CACHE_MB}] (megabytes; 0 turns "
                             f"prefix reuse off), got {prefix_cache_mb!r}")
        limits = limits or lim.Limits()
        configs = _model_configs(generator_or_model_ref, model_name, lora_modules)
        defaults = {"device": device, "dtype": dtype, "quantization": quantization}
        configs = {name: ModelConfig(c.model, **{k: getattr(c, k) if getattr(c, k) is not None else v
                                                 for k, v in defaults.items()}, lora_modules=c.lora_modules)
                   for name, c in configs.items()}
        for config in configs.values():
            device_name(config.device)
            parse_dtype(config.dtype)
            check_quantization(_quantization(config.quantization))
        prefix_bytes = None if prefix_cache_mb is None else int(prefix_cache_mb * 2**20)
        if max_models_memory is not None:
            _check_memory(configs, max_models_memory, max_batch, prefix_bytes)
        metrics, turns = ServerMetrics(), TurnLock() if len(configs) > 1 else None
        served: list[ServedModel] = []
        for name, config in configs.items():
            scheduler = Scheduler(None, max_batch=max_batch, max_queue=max_queue, metrics=metrics, name=name,
                                  model_is_callers=not isinstance(config.model, (str, Path, type(None))), turns=turns)
            if name is None and not isinstance(config.model, (str, Path, type(None))):
                name = getattr(config.model, "name", None)  # a caller's Generator: its name is known before loading
            served.append(ServedModel(name, scheduler, limits=limits))
        models = OpenAIServingModels(served, allow_runtime_lora=allow_runtime_lora)
        for entry, config in zip(served, configs.values()):  # before the schedulers start: before a load()
            entry.scheduler._load = _loader(models, entry, config, prefix_bytes)
        shared = dict(limits=limits, request_timeout=request_timeout)
        return cls(models, completion=OpenAIServingCompletion(models, **shared),
                   chat=OpenAIServingChat(models, **shared), tokenization=OpenAIServingTokenization(models, **shared),
                   health=ServingHealth(models), metrics=metrics)


def _model_configs(ref: Any, model_name: str | None,
                   lora_modules: Mapping[str, str | Path] | None) -> dict[str | None, ModelConfig]:
    """Served name (None: the model's own) -> its :class:`ModelConfig`; ``lora_modules`` go to the first model."""
    if isinstance(ref, Mapping):
        if model_name is not None:
            raise ValueError("model_name names a single model; give the names as the keys of the mapping")
        if not ref:
            raise ValueError("the mapping of models is empty: give at least one")
        configs = {}
        for name, item in ref.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"a model's name must be a non-empty string, got {name!r}")
            configs[name] = item if isinstance(item, ModelConfig) else ModelConfig(item)
    else:
        configs = {model_name: ref if isinstance(ref, ModelConfig) else ModelConfig(ref)}
    if lora_modules:
        first = next(iter(configs))
        configs[first] = ModelConfig(**{**configs[first].__dict__,
                                        "lora_modules": {**configs[first].lora_modules, **lora_modules}})
    names = [n for n in configs if n is not None] + [a for c in configs.values() for a in c.lora_modules]
    taken = sorted({n for n in names if names.count(n) > 1})
    if taken:
        raise ValueError(f"each model and adapter needs a name of its own; {', '.join(map(repr, taken))} is used twice")
    return configs


def _loader(models: OpenAIServingModels, served: ServedModel, config: ModelConfig, prefix_bytes: int | None) -> Any:
    def load() -> Any:  # on the engine thread, when the scheduler starts
        from ..generation import Generator
        from ..generation import load as load_generator
        from ..generation.prefix_cache import PrefixCache

        if isinstance(config.model, Generator):
            gen = config.model  # the caller's model: left as it is (it may still train)
        else:
            more = {} if config.quantization is None else {"quantization": _quantization(config.quantization)}
            gen = load_generator(config.model, device=config.device, dtype=config.dtype, **more)
        if prefix_bytes is not None:
            gen.prefix_cache = PrefixCache(prefix_bytes)
        served.prepare(gen)
        for name, path in config.lora_modules.items():
            models.attach(served, gen, name, path)
        return gen

    return load


def _check_memory(configs: Mapping[str | None, ModelConfig], budget: int | str, max_batch: int,
                  prefix_bytes: int | None) -> None:
    """``ValueError`` naming the models when their estimated memory exceeds ``budget`` (bytes or ``"8GB"``)."""
    from ..checkpoints import resolve_model
    from ..checkpoints.io import checkpoint_dtype
    from ..generation import Generator
    from ..generation.prefix_cache import default_capacity
    from ..placement import resolve_device, resolve_dtype
    from .memory import ModelMemory, check_budget, estimate, parse_size

    budget_bytes = budget if isinstance(budget, int) else parse_size(budget, "max_models_memory")
    needs: list[ModelMemory] = []
    for name, config in configs.items():
        device = resolve_device(config.device)
        pool = prefix_bytes if prefix_bytes is not None else default_capacity(device)
        adapters = tuple(Path(p) for p in config.lora_modules.values())
        if isinstance(config.model, Generator):
            needs.append(estimate(name or config.model.name, None, model=config.model.model, max_batch=max_batch,
                                  prefix_cache_bytes=pool, adapters=adapters))
            continue
        resolved = resolve_model(config.model, quiet=True)
        dtype = resolve_dtype(config.dtype, device, stored=lambda path=resolved.path: checkpoint_dtype(path))
        needs.append(estimate(name or resolved.name, resolved.path, dtype=dtype,
                              quantization=_quantization(config.quantization), max_batch=max_batch,
                              prefix_cache_bytes=pool,
                              adapters=adapters))
    check_budget(needs, budget_bytes)


def _quantization(value: str | None) -> str | None:
    return None if value == "none" else value
