"""The :class:`Generator`: a loaded model with its tokenizer, the object every front end talks to."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import CheckpointError, load_model, resolve_model, save_model
from ..checkpoints.io import GENERATION_CONFIG_FILE, checkpoint_dtype
from ..model import GPT2, GPT2Config
from ..model.multi_lora import LoRABank, LoRAMapping, lora_hooks
from ..placement import check_quantization, parse_dtype, resolve_device, resolve_dtype, storage_dtype
from ..readers import read_json
from ..sampling import SamplingParams, hf_compat
from ..tokenizer import TOKENIZER_FILES, Tokenizer, TokenizerError, gpt2_tokenizer_dir
from .engine import Engine
from .outputs import Completion, TokenLogprob, token_logprobs
from .prefix_cache import PrefixCache, default_capacity
from .runner import ErrorMode, Runner, max_batch_for


def read_generation_config(directory: Path | None) -> dict[str, Any]:
    """A checkpoint's ``generation_config.json`` as a dict (transformers' field names), ``{}`` when absent."""
    path = directory / GENERATION_CONFIG_FILE if directory is not None else None
    if path is None or not path.is_file():
        return {}
    try:
        return read_json(path, expect=dict)
    except (ValueError, OSError) as exc:  # the reader's message names the file and the problem
        raise CheckpointError(str(exc)) from None


class Generator:
    """A GPT-2 model, its tokenizer and the name it was loaded by.

    ``prefix_cache``: the :class:`~.prefix_cache.PrefixCache` its engines share (default: sized to the
    machine, :func:`~.prefix_cache.default_capacity`; ``PrefixCache(0)`` keeps nothing); ``lora``: the LoRA
    adapters loaded with :meth:`load_lora_adapter`, which calls name with ``adapter=``.
    """

    def __init__(self, model: GPT2, tokenizer: Tokenizer, name: str = "model",
                 path: Path | None = None, tokenizer_dir: Path | None = None,
                 generation_config: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.tokenizer_dir = tokenizer_dir
        # transformers' field names, as in generation_config.json: the defaults of every generate call
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        self.adapter: Path | None = None  # a LoRA adapter merged into the weights at load (for the model card)
        self.lora = LoRABank(model)  # adapters applied per request, unmerged
        self.prefix_cache = PrefixCache(default_capacity(model.wte.weight.device))
        # a bad value fails at load, not at first use; fields gpt2lab does not use are named once, here
        hf_compat.translate(self.generation_config, eos_token_id=self.eos_token_id, strict=False,
                            source=self._config_source(), warn=True)

    def _config_source(self) -> str:
        return str(self.path / GENERATION_CONFIG_FILE) if self.path is not None else GENERATION_CONFIG_FILE

    @property
    def config(self) -> GPT2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @property
    def quantization(self) -> str | None:
        """The model's weight quantization: ``None`` (as stored), ``"int8"``, ``"int4"`` or ``"bf16"`` (vLLM's name)."""
        return self.model.quantization

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def __repr__(self) -> str:
        c = self.config
        quantized = f", quantization={self.quantization!r}" if self.quantization else ""
        return (f"Generator(name={self.name!r}, n_layer={c.n_layer}, n_embd={c.n_embd}, "
                f"params={self.model.num_parameters() / 1e6:.1f}M, device={self.device}{quantized})")

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor, *, adapter: str | None = None) -> torch.Tensor:
        """Logits ``[len(token_ids), vocab_size]`` at every position, computed without the KV cache (with the
        LoRA ``adapter`` of that name: see :meth:`load_lora_adapter`)."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence of ints, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size - 1}]")
        mapping = LoRAMapping.of(self.lora, [self._adapter_slot(adapter)])
        with lora_hooks(self.model, mapping, ids.numel()):
            return self.model(ids[None])[0].float()

    # -- LoRA adapters applied per request -------------------------------------------------------------
    def load_lora_adapter(self, name: str, path: str | Path) -> None:
        """Load the LoRA adapter in folder ``path`` (``peft``'s format, as ``gpt2lab finetune --lora-rank``
        writes) under ``name``, unmerged: a call naming it (``generate(..., adapter=name)``) adds its low-rank
        products to the base model's, and calls naming other adapters or none share the same weights and the
        same batches (vLLM's ``load_lora_adapter``). Raises ``FileNotFoundError`` / ``ValueError`` naming the
        file or what does not fit the model, or a name already loaded."""
        from ..checkpoints.adapters import read_adapter

        if name in self.lora:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        adapter = read_adapter(path)
        try:
            self.lora.add(name, adapter.state, adapter.rank, adapter.alpha, adapter.use_rslora, path=str(path))
        except ValueError as exc:
            raise ValueError(f"{Path(path)}: {exc}") from None

    def unload_lora_adapter(self, name: str) -> None:
        """Unload adapter ``name`` (``KeyError`` naming it when it is not loaded); requests already running with
        it finish with it."""
        self.lora.remove(name)

    def lora_adapters(self) -> list[str]:
        """The names of the LoRA adapters loaded with :meth:`load_lora_adapter`."""
        return self.lora.names()

    def _adapter_slot(self, adapter: str | None) -> int:
        if adapter is None:
            return -1
        if adapter not in self.lora:
            raise ValueError(f"adapter {adapter!r} is not loaded (see load_lora_adapter)")
        return self.lora.slot(adapter)

    # -- generation ---------------------------------------------------------------------------
    def engine(self, max_batch: int | None = None) -> Engine:
        """A continuous-batching :class:`Engine` over this model (one at a time: they share the KV cache);
        ``max_batch`` sequences decode together (default: :func:`~.runner.max_batch_for` this device)."""
        return Engine(self.model, self.tokenizer, max_batch=max_batch if max_batch is not None
                      else max_batch_for(self.device), lora=self.lora, prefix_cache=self.prefix_cache)

    def runner(self, max_batch: int | None = None, *, num_beams: int = 1, errors: ErrorMode = "raise",
               collect: bool = True) -> Runner:
        """A :class:`~.runner.Runner` over a new :meth:`engine`: the loop every front end drives requests with.
        ``max_batch`` default: :func:`~.runner.max_batch_for` this device, with room for ``num_beams`` rows (the
        widest beam request it will run)."""
        if max_batch is None:
            max_batch = max_batch_for(self.device, at_least=num_beams)
        return Runner(self.engine(max_batch=max_batch), errors=errors, collect=collect)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt token ids; an empty prompt starts from ``<|endoftext|>`` as GPT-2 did in training."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            bos = self.eos_token_id if self.eos_token_id is not None else self.config.bos_token_id
            ids = [bos]
        return ids

    def generate(self, prompts: str | Sequence[str], params: SamplingParams | None = None, *,
                 adapter: str | None = None, **kwargs: Any) -> list[Completion]:
        """Complete one prompt or a list of them: ``n`` completions per prompt, prompt by prompt, in order.

        Controls come as keyword arguments (see :class:`SamplingParams`; transformers' names such as
        ``do_sample``, ``num_return_sequences``, ``min_new_tokens``, ``eos_token_id`` are aliases, see
        :mod:`gpt2lab.sampling.hf_compat`), as ``generation_config=`` (a ``transformers.GenerationConfig``
        or dict, replacing the checkpoint's) or as a ``params`` object. The checkpoint's
        ``generation_config.json`` gives the defaults that these override.
        With ``seed``, each prompt gets its own seeded generator, so a prompt's completions do not
        depend on the other prompts of the batch. With ``num_beams > 1``, the ``n`` best beams.
        ``adapter``: the LoRA adapter of that name (:meth:`load_lora_adapter`), None for the base model.
        Raises ``ValueError`` naming the field for a request that cannot run (before any work), and
        :class:`gpt2lab.errors.GenerationFailed` naming the prompt when the engine ends one with an error.
        """
        params = self.sampling_params(params, **kwargs)
        if not isinstance(prompts, (str, Sequence)):  # None: "'NoneType' object is not iterable"
            raise TypeError(f"prompts must be a str or a sequence of str, got {type(prompts).__name__}")
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.encode_prompt(p) for p in prompt_list]
        runner = self.runner(num_beams=params.num_beams)
        for i, (text, ids) in enumerate(zip(prompt_list, encoded)):  # every prompt is checked before any work
            runner.add(ids, params, request_id=str(i), prompt=text, source=f"prompt {i}", adapter=adapter)
        runner.run()
        return [c for i in range(len(prompt_list)) for c in runner.completions(str(i))]

    def stream(self, prompt: str, params: SamplingParams | None = None, *, adapter: str | None = None,
               **kwargs: Any) -> Iterator[str]:
        """Yield the completion's text as it is produced; the pieces join to ``generate(prompt)[0].text``
        (``adapter``: as :meth:`generate`'s). Raises :class:`gpt2lab.errors.GenerationFailed` when the engine
        ends it with an error."""
        params = self.sampling_params(params, **kwargs)
        if params.n != 1 or params.num_beams != 1:
            raise ValueError("stream() produces one completion: n and num_beams must be 1")
        runner = self.runner(max_batch=1)
        runner.add(self.encode_prompt(prompt), params, adapter=adapter)
        for out in runner.outputs():  # the weights may change between two tokens (they are followed)
            if out.text:
                yield out.text

    def generate_text(self, prompt: str, max_length: int = 100, temperature: float = 0.8, top_k: int = 50,
                      **more: Any) -> str:
        """The seed's function: sample a continuation and return the prompt followed by it.

        ``max_length`` counts prompt + new tokens (as in ``transformers``); pass ``max_new_tokens``
        instead to count new tokens only.
        """
        _check_prompt(prompt)
        if "max_new_tokens" in more:
            max_length = None  # type: ignore[assignment]
        completion = self.generate(prompt, max_length=max_length, temperature=temperature, top_k=top_k, **more)[0]
        return prompt + completion.text

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], top_n: int = 0, *, adapter: str | None = None) -> list[TokenLogprob]:
        """Log-probability of each token given the ones before it (tokens 1..len-1; the first has none).

        ``top_n`` adds that many most likely alternatives at each position. Uses the raw model
        distribution (with the LoRA ``adapter`` of that name), like the logprobs of generation.
        """
        if not isinstance(top_n, int) or not 0 <= top_n <= self.config.vocab_size:
            raise ValueError(f"top_n must be an integer in [0, {self.config.vocab_size}], got {top_n!r}")
        ids = list(token_ids)
        if len(ids) > self.config.n_positions:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than the model's context "
                             f"n_positions={self.config.n_positions}")
        lp = torch.log_softmax(self.logits(ids, adapter=adapter)[:-1], dim=-1)
        return token_logprobs(lp, ids[1:], top_n, self.tokenizer)

    def sampling_params(self, params: SamplingParams | None = None, **kwargs: Any) -> SamplingParams:
        """The :class:`SamplingParams` of a call: ``kwargs`` (our names or transformers') over the call's
        ``generation_config=`` (a ``transformers.GenerationConfig`` or a dict) over the checkpoint's
        generation config, as transformers merges them: the object's fields win, the fields it does not
        set keep the checkpoint's values; within one config ``max_new_tokens`` wins over ``max_length``,
        and fields gpt2lab does not use are ignored with a :class:`~gpt2lab.sampling.hf_compat.GenerationConfigWarning`.
        With ``params``: ``params`` with the object's then ``kwargs``' settings applied."""
        override = kwargs.pop("generation_config", None)
        eos = self.eos_token_id
        explicit = hf_compat.translate(kwargs, eos_token_id=eos, source="generation parameters")
        if override is not None:
            given = hf_compat.translate(hf_compat.as_dict(override), eos_token_id=eos, strict=False,
                                        source="generation_config", warn=True)
            sample = given.get("_sample") or explicit.get("_sample")
            explicit = hf_compat.merge(given, explicit)
            if sample and "temperature" not in explicit:
                explicit["_sample"] = True  # the object's do_sample=True lifts a greedy checkpoint below it
            if params is None:
                return self._layered(explicit, {})
        if params is not None:
            if not isinstance(params, SamplingParams):
                raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
            explicit.pop("_sample", None)
            return params.with_(**explicit) if explicit else params
        return self._layered(explicit, {})

    def checkpoint_defaults(self) -> dict[str, Any]:
        """The checkpoint's ``generation_config.json`` as :class:`SamplingParams` keyword arguments (fields
        gpt2lab has no use for are skipped; see :mod:`gpt2lab.sampling.hf_compat`)."""
        return hf_compat.translate(self.generation_config, eos_token_id=self.eos_token_id, strict=False,
                                   source=GENERATION_CONFIG_FILE)

    def resolve_sampling(self, explicit: Mapping[str, Any] | None = None, defaults: Mapping[str, Any] | None = None,
                         *, defaults_win: bool = False, skip: Collection[str] = ()) -> SamplingParams:
        """The one merge of a call's generation settings, used by the library, the CLI and the server.

        Precedence, as in transformers and vLLM (``--generation-config auto``): ``explicit`` (what the user
        gave: keyword arguments, command-line flags, request fields) > the checkpoint's
        ``generation_config.json`` > ``defaults`` (a command's or endpoint's own) > :class:`SamplingParams`'
        defaults. ``defaults_win``: the caller's defaults go above the checkpoint's (commands whose defaults
        are their purpose, such as varied drafts). ``skip``: SamplingParams fields the checkpoint may not
        set (a command's own length or count). Either length (``max_new_tokens`` / ``max_length``) given at a
        level replaces both below it. Names may be ours or transformers'; ``ValueError`` / ``TypeError``
        name a bad or unknown parameter.
        """
        eos = self.eos_token_id
        base = hf_compat.translate(defaults or {}, eos_token_id=eos, source="defaults")
        checkpoint = {k: v for k, v in self.checkpoint_defaults().items() if v is not None}
        for name in skip:
            checkpoint.pop(name, None)
        if "n" in skip:
            checkpoint.pop("num_beams", None)  # beams return n sequences: a command without n cannot take them
        given = hf_compat.translate(explicit or {}, eos_token_id=eos, source="generation parameters")
        return self._layered(given, base, checkpoint, defaults_win=defaults_win)

    def _layered(self, given: Mapping[str, Any], base: Mapping[str, Any], checkpoint: Mapping[str, Any] | None = None,
                 *, defaults_win: bool = False) -> SamplingParams:
        checkpoint = self.checkpoint_defaults() if checkpoint is None else checkpoint
        lower, upper = (checkpoint, base) if defaults_win else (base, checkpoint)
        below = hf_compat.merge(lower, upper)
        merged = hf_compat.merge(below, given)
        if given.get("_sample") and "temperature" not in given and below.get("temperature") == 0 \
                and base.get("temperature"):
            merged["temperature"] = base["temperature"]  # do_sample=True over a greedy checkpoint: the caller's
        return SamplingParams.from_kwargs(**merged)

    def _stored_dtype(self) -> torch.dtype:
        """The dtype this model's checkpoint is stored in (what ``save(dtype="auto")`` writes)."""
        if self.path is None:
            raise ValueError('dtype="auto" needs a checkpoint directory to read the dtype from; this model was '
                             "not loaded from one: name the dtype")
        return checkpoint_dtype(self.path)

    def save(self, path: str | Path, *, dtype: str | torch.dtype | None = None,
             max_shard_size: int | str = "5GB") -> Path:
        """Write the model and tokenizer in Hugging Face layout (loads back with ``transformers``):
        config.json with ``torch_dtype``, generation_config.json, tokenizer files with tokenizer_config.json,
        a model card, and shards with an index above ``max_shard_size``."""
        from ..checkpoints.card import model_card
        from ..model.lora import lora_modules, merge_lora

        dtype = storage_dtype(dtype, self._stored_dtype)
        stored = dtype or self.model.wte.weight.dtype
        model, how = self.model, f"Saved with gpt2lab (`Generator.save`) from `{self.name}`."
        if lora_modules(model):  # a LoRA-adapted model is saved as a plain GPT-2 with the adapters merged
            import copy

            model = merge_lora(copy.deepcopy(model)).eval()
            how += " Its LoRA adapter is merged into the weights."
        elif self.adapter is not None:
            how += f" Its LoRA adapter is merged into the weights (from `{self.adapter}`)."
        card = model_card(how=how, config=self.config, dtype=stored, base_model=self.name)
        return save_model(model, path, tokenizer_dir=self.tokenizer_dir, dtype=dtype,
                          generation_config=self.generation_config, max_shard_size=max_shard_size, card=card)


