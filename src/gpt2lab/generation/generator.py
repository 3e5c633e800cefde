"""The :class:`Generator`: a loaded model with its tokenizer, the object every front end talks to."""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import load_model, resolve_model, save_model
from ..model import GPT2, GPT2Config
from ..sampling import SamplingParams
from ..tokenizer import Tokenizer, TokenizerError, gpt2_tokenizer_dir
from .engine import Engine
from .outputs import Completion, TokenLogprob, token_logprobs


def _parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {dtype!r}")
    return table[dtype]


class Generator:
    """A GPT-2 model, its tokenizer and the name it was loaded by."""

    def __init__(self, model: GPT2, tokenizer: Tokenizer, name: str = "model",
                 path: Path | None = None, tokenizer_dir: Path | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.tokenizer_dir = tokenizer_dir

    @property
    def config(self) -> GPT2Config:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.wte.weight.device

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    def __repr__(self) -> str:
        c = self.config
        return (f"Generator(name={self.name!r}, n_layer={c.n_layer}, n_embd={c.n_embd}, "
                f"params={self.model.num_parameters() / 1e6:.1f}M, device={self.device})")

    @torch.inference_mode()
    def logits(self, token_ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Logits ``[len(token_ids), vocab_size]`` at every position, computed without the KV cache."""
        ids = torch.as_tensor(token_ids, dtype=torch.long, device=self.device)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"token_ids must be a non-empty 1-D sequence of ints, got shape {tuple(ids.shape)}")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size - 1}]")
        return self.model(ids[None])[0].float()

    # -- generation ---------------------------------------------------------------------------
    def engine(self, max_batch: int = 16) -> Engine:
        """A continuous-batching :class:`Engine` over this model (one at a time: they share the KV cache)."""
        return Engine(self.model, self.tokenizer, max_batch=max_batch)

    def encode_prompt(self, prompt: str) -> list[int]:
        """Prompt token ids; an empty prompt starts from ``<|endoftext|>`` as GPT-2 did in training."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not ids:
            bos = self.eos_token_id if self.eos_token_id is not None else self.config.bos_token_id
            ids = [bos]
        return ids

    def generate(self, prompts: str | Sequence[str], params: SamplingParams | None = None,
                 **kwargs: Any) -> list[Completion]:
        """Complete one prompt or a list of them: ``n`` completions per prompt, prompt by prompt, in order.

        Controls come as keyword arguments (see :class:`SamplingParams`) or as a ``params`` object.
        With ``seed``, each prompt gets its own seeded generator, so a prompt's completions do not
        depend on the other prompts of the batch.
        """
        params = _params(params, kwargs)
        prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
        encoded = [self.encode_prompt(p) for p in prompt_list]
        if params.num_beams > 1:
            from .beam import beam_search

            return [c for p, ids in zip(prompt_list, encoded)
                    for c in beam_search(self.model, self.tokenizer, ids, params, prompt=p,
                                         eos_token_id=self.eos_token_id)]
        engine = self.engine(max_batch=min(16, max(1, len(prompt_list) * params.n)))
        for i, ids in enumerate(encoded):  # every prompt is validated before any work starts
            engine.add_request(ids, params, request_id=str(i))
        parts: dict[tuple[str, int], list] = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.error is not None:
                    raise RuntimeError(f"generation failed for prompt {out.request_id}: {out.error}")
                acc = parts.setdefault((out.request_id, out.index), [[], [], [] if out.logprobs is not None else None,
                                                                     None])
                acc[0] += out.token_ids
                acc[1].append(out.text)
                if out.logprobs is not None:
                    acc[2] += out.logprobs
                acc[3] = out.finish_reason
        return [Completion(text="".join(acc[1]), token_ids=acc[0], finish_reason=acc[3], logprobs=acc[2],
                           prompt=p, index=j)
                for i, p in enumerate(prompt_list) for j in range(params.n)
                for acc in [parts[(str(i), j)]]]

    def stream(self, prompt: str, params: SamplingParams | None = None, **kwargs: Any) -> Iterator[str]:
        """Yield the completion's text as it is produced; the pieces join to ``generate(prompt)[0].text``."""
        params = _params(params, kwargs)
        if params.n != 1 or params.num_beams != 1:
            raise ValueError("stream() produces one completion: n and num_beams must be 1")
        engine = self.engine(max_batch=1)
        engine.add_request(self.encode_prompt(prompt), params)
        while engine.has_unfinished():
            for out in engine.step():
                if out.error is not None:
                    raise RuntimeError(f"generation failed: {out.error}")
                if out.text:
                    yield out.text

    def generate_text(self, prompt: str, max_length: int = 100, temperature: float = 0.8, top_k: int = 50,
                      **more: Any) -> str:
        """The seed's function: sample a continuation and return the prompt followed by it.

        ``max_length`` counts prompt + new tokens (as in ``transformers``); pass ``max_new_tokens``
        instead to count new tokens only.
        """
        if "max_new_tokens" in more:
            max_length = None  # type: ignore[assignment]
        completion = self.generate(prompt, max_length=max_length, temperature=temperature, top_k=top_k, **more)[0]
        return prompt + completion.text

    @torch.inference_mode()
    def score(self, token_ids: Sequence[int], top_n: int = 0) -> list[TokenLogprob]:
        """Log-probability of each token given the ones before it (tokens 1..len-1; the first has none).

        ``top_n`` adds that many most likely alternatives at each position. Uses the raw model
        distribution, like the logprobs of generation.
        """
        if not isinstance(top_n, int) or not 0 <= top_n <= self.config.vocab_size:
            raise ValueError(f"top_n must be an integer in [0, {self.config.vocab_size}], got {top_n!r}")
        ids = list(token_ids)
        if len(ids) > self.config.n_positions:
            raise ValueError(f"token_ids has {len(ids)} tokens, more than the model's context "
                             f"n_positions={self.config.n_positions}")
        lp = torch.log_softmax(self.logits(ids)[:-1], dim=-1)
        return token_logprobs(lp, ids[1:], top_n, self.tokenizer)

    def save(self, path: str | Path, *, dtype: str | torch.dtype | None = None) -> Path:
        """Write the model and tokenizer in Hugging Face layout (loads back with ``transformers``)."""
        return save_model(self.model, path, tokenizer_dir=self.tokenizer_dir, dtype=_parse_dtype(dtype))


def load_tokenizer(directory: Path, vocab_size: int) -> tuple[Tokenizer, Path]:
    """The checkpoint's own tokenizer; GPT-2's when a 50257-token checkpoint ships none."""
    try:
        return Tokenizer.from_dir(directory), directory
    except TokenizerError:
        if vocab_size != 50257:
            raise
        print(f"gpt2lab: {directory} has no tokenizer files; using GPT-2's tokenizer", file=sys.stderr)
        return Tokenizer.gpt2(), gpt2_tokenizer_dir()


def load(model: str | Path | None = None, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> Generator:
    """Load a GPT-2 checkpoint: a local directory, a bundled model, or a Hugging Face Hub id.

    ``model=None`` asks for ``gpt2`` and falls back to the bundled model when offline.
    """
    resolved = resolve_model(model)
    net = load_model(resolved.path, device=device, dtype=_parse_dtype(dtype))
    tokenizer, tokenizer_dir = load_tokenizer(resolved.path, net.config.vocab_size)
    return Generator(net, tokenizer, name=resolved.name, path=resolved.path, tokenizer_dir=tokenizer_dir)


def _params(params: SamplingParams | None, kwargs: dict[str, Any]) -> SamplingParams:
    if params is None:
        return SamplingParams.from_kwargs(**kwargs)
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    return params.with_(**kwargs) if kwargs else params


_LOADED: dict[str | None, Generator] = {}


def generate_text(prompt: str, max_length: int = 100, temperature: float = 0.8, top_k: int = 50,
                  model: str | Path | None = None, **more: Any) -> str:
    """The seed's ``generate_text`` as one call: load ``model`` once (default ``gpt2``) and complete ``prompt``."""
    from ..model import optimize_for_inference

    key = None if model is None else str(model)
    if key not in _LOADED:  # kept for later calls, and only ever used to generate: optimise it
        _LOADED[key] = load(model)
        optimize_for_inference(_LOADED[key].model)
    return _LOADED[key].generate_text(prompt, max_length=max_length, temperature=temperature, top_k=top_k, **more)
