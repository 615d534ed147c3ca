"""Greedy packing of consecutive samples into micro-batches of at most `token_budget` tokens.

Samples are never split or reordered: a batch ends where the next sample would not fit. A batch remembers the
stream state after its last sample, so a resumed stream starts exactly with the first sample not yet batched.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from rnalm.batch import PackedBatch, positions_from_cu_seqlens

from .masking import Samples
from .plan import StreamState
from .stream import WindowPosition


def to_packed_batch(parts: list[Samples]) -> PackedBatch:
    tokens = np.concatenate([p.tokens for p in parts])
    targets = np.concatenate([p.targets for p in parts])
    lengths = np.concatenate([p.lengths for p in parts])
    cu = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=cu[1:])
    cu_t = torch.from_numpy(cu)
    return PackedBatch(tokens=torch.from_numpy(tokens.astype(np.int64)), cu_seqlens=cu_t,
                       max_seqlen=int(lengths.max()), positions=positions_from_cu_seqlens(cu_t),
                       targets=torch.from_numpy(targets.astype(np.int64)),
                       ids=tuple(np.concatenate([p.ids for p in parts]).tolist()))


class Packer:
    def __init__(self, token_budget: int):
        self.budget = token_budget
        self._parts: list[Samples] = []
        self._used = 0
        self._end: tuple[WindowPosition, int] | None = None  # where the last sample taken came from

    def add(self, samples: Samples, position: WindowPosition) -> Iterator[tuple[PackedBatch, StreamState]]:
        """Take a window's samples; yield every batch that is full (the next sample would not fit)."""
        offsets, n, i = samples.offsets, len(samples), 0
        while i < n:
            # Largest j such that samples i..j-1 fit into the room left.
            j = int(np.searchsorted(offsets, offsets[i] + self.budget - self._used, side="right")) - 1
            if j > i:
                self._parts.append(samples.slice(i, j))
                self._used += int(offsets[j] - offsets[i])
                self._end = (position, j)
                i = j
            if i < n:
                if not self._parts:
                    raise ValueError(f"sample of {samples.lengths[i]} tokens exceeds token_budget {self.budget}")
                yield self.flush()

    def flush(self) -> tuple[PackedBatch, StreamState]:
        position, count = self._end
        batch = to_packed_batch(self._parts)
        self._parts, self._used, self._end = [], 0, None
        return batch, position.after(count)

    def __bool__(self) -> bool:
        return bool(self._parts)
