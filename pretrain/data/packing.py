"""Greedy packing of consecutive samples into micro-batches of at most `token_budget` tokens.

Samples are never split or reordered: a batch ends where the next sample would not fit. A batch remembers the
stream state after its last sample, so a resumed stream starts exactly with the first sample not yet batched.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from rnalm.batch import IGNORE_INDEX, PackedBatch, ragged_arange
from rnalm.tokenizer import PAD_ID

from .masking import Samples
from .plan import StreamState
from .stream import WindowPosition


@dataclass
class PackedArrays:
    """A packed batch as compact numpy arrays: what a DataLoader worker sends (pickled, no shared memory)."""

    tokens: np.ndarray   # uint8 [T]
    targets: np.ndarray  # int8 [T]
    lengths: np.ndarray  # int64 [B]
    ids: list[str]
    cropped: int         # how many of the sequences are crops

    @classmethod
    def concat(cls, parts: list[Samples]) -> "PackedArrays":
        return cls(np.concatenate([p.tokens for p in parts]), np.concatenate([p.targets for p in parts]),
                   np.concatenate([p.lengths for p in parts]), np.concatenate([p.ids for p in parts]).tolist(),
                   sum(int(p.cropped.sum()) for p in parts))

    def to_batch(self) -> PackedBatch:
        cu = np.zeros(len(self.lengths) + 1, dtype=np.int32)
        np.cumsum(self.lengths, out=cu[1:])
        return PackedBatch(tokens=torch.from_numpy(self.tokens.astype(np.int64)), cu_seqlens=torch.from_numpy(cu),
                           max_seqlen=int(self.lengths.max()), positions=torch.from_numpy(ragged_arange(self.lengths)),
                           targets=torch.from_numpy(self.targets.astype(np.int64)), ids=tuple(self.ids))


class Packer:
    """Cuts a stream of windows into batches; `flush()` ends the current batch early (end of a pass)."""

    def __init__(self, token_budget: int):
        self.budget = token_budget
        self._parts: list[Samples] = []
        self._used = 0
        self._end: tuple[WindowPosition, int] | None = None  # where the last sample taken came from

    def add(self, samples: Samples, position: WindowPosition) -> Iterator[tuple[PackedArrays, StreamState]]:
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

    def flush(self) -> tuple[PackedArrays, StreamState]:
        position, count = self._end
        batch = PackedArrays.concat(self._parts)
        self._parts, self._used, self._end = [], 0, None
        return batch, position.after(count)

    def __bool__(self) -> bool:
        return bool(self._parts)


def pad_to_tokens(batch: PackedBatch, total: int, chunk: int) -> PackedBatch:
    """`batch` plus pad-only sequences of at most `chunk` tokens (no loss: IGNORE_INDEX targets) up to exactly
    `total` tokens, so every micro-batch has one shape (torch.compile with static shapes). Real sequences keep
    their tokens, positions and attention span, hence their results; `ids` still lists the real ones only."""
    missing = total - batch.num_tokens
    if missing < 0:
        raise ValueError(f"batch of {batch.num_tokens} tokens exceeds the padded size {total}")
    if missing == 0:
        return batch
    lengths = np.full(-(-missing // chunk), chunk, dtype=np.int64)
    lengths[-1] = missing - chunk * (len(lengths) - 1)
    cu = batch.cu_seqlens.new_tensor(np.cumsum(lengths)) + batch.cu_seqlens[-1]
    pad = partial(torch.full, (missing,), device=batch.tokens.device, dtype=batch.tokens.dtype)
    targets = None if batch.targets is None else torch.cat([batch.targets, pad(IGNORE_INDEX)])
    positions = torch.from_numpy(ragged_arange(lengths)).to(batch.positions)
    return PackedBatch(tokens=torch.cat([batch.tokens, pad(PAD_ID)]), cu_seqlens=torch.cat([batch.cu_seqlens, cu]),
                       max_seqlen=max(batch.max_seqlen, int(lengths.max())),
                       positions=torch.cat([batch.positions, positions]), targets=targets, ids=batch.ids)
