"""Which records each stream reads: the epoch's shard order, pieces of it, and their redistribution on resume.

Each epoch concatenates the split's shards in a seeded order; a *raw index* is a record's position in that
concatenation (before cluster sampling). A stream's work is a list of pieces `[epoch, start, stop, skip]`: the raw
range [start, stop), read in shuffle windows aligned to multiples of the window size, where the first `skip`
slots of the first window's shuffled order are consumed. An uninterrupted epoch gives stream s of S the piece
`[e, s*N//S, (s+1)*N//S, 0]`. A stream's whole resume state is its remaining pieces plus the epoch it starts
next (`StreamState`), so a different number of streams can take over exactly the records not yet delivered.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from .sampling import shard_order

Piece = list[int]  # [epoch, start, stop, skip]


@dataclass
class StreamState:
    pieces: list[Piece] = field(default_factory=list)  # remaining work; the first piece may be partly read
    next_epoch: int = 0  # once the pieces are done, the stream's default piece of this epoch comes next

    def to_dict(self) -> dict:
        return {"pieces": [[int(x) for x in p] for p in self.pieces], "next_epoch": int(self.next_epoch)}

    @classmethod
    def from_dict(cls, d: dict) -> "StreamState":
        return cls([list(map(int, p)) for p in d["pieces"]], int(d["next_epoch"]))

    @property
    def epoch(self) -> int:
        """The epoch this stream is reading (or starts next)."""
        return self.pieces[0][0] if self.pieces else self.next_epoch


class ShardTable:
    """The split's shards (paths, record counts) and the seeded per-epoch order they are read in; `limit` > 0
    keeps the first `limit` raw indices of each epoch (validation's cap, the same records at any stream count)."""

    def __init__(self, paths: list[str], records: list[int], seed: int, limit: int = 0):
        self.paths, self.seed = paths, seed
        self.records = np.asarray(records, dtype=np.int64)
        self.total = int(self.records.sum())
        if limit:
            self.total = min(self.total, limit)
        self._cum: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch not in self._cum:
            order = shard_order(self.seed, epoch, len(self.paths))
            cum = np.zeros(len(order) + 1, dtype=np.int64)
            np.cumsum(self.records[order], out=cum[1:])
            self._cum = {epoch: (order, cum)}  # one epoch at a time is all a stream needs
        return self._cum[epoch]

    def locate(self, epoch: int, start: int, stop: int) -> list[tuple[int, int, int, int]]:
        """(shard index, first record, end record, raw index of the first record) covering [start, stop)."""
        order, cum = self._epoch_order(epoch)
        out = []
        i = int(np.searchsorted(cum, start, side="right")) - 1
        while i < len(order) and cum[i] < stop:
            lo, hi = max(start, cum[i]), min(stop, cum[i + 1])
            if hi > lo:
                out.append((int(order[i]), int(lo - cum[i]), int(hi - cum[i]), int(lo)))
            i += 1
        return out

    def default_piece(self, epoch: int, num_streams: int, stream: int) -> Piece:
        return [epoch, stream * self.total // num_streams, (stream + 1) * self.total // num_streams, 0]


def window_end(start: int, window: int) -> int:
    """End of the shuffle window that contains raw index `start` (windows are aligned to the grid)."""
    return (start // window + 1) * window


def split_pieces(pieces: list[Piece], n: int, window: int) -> list[list[Piece]]:
    """Cut an ordered list of pieces into n shares of near-equal raw size, keeping order.

    A piece whose first window is partly consumed (skip > 0) is never cut inside that window, since the
    window's shuffle depends on its extent.
    """
    total = sum(p[2] - p[1] for p in pieces)
    shares: list[list[Piece]] = [[] for _ in range(n)]
    done, k = 0, 0
    for epoch, a, b, skip in pieces:
        while a < b:
            while k < n - 1 and done >= (k + 1) * total // n:
                k += 1
            target = (k + 1) * total // n
            cut = min(b, a + target - done)
            if skip:
                cut = max(cut, min(b, window_end(a, window)))
            shares[k].append([epoch, a, cut, skip])
            done += cut - a
            a, skip = cut, 0
    return shares


def redistribute(old: list[StreamState], table: ShardTable, new_streams: int, window: int) -> list[StreamState]:
    """Hand the not-yet-delivered records of `old` streams (in global stream order) to `new_streams` streams.

    All streams are brought to the same next epoch E = max(next_epoch); for every epoch before E, the
    remaining pieces (partly read ones, plus the untouched default pieces of streams that had not reached that
    epoch) are split evenly. Nothing delivered is repeated and nothing undelivered is lost.
    """
    last = max(st.next_epoch for st in old)
    by_epoch: dict[int, list[Piece]] = defaultdict(list)
    for s, st in enumerate(old):
        for p in st.pieces:
            by_epoch[p[0]].append(list(p))
        for e in range(st.next_epoch, last):
            by_epoch[e].append(table.default_piece(e, len(old), s))
    new = [StreamState([], last) for _ in range(new_streams)]
    for epoch in sorted(by_epoch):
        pieces = sorted(by_epoch[epoch], key=lambda p: p[1])  # split_pieces skips empty ones
        for state, share in zip(new, split_pieces(pieces, new_streams, window)):
            state.pieces.extend(share)
    return new
