"""One stream of training samples: read its pieces from the shards (WebDataset), sample, shuffle, crop, mask.

A stream reads raw records in windows of `shuffle_buffer` records aligned to the epoch's grid, keeps the ones
the epoch's sampling selects, permutes them with a permutation keyed by (seed, epoch, window start) and
crops/masks them all at once. The position after any delivered sample is therefore (piece, window start,
records delivered from the window): see `WindowPosition.after`.
"""
from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from webdataset.tariterators import tar_file_iterator

from dataprep.shards import BLOCK_EXT, RecordBlock, ShardError, block_length, decode_block

from .config import DataConfig
from .masking import Samples, crop_and_mask
from .plan import Piece, ShardTable, StreamState, window_end
from .sampling import record_keys, selected, window_permutation

log = logging.getLogger(__name__)

# Passes in a row that read no record before a stream gives up on skipped damage. Each epoch maps a stream to
# other shards, so one empty pass (its part of an epoch inside one missing shard) is no reason to stop training.
STARVED_PASSES = 16
# Reads of a shard that fail with an I/O error, and the wait before the first retry (doubled at each next one).
READ_ATTEMPTS = 4
RETRY_DELAY_S = 1.0


class ShardReadError(ShardError):
    """The file system failed a read (EIO, ESTALE, ...): often transient on network file systems."""


def read_records(path: Path, lo: int, hi: int) -> Iterator[tuple[int, RecordBlock]]:
    """Records [lo, hi) of one shard, a block's part at a time, each with the shard index of its first record.
    A read error is retried from the first record not yet given, READ_ATTEMPTS times in all."""
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            for pos, block in read_shard(path, lo, hi):
                a, b = max(lo, pos) - pos, min(hi, pos + len(block)) - pos
                yield pos + a, slice_block(block, a, b)
                lo = pos + b
            return
        except GeneratorExit:  # as in read_shard: at interpreter exit ShardReadError may be gone
            raise
        except ShardReadError as e:
            if attempt == READ_ATTEMPTS:
                raise ShardReadError(f"{e} (tried {READ_ATTEMPTS} times)") from None
            delay = RETRY_DELAY_S * 2 ** (attempt - 1)
            log.warning("%s; retrying in %g s", e, delay)
            time.sleep(delay)


def read_shard(path: Path, lo: int, hi: int) -> Iterator[tuple[int, RecordBlock]]:
    """Blocks of one shard that overlap records [lo, hi), each with the shard index of its first record."""
    pos = 0
    try:
        with open(path, "rb") as f:  # member by member: webdataset's samples would drop a block followed by damage
            for member in tar_file_iterator(f):
                where = f"{path}:{member['fname']}"
                if not member["fname"].endswith(f".{BLOCK_EXT}"):
                    raise ShardError(f"{where}: unexpected tar member (want NNNNNN.{BLOCK_EXT})")
                if pos < lo:  # the blocks before the range are counted from their headers, not decoded
                    n = block_length(member["data"], where)
                    if pos + n <= lo:
                        pos += n
                        continue
                block = decode_block(member["data"], where)
                yield pos, block
                pos += len(block)
                if pos >= hi:
                    return
    except GeneratorExit:  # closed while suspended, e.g. at interpreter exit, when tarfile.TarError may be gone
        raise
    except FileNotFoundError:
        raise ShardError(f"{path}: shard file missing") from None
    except OSError as e:
        raise ShardReadError(f"{path}: read error after {pos} records ({type(e).__name__}: "
                             f"{e.strerror or e})") from None
    except (tarfile.TarError, EOFError, ValueError) as e:
        # webdataset appends " @ <the file object>" to the reason: the path is said once already
        reason = getattr(e, "strerror", None) or (str(e.args[0]).split(" @ <")[0] if e.args else "")
        raise ShardError(f"{path}: corrupt or truncated tar ({type(e).__name__}: {reason})") from None
    raise ShardError(f"{path}: ends after {pos} records (cut, or a damaged tar header after them), but the "
                     f"manifest lists at least {hi}")


def slice_block(block: RecordBlock, i: int, j: int) -> RecordBlock:
    lo, hi = block.offsets[i], block.offsets[j]
    return RecordBlock(seq=block.seq[lo:hi], offsets=block.offsets[i:j + 1] - lo, ids=block.ids[i:j],
                       cluster_id=block.cluster_id[i:j], cluster_size=block.cluster_size[i:j],
                       index_in_cluster=block.index_in_cluster[i:j], source=block.source[i:j],
                       labels=None if block.labels is None else block.labels[i:j])


def concat_blocks(blocks: list[RecordBlock]) -> RecordBlock:
    if len(blocks) == 1:
        return blocks[0]
    bases = np.cumsum([0] + [int(b.offsets[-1]) for b in blocks[:-1]])
    offsets = np.concatenate([np.zeros(1, np.int64)] + [b.offsets[1:] + base for b, base in zip(blocks, bases)])
    return RecordBlock(seq=np.concatenate([b.seq for b in blocks]), offsets=offsets,
                       ids=[i for b in blocks for i in b.ids],
                       cluster_id=np.concatenate([b.cluster_id for b in blocks]),
                       cluster_size=np.concatenate([b.cluster_size for b in blocks]),
                       index_in_cluster=np.concatenate([b.index_in_cluster for b in blocks]),
                       source=np.concatenate([b.source for b in blocks]), labels=None)


