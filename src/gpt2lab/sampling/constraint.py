"""The structured-outputs logits transform: each constrained row may only pick a token its grammar allows.

:class:`GrammarState` is one sequence's llguidance matcher and the generated tokens it has read;
:class:`StructuredOutput` is the transform (one class, like those of :mod:`.transforms`): called with a
batch's scores, histories and prompt lengths, it advances each constrained row's matcher to the row's
generated tokens, has llguidance compute the row's token bitmask (which tokens can continue a valid
output; EOS while the output is complete) and sets every other token to ``-inf``. Rows without a constraint
pass untouched. The technique is vLLM's and SGLang's grammar bitmask (llguidance's ``LLMatcher`` API).

The engine owns one :class:`GrammarState` per sequence and hands it to each step's pipeline, so a state
survives the pipeline being rebuilt when the batch changes and reads each token once; it also advances the
state right after a token is drawn (:meth:`GrammarState.advance`) to end the sequence as soon as the grammar
allows no more (:attr:`GrammarState.finished`). A pipeline built without states makes its own, and a row
whose history is not an extension of what its state read (a new request in that slot) is rolled back to
the common prefix first.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from .structured import StructuredOutputsParams, compiled_matcher, one_line
from .transforms import NEG_INF, LogitsTransform

if TYPE_CHECKING:
    from ..tokenizer import Tokenizer

# how every error of a row's grammar starts (the server answers it as the client's: 400)
GRAMMAR_ERROR = "structured output:"


class GrammarState:
    """One sequence's matcher (a copy of the spec's compiled grammar) and the generated tokens it has read.

    ``ignore_eos``: the row goes on past EOS (``SamplingParams.ignore_eos``), so EOS is never offered while the
    grammar could go on; a row ends when its grammar allows nothing more, or at its length limit.
    """

    def __init__(self, spec: StructuredOutputsParams, tokenizer: Tokenizer, *, ignore_eos: bool = False) -> None:
        self.spec = spec
        self.matcher = compiled_matcher(spec, tokenizer).deep_copy()
        self.vocab_size = tokenizer.vocab_size
        self.eos_token_id = tokenizer.eos_token_id if ignore_eos else None
        self.tokens: list[int] = []

    def advance(self, generated: Sequence[int]) -> None:
        """Read the row's generated tokens (``generated``: all of them so far) that this state has not read.
        A history that is not an extension of the tokens read is rolled back to their common prefix first.
        ``ValueError`` when a token is one the grammar does not allow (the row is then at fault)."""
        read = self.tokens
        if len(generated) < len(read) or list(generated[:len(read)]) != read:
            common = 0
            for a, b in zip(read, generated):
                if a != b:
                    break
                common += 1
            if not self.matcher.rollback(len(read) - common):
                raise ValueError(f"{GRAMMAR_ERROR} cannot roll the grammar back ({self.matcher.get_error()})")
            del read[common:]
        for token in generated[len(read):]:
            if not self.matcher.consume_token(int(token)):
                raise ValueError(f"{GRAMMAR_ERROR} token {int(token)} is not allowed by the "
                                 f"{self.spec.kind} constraint ({self.matcher.get_error() or 'no match'})")
            read.append(int(token))

    @property
    def finished(self) -> bool:
        """The output is complete and the grammar allows nothing more (not even EOS is needed to end it)."""
        return self.matcher.is_stopped()

    def fill_bitmask(self, words: np.ndarray) -> None:
        """Write the allowed tokens of the next step into ``words`` (``int32 [ceil(V / 32)]``, bit ``t % 32`` of
        word ``t // 32`` for token ``t``), as llguidance computes them. ``ValueError`` when the grammar hit an
        error (a limit of its parser, say)."""
        self.matcher.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
        if self.matcher.is_error():
            raise ValueError(f"{GRAMMAR_ERROR} {one_line(self.matcher.get_error())}")
        eos = self.eos_token_id
        if eos is not None and not self.matcher.is_stopped():
            words.view(np.uint32)[eos // 32] &= np.uint32(0xFFFFFFFF ^ (1 << (eos % 32)))


class StructuredOutput(LogitsTransform):
    """Mask every token a row's grammar forbids (``-inf``); rows whose spec is ``None`` pass untouched.

    ``specs``: one :class:`StructuredOutputsParams` or ``None`` per row; ``states``: the rows'
    :class:`GrammarState` (``None`` entries, or no list: made here). ``vocab_size``: the scores' width (ids from
    the tokenizer's vocabulary size on are masked for constrained rows: no grammar can produce them).
    """

    def __init__(self, specs: Sequence[StructuredOutputsParams | None], vocab_size: int, tokenizer: Tokenizer | None,
                 states: Sequence[GrammarState | None] | None = None, ignore_eos: Sequence[bool] | None = None) -> None:
        self.num_rows = len(specs)
        self.rows = [i for i, spec in enumerate(specs) if spec is not None]
        self.active = bool(self.rows)
        self.vocab_size = vocab_size
        if self.active and tokenizer is None and (states is None or any(states[i] is None for i in self.rows)):
            raise ValueError("structured_outputs needs a tokenizer: pass tokenizer= to LogitsPipeline")
        given = list(states) if states is not None else [None] * self.num_rows
        if len(given) != self.num_rows:
            raise ValueError(f"structured_outputs: got {len(given)} grammar states for {self.num_rows} rows")
        flags = list(ignore_eos) if ignore_eos is not None else [False] * self.num_rows
        self.states: list[GrammarState | None] = [
            (given[i] if given[i] is not None else GrammarState(spec, tokenizer, ignore_eos=flags[i]))
            if spec is not None else None for i, spec in enumerate(specs)]
        self._words = None
        self._index: torch.Tensor | None = None

    def apply_(self, scores: torch.Tensor, histories: Sequence[Sequence[int]] | None = None,
               prompt_lens: Sequence[int] | None = None) -> torch.Tensor:
        if scores.shape[0] != self.num_rows:
            raise ValueError(f"structured_outputs: built for {self.num_rows} rows, got {scores.shape[0]}")
        if histories is None or prompt_lens is None:
            raise ValueError("structured_outputs needs each row's history and prompt length")
        rows = self.rows
        width = max(s.vocab_size for s in self.states if s is not None)
        words = self._words
        if words is None or words.shape != (len(rows), (width + 31) // 32):
            words = self._words = np.empty((len(rows), (width + 31) // 32), dtype=np.int32)
        for j, i in enumerate(rows):
            state = self.states[i]
            state.advance(histories[i][prompt_lens[i]:])
            state.fill_bitmask(words[j])
        width = min(width, scores.shape[1])
        allowed = np.unpackbits(words.view(np.uint8), axis=1, count=width, bitorder="little")
        if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64, torch.float16):
            # in numpy, on the scores' own memory: one thread (torch would split 50k elements over its thread pool,
            # which costs more than the work on a busy machine)
            array = scores.detach().numpy()
            for j, i in enumerate(rows):
                np.copyto(array[i, :width], NEG_INF, where=allowed[j] == 0)
            array[rows, width:] = NEG_INF  # ids past the tokenizer's vocabulary
            return scores
        forbidden = torch.from_numpy(allowed).to(scores.device) == 0
        if forbidden.shape[1] < scores.shape[1]:  # ids past the tokenizer's vocabulary
            forbidden = torch.nn.functional.pad(forbidden, (0, scores.shape[1] - forbidden.shape[1]), value=True)
        if len(rows) == self.num_rows:
            return scores.masked_fill_(forbidden, NEG_INF)
        if self._index is None or self._index.device != scores.device:
            self._index = torch.tensor(rows, device=scores.device)
        scores[self._index] = scores[self._index].masked_fill_(forbidden, NEG_INF)
        return scores

    def __repr__(self) -> str:
        kinds = [s.spec.kind if s is not None else None for s in self.states]
        return f"StructuredOutput(rows={kinds})"