def load_tokenizer(directory: Path, vocab_size: int) -> tuple[Tokenizer, Path]:
    """The checkpoint's own tokenizer; GPT-2's only when a 50257-token checkpoint has no tokenizer file
    at all (a present but broken one is a :class:`TokenizerError` naming it)."""
    if vocab_size == 50257 and not any((directory / name).is_file() for name in TOKENIZER_FILES):
        print(f"gpt2lab: {directory} has no tokenizer files; using GPT-2's tokenizer", file=sys.stderr)
        return Tokenizer.gpt2(), gpt2_tokenizer_dir()
    return Tokenizer.from_dir(directory), directory


def load(model: Any = None, *, tokenizer: Any = None, adapter: str | Path | None = None,
         device: str | torch.device = "auto", dtype: str | torch.dtype | None = None,
         quantization: str | None = None) -> Generator:
    """Load a GPT-2: a local directory, a bundled model, a Hugging Face Hub id, or a ``transformers``
    ``GPT2LMHeadModel`` object (``tokenizer``: a transformers tokenizer object; default: the one in the
    model object's folder, else GPT-2's).

    ``model=None`` asks for ``gpt2`` and falls back to the bundled model when it cannot be had; a model
    named explicitly (``"gpt2"`` included) never does: it loads or raises ``ModelNotFoundError`` saying
    how to get it. A folder holding only a LoRA adapter (``adapter_config.json``, peft's format) loads its
    ``base_model_name_or_path`` with the adapter; ``adapter=DIR`` applies one to any base. The adapter is
    merged into the weights (the model is a plain GPT-2 afterwards; ``save`` writes the merged model).

    ``device``: ``"auto"`` (a CUDA GPU when torch sees one, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` (:func:`gpt2lab.placement.resolve_device`: ``ValueError`` when it is not there).
    ``dtype``: ``None``, the device's default (bfloat16 on a GPU with native bf16, float32 elsewhere);
    ``"auto"``, the checkpoint's own dtype when it is stored in float16/bfloat16 (as in transformers),
    else the device's default; or a name (``"float32"``, ``"bfloat16"``, ``"float16"``).
    ``quantization``: ``None`` (weights as stored, trainable), ``"int8"`` (weight-only int8 with per-output-channel
    scales, about 4x fewer bytes per decoded token), ``"int4"`` (4-bit block weights, a scale per 128 inputs) or
    ``"bf16"`` (16-bit weights, fp32 arithmetic), vLLM's option name; quantized while loading, tensor by tensor, and
    inference-only; ``dtype`` is then unused (what is not quantized, LayerNorms, biases and positions, stays
    float32, as the kernels read it). ValueError for any other value. No call is needed to make generation fast: the
    model picks gpt2lab's kernels whenever it runs inference (``gpt2lab.runtime.inference_runner``).
    """
    quantization = check_quantization(quantization)  # before any file is read
    device = resolve_device(device)
    if quantization is not None:
        parse_dtype(dtype)  # a bad name still fails
        # what the quantized loader keeps for every tensor it does not quantize (LayerNorms, biases, positions),
        # and what gpt2lab's kernels read: a model object or an adapter's base quantized after loading in
        # float16 kept float16 there, so the kernels did not run it
        dtype = torch.float32
    if _is_transformers_model(model):
        gen = _from_transformers(model, tokenizer, device=device,
                                 dtype=resolve_dtype(None, device) if dtype is None else dtype)
    else:
        from ..checkpoints.adapters import ADAPTER_CONFIG, adapter_base_model

        if model is not None and adapter is None and (Path(model) / ADAPTER_CONFIG).is_file() \
                and not (Path(model) / "config.json").is_file():
            adapter, model = Path(model), adapter_base_model(Path(model))
        resolved = resolve_model(model)
        dtype = resolve_dtype(dtype, device, stored=lambda: checkpoint_dtype(resolved.path))
        net = load_model(resolved.path, device=device, dtype=dtype,
                         quantization=quantization if adapter is None else None)
        if tokenizer is not None:
            tok, tokenizer_dir = _tokenizer_from_object(tokenizer)
        else:
            tok, tokenizer_dir = load_tokenizer(resolved.path, net.config.vocab_size)
        gen = Generator(net, tok, name=resolved.name, path=resolved.path, tokenizer_dir=tokenizer_dir,
                        generation_config=read_generation_config(resolved.path))
    if adapter is not None:
        from ..checkpoints.adapters import load_adapter
        from ..model.lora import merge_lora

        # merged into the weights: the same logits as peft's, and the model stays a plain GPT-2 that the
        # inference fast paths (optimize_for_inference, CUDA graphs) and quantization can take
        merge_lora(load_adapter(gen.model, adapter)).eval()
        gen.adapter = Path(adapter)
    if quantization is not None and gen.model.quantization is None:  # a model object, or an adapter applied
        from ..model.quantize import quantize_

        quantize_(gen.model, quantization)
    return gen


