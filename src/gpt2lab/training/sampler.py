"""The order of training blocks and the validation blocks: a pure function of ``(seed, sample index)``, so a
resumed run continues the same order without replaying it (the ground of exact resume, see trainer.py)."""

from __future__ import annotations

import numpy as np
import torch


class BlockSampler:
    """Training blocks for a global sample index: a seeded permutation of disjoint blocks per epoch.

    Each epoch shifts the block grid by a seeded offset (when the corpus has room), so the model sees
    different cut points over epochs. Everything is a pure function of ``(seed, epoch)``.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, seed: int) -> None:
        self.tokens, self.block_size, self.seed = tokens, block_size, seed
        usable = len(tokens) - 1  # the last token is only a target
        n = usable // block_size
        self.n_blocks = n - 1 if n >= 2 else n
        self.slack = usable - self.n_blocks * block_size
        self._epoch: int | None = None
        self._perm: np.ndarray | None = None
        self._shift = 0

    def _load_epoch(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = rng.permutation(self.n_blocks)
            self._shift = int(rng.integers(0, min(self.slack, self.block_size) + 1))
            self._epoch = epoch

    def batch(self, first: int, count: int) -> torch.Tensor:
        """Rows ``[count, block_size + 1]`` for sample indices ``first .. first + count - 1``."""
        rows = np.empty((count, self.block_size + 1), dtype=np.int64)
        for r in range(count):
            epoch, pos = divmod(first + r, self.n_blocks)
            self._load_epoch(epoch)
            start = self._shift + int(self._perm[pos]) * self.block_size
            rows[r] = self.tokens[start:start + self.block_size + 1]
        return torch.from_numpy(rows)


def val_blocks(tokens: np.ndarray, block_size: int, limit: int) -> list[tuple[int, int]]:
    """(start, length) of evenly spread validation blocks; one shorter block if the split is small."""
    n = (len(tokens) - 1) // block_size
    if n == 0:
        return [(0, len(tokens) - 1)] if len(tokens) >= 2 else []
    picks = np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64))
    return [(int(i) * block_size, block_size) for i in picks]
