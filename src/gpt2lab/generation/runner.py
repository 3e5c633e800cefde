"""Running requests through an :class:`~.engine.Engine` for one caller: the one loop of submit, step, collect.

Every front end that generates drives the engine through a :class:`Runner` (in the spirit of vLLM's
``LLM._run_engine`` over ``LLMEngine.step``): ``Generator.generate`` and ``Generator.stream``, ``gpt2lab
generate``, ``explore``, ``story``, ``augment`` and ``review make`` (through ``generate``), and the server's
engine thread, which keeps its own thread and inbox and calls :meth:`Runner.step`. The runner owns:

- submission: :meth:`Runner.add` checks a request (the engine's checks, ``ValueError`` naming the field)
  and queues it; requests may be added and aborted while the runner runs (between two outputs);
- stepping: :meth:`Runner.step` is one engine step; :meth:`Runner.run` and :meth:`Runner.outputs` step
  until nothing is left, holding :func:`gpt2lab.runtime.unchanged_weights` for the whole loop (``run``:
  no code of the caller's runs between steps, only ``on_output``) or for each step (``outputs``: the
  caller's code runs between steps and may change the model);
- collecting: each sequence's deltas, token ids and logprobs join into its :class:`~.outputs.Completion`
  (:meth:`Runner.completions`); a request is finished when its ``n`` sequences are;
- failure: a sequence the engine ended with an error (``finish_reason "error"``) is never taken for an
  empty result. The caller chooses: ``errors="raise"`` raises :class:`gpt2lab.errors.GenerationFailed`
  (``"generation failed[ for SOURCE]: why"``); ``errors="return"`` ends the request (its other sequences
  are aborted) and reports it (:attr:`StepOutputs.failed`, :meth:`Runner.error`). This is the one place
  that looks at ``RequestOutput.error``;
- the batch size: :func:`max_batch_for` chooses it from the device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..errors import GenerationFailed
from ..runtime import unchanged_weights
from ..sampling import SamplingParams
from .engine import Engine
from .outputs import Completion, RequestOutput, TokenLogprob

ErrorMode = Literal["raise", "return"]

# A CPU step costs about rows x weights (the weights stream through the caches once per step whatever
# the batch, the arithmetic grows with it); a GPU step barely grows with rows (bounded by the KV cache)
_CPU_MAX_BATCH, _GPU_MAX_BATCH = 16, 128


def max_batch_for(device: torch.device | str, at_least: int = 1) -> int:
    """How many sequences an engine on ``device`` decodes together by default: 16 on a CPU, 128 on a GPU;
    at least ``at_least`` (a beam request's ``num_beams`` rows must fit at once)."""
    kind = torch.device(device).type
    return max(_CPU_MAX_BATCH if kind == "cpu" else _GPU_MAX_BATCH, at_least)


@dataclass
class StepOutputs:
    """What one :meth:`Runner.step` produced.

    ``outputs``: the step's :class:`RequestOutput`\\ s (deltas), failed sequences left out; ``finished``: the
    requests whose every sequence finished in this step; ``failed``: request id -> why the engine ended it
    (``errors="return"``; its other sequences were aborted)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


class _Request:
    """One request's sequences as they arrive: how many finished and, when collected, their parts."""

    def __init__(self, n: int, prompt: str, source: str | None, logprobs: bool, collect: bool) -> None:
        self.n, self.prompt, self.source, self.done = n, prompt, source, 0
        self.error: str | None = None
        self.aborted = False
        self.collect = collect
        if collect:
            self.token_ids: list[list[int]] = [[] for _ in range(n)]
            self.pieces: list[list[str]] = [[] for _ in range(n)]
            self.logprobs: list[list[TokenLogprob] | None] = [[] if logprobs else None for _ in range(n)]
            self.reasons: list[str | None] = [None] * n
            self.prompt_logprobs: list[TokenLogprob] | None = None

    def add(self, out: RequestOutput) -> None:
        if self.collect:
            i = out.index
            self.token_ids[i] += out.token_ids
            self.pieces[i].append(out.text)
            if out.logprobs is not None and self.logprobs[i] is not None:
                self.logprobs[i] += out.logprobs
            if out.prompt_logprobs is not None:  # the prompt's, shared by its samples
                self.prompt_logprobs = out.prompt_logprobs
            if out.finished:
                self.reasons[i] = out.finish_reason
        if out.finished:
            self.done += 1

    @property
    def finished(self) -> bool:
        """Every sequence finished, or the request failed or was aborted: nothing more will come."""
        return self.done >= self.n or self.error is not None or self.aborted

    def completion(self, index: int) -> Completion:
        reason = self.reasons[index] or ("error" if self.error is not None else None)
        return Completion(text="".join(self.pieces[index]), token_ids=self.token_ids[index],
                          finish_reason=reason, logprobs=self.logprobs[index], prompt=self.prompt, index=index,
                          prompt_logprobs=self.prompt_logprobs)


class Runner:
    """Drives one :class:`Engine` for one caller: submission, stepping, collecting, failures, aborts.

    ``errors``: what a sequence the engine ended with an error does, ``"raise"`` (``GenerationFailed``) or
    ``"return"`` (the request ends and is reported). ``collect``: keep each sequence's parts for
    :meth:`completions` (the server streams its deltas and does not). Single-threaded, like the engine.
    """

    def __init__(self, engine: Engine, *, errors: ErrorMode = "raise", collect: bool = True) -> None:
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', got {errors!r}")
        self.engine, self.errors, self.collect = engine, errors, collect
        self._requests: dict[str, _Request] = {}

    def add(self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None, *,
            prompt: str = "", source: str | None = None, adapter: str | None = None) -> str:
        """Queue a request (``params.n`` samples, or a beam search returning the ``n`` best beams), with the
        LoRA ``adapter`` of that name (None: the base model); returns its id. ``prompt``: the text its
        completions carry; ``source``: how a failure names it (``"prompt 3"``). Raises ValueError naming the
        field when the engine refuses it (nothing is queued then), or when ``request_id`` names a request of
        this runner that has not finished."""
        known = self._requests.get(request_id) if request_id is not None else None
        if known is not None and not known.finished:
            raise ValueError(f"request_id {request_id!r} is already running")
        request_id = self.engine.add_request(prompt_ids, params, request_id, adapter=adapter)
        self._requests[request_id] = _Request(params.n, prompt, source, params.logprobs is not None, self.collect)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request, waiting or running: no further output for it (its collected parts stay; a
        sequence it stopped has ``finish_reason`` None)."""
        self.engine.abort(request_id)
        request = self._requests.get(request_id)
        if request is not None:
            request.aborted = True
            if not self.collect:
                del self._requests[request_id]

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def step(self) -> StepOutputs:
        """One engine step, its outputs collected per request. Raises ``GenerationFailed`` for a failed
        sequence with ``errors="raise"`` (its request is aborted first), and whatever ``Engine.step`` raises
        (a fault of the batched forward itself)."""
        result = StepOutputs()
        for out in self.engine.step():
            request = self._requests.get(out.request_id)
            if request is None:  # not this runner's (added to the engine directly)
                result.outputs.append(out)
                continue
            if out.error is not None:
                self._fail(out.request_id, request, out.error, result)
                continue
            request.add(out)
            result.outputs.append(out)
            if out.finished and request.finished:
                result.finished.append(out.request_id)
                if not self.collect:
                    del self._requests[out.request_id]
        return result

    def _fail(self, request_id: str, request: _Request, error: str, result: StepOutputs) -> None:
        request.error = error
        self.engine.abort(request_id)  # its other samples: a failed request gives no partial answer
        if not self.collect:
            del self._requests[request_id]
        if self.errors == "raise":
            source = f" for {request.source}" if request.source else ""
            raise GenerationFailed(f"generation failed{source}: {error}")
        result.failed[request_id] = error

    def outputs(self) -> Iterator[RequestOutput]:
        """Step until nothing is left, yielding each output; requests may be added or aborted in between.
        The caller's code runs between steps, so the weights are promised unchanged for one step at a time."""
        while self.has_unfinished():
            with unchanged_weights(self.engine.model):
                outputs = self.step().outputs
            yield from outputs

    def run(self, on_output: Callable[[RequestOutput], None] | None = None) -> None:
        """Step until nothing is left, holding ``unchanged_weights`` for the whole loop; ``on_output`` (which
        may add or abort requests, and must not change the model) sees each output as it comes."""
        with unchanged_weights(self.engine.model):  # no other code runs between the steps of this loop
            while self.has_unfinished():
                for out in self.step().outputs:
                    if on_output is not None:
                        on_output(out)

    def completions(self, request_id: str) -> list[Completion]:
        """A collected request's ``n`` completions in index order (a sequence that did not finish has
        ``finish_reason`` None, or ``"error"`` when its request failed). ``KeyError`` for an unknown id."""
        request = self._requests[request_id]
        if not request.collect:
            raise ValueError("this runner does not collect completions (collect=False)")
        return [request.completion(i) for i in range(request.n)]

    def error(self, request_id: str) -> str | None:
        """Why the engine ended a request (``errors="return"``), or None."""
        request = self._requests.get(request_id)
        return request.error if request is not None else None