def _is_transformers_model(obj: Any) -> bool:
    return isinstance(obj, torch.nn.Module) and hasattr(obj, "config") and hasattr(obj.config, "to_dict")


def _tokenizer_from_object(tokenizer: Any) -> tuple[Tokenizer, Path]:
    """Our :class:`Tokenizer` from a transformers tokenizer object, through the files it saves (kept in
    a temporary folder, so a later ``save`` copies them)."""
    if not hasattr(tokenizer, "save_pretrained"):
        raise TypeError(f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}")
    folder = Path(tempfile.mkdtemp(prefix="gpt2lab-tokenizer-"))
    tokenizer.save_pretrained(str(folder))
    return Tokenizer.from_dir(folder), folder


def _from_transformers(hf_model: Any, tokenizer: Any, *, device: str | torch.device,
                       dtype: str | torch.dtype | None) -> Generator:
    """A :class:`Generator` over a copy of a ``transformers`` ``GPT2LMHeadModel``'s weights."""
    from ..checkpoints.io import model_from_tensors

    try:
        config = GPT2Config.from_dict(hf_model.config.to_dict())
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"model object {type(hf_model).__name__}: {exc}") from exc
    dtype = storage_dtype(dtype, lambda: next(p.dtype for p in hf_model.parameters() if p.is_floating_point()))
    state = {k: v.detach().to("cpu", copy=True) for k, v in hf_model.state_dict().items()}
    net = model_from_tensors(config, [state], dtype=dtype, device=device,
                      source=f"{type(hf_model).__name__} object", config_source="its config")
    name = str(getattr(hf_model, "name_or_path", "") or getattr(hf_model.config, "name_or_path", "") or "model")
    source_dir = Path(name) if Path(name).is_dir() else None
    if tokenizer is not None:
        tok, tokenizer_dir = _tokenizer_from_object(tokenizer)
    elif source_dir is not None:
        tok, tokenizer_dir = load_tokenizer(source_dir, config.vocab_size)
    elif config.vocab_size == 50257:
        tok, tokenizer_dir = Tokenizer.gpt2(), gpt2_tokenizer_dir()
    else:
        raise TokenizerError(f"model object {type(hf_model).__name__} has vocab_size {config.vocab_size}, "
                             "not GPT-2's: pass its tokenizer with tokenizer=")
    gen_cfg = getattr(hf_model, "generation_config", None)
    return Generator(net, tok, name=name, path=source_dir, tokenizer_dir=tokenizer_dir,
                     generation_config=hf_compat.as_dict(gen_cfg) if gen_cfg is not None else None)


_LOADED: dict[str | None, Generator] = {}


def _check_prompt(prompt: Any) -> None:
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")


def generate_text(prompt: str, max_length: int = 100, temperature: float = 0.8, top_k: int = 50,
                  model: str | Path | None = None, **more: Any) -> str:
    """The seed's ``generate_text`` as one call: load ``model`` once (default ``gpt2``) and complete ``prompt``.
    ``TypeError`` naming ``prompt`` when it is not a string (before any model loads)."""
    _check_prompt(prompt)
    key = None if model is None else str(model)
    if key not in _LOADED:  # kept for later calls
        _LOADED[key] = load(model)
    return _LOADED[key].generate_text(prompt, max_length=max_length, temperature=temperature, top_k=top_k, **more)