@dataclass(frozen=True)
class WindowPosition:
    """Where a window's samples come from, to express the stream state after any of them."""

    epoch: int
    start: int          # raw index where the window starts
    piece_stop: int
    skip: int           # records of this window delivered before this read
    kept: int           # records the window delivers in total (skip + its samples)
    rest: tuple         # the stream's pieces after this one
    next_epoch: int
    window: int

    def after(self, count: int) -> StreamState:
        """Stream state once `count` of this read's samples have been delivered."""
        done = self.skip + count
        if done < self.kept:
            head = [[self.epoch, self.start, self.piece_stop, done]]
        else:
            nxt = min(self.piece_stop, window_end(self.start, self.window))
            head = [[self.epoch, nxt, self.piece_stop, 0]] if nxt < self.piece_stop else []
        return StreamState(head + [list(p) for p in self.rest], self.next_epoch)


class RecordStream:
    """The samples of stream `index` of `num_streams`, from `state` on, as (Samples, WindowPosition) per window."""

    def __init__(self, cfg: DataConfig, table: ShardTable, root: Path, num_streams: int, index: int,
                 state: StreamState):
        self.cfg, self.table, self.root = cfg, table, Path(root)
        self.num_streams, self.index = num_streams, index
        self.state = StreamState([list(p) for p in state.pieces], state.next_epoch)
        self.corrupt: dict[str, str] = {}  # shard path -> reason
        self.records_read = 0

    def windows(self) -> Iterator[tuple[Samples, WindowPosition]]:
        state = self.state
        pass_start = None  # records_read when the current whole epoch pass began
        empty_passes = 0
        while True:
            if not state.pieces:
                empty_passes = empty_passes + 1 if pass_start == self.records_read else 0
                if empty_passes >= STARVED_PASSES and self.corrupt:  # only an endless loader gets there
                    raise self._starved(empty_passes)
                if not self.cfg.infinite and state.next_epoch >= 1:
                    return  # validation: one pass over epoch 0
                state.pieces = [self.table.default_piece(state.next_epoch, self.num_streams, self.index)]
                state.next_epoch += 1
                pass_start = self.records_read
            piece, rest = state.pieces[0], tuple(state.pieces[1:])
            if piece[2] > piece[1]:
                yield from self._piece_windows(piece, rest, state.next_epoch)
            state.pieces = list(rest)

    def _starved(self, passes: int) -> ShardError:
        """Whole passes in a row read nothing: this stream's records lie behind damage epoch after epoch, so
        skipping would spin for ever (and stall every other rank at its next collective)."""
        shards = "; ".join(self.corrupt.values())
        return ShardError(f"stream {self.index} of {self.num_streams} read no record in {passes} whole pass(es) in a "
                         f"row over its part of split {self.cfg.split!r}: all of it lies in unreadable shards "
                         f"({shards})")

    def _piece_windows(self, piece: Piece, rest: tuple, next_epoch: int) -> Iterator[tuple[Samples, WindowPosition]]:
        epoch, start, stop, skip = piece
        size = self.cfg.shuffle_buffer
        chunks = self._chunks(epoch, start, stop)
        pending: tuple[int, RecordBlock] | None = None
        while start < stop:
            end = min(stop, window_end(start, size))
            parts = []
            while True:
                if pending is None and (pending := next(chunks, None)) is None:
                    break
                raw, block = pending
                if raw >= end:
                    break
                take = min(len(block), end - raw)
                parts.append(slice_block(block, 0, take))
                pending = (raw + take, slice_block(block, take, len(block))) if take < len(block) else None
            if parts:
                samples, kept = self._window_samples(concat_blocks(parts), epoch, start, skip)
                if len(samples):
                    yield samples, WindowPosition(epoch, start, stop, skip, kept, rest, next_epoch, size)
            start, skip = end, 0

    def _chunks(self, epoch: int, start: int, stop: int) -> Iterator[tuple[int, RecordBlock]]:
        """(raw index, records) covering [start, stop) in order; a corrupt shard's rest is skipped or fatal."""
        for shard, lo, hi, raw in self.table.locate(epoch, start, stop):
            path = self.root / self.table.paths[shard]
            try:
                for first, records in read_records(path, lo, hi):
                    self.records_read += len(records)
                    yield raw + first - lo, records
            except ShardError as e:
                if self.cfg.on_corrupt == "fail":
                    raise
                if str(path) not in self.corrupt:
                    log.warning("skipping the rest of corrupt shard %s", e)
                self.corrupt[str(path)] = str(e)

    def _window_samples(self, block: RecordBlock, epoch: int, start: int, skip: int) -> tuple[Samples, int]:
        cfg = self.cfg
        idx = np.flatnonzero(selected(block, cfg.sampling, cfg.seed, epoch))
        idx = idx[window_permutation(cfg.seed, epoch, start, len(idx))][skip:]
        keys = record_keys(cfg.seed, epoch, block.cluster_id[idx], block.index_in_cluster[idx])
        starts = block.offsets[idx]
        ids = np.asarray(block.ids, dtype=object)[idx]
        samples = crop_and_mask(block.seq, starts, block.offsets[idx + 1] - starts, keys, ids, cfg.max_len,
                                cfg.mask_prob)
        return samples, skip + len(idx)
