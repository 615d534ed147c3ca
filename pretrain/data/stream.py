"""One stream of training samples: read its pieces from the shards (WebDataset), sample, shuffle, crop, mask.

A stream reads raw records in windows of `shuffle_buffer` records aligned to the epoch's grid, orders the
window's raw slots by a permutation keyed by (seed, epoch, window start), and crops/masks the records at those
slots that were read and that the epoch's sampling selects, all at once. The position after any delivered
sample is therefore (piece, window start, slots of the shuffled order consumed): see `WindowPosition.after`.
Slots, not records: a shard unreadable when a checkpoint was taken and restored before the resume leaves every
other record of the window where it was in the order (nothing delivered twice).
"""
from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

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
    """Blocks of one shard that overlap records [lo, hi), each with the shard index of its first record. The tar
    is walked header by header, seeking over the data of the blocks before the range (their record counts read
    from the first bytes of each): a stream starting late in a shard reads little of what lies before it."""
    pos = 0
    try:
        # member by member (samples grouped by key would drop a block followed by damage), seekable ("r:")
        with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
            for member in tar:
                where = f"{path}:{member.name}"
                if not member.isfile() or not member.name.endswith(f".{BLOCK_EXT}"):
                    raise ShardError(f"{where}: unexpected tar member (want NNNNNN.{BLOCK_EXT})")
                data = tar.extractfile(member)
                if pos < lo:  # the blocks before the range are counted from their headers, not read
                    n = block_length(data, where)
                    if pos + n <= lo:
                        pos += n
                        continue
                    data.seek(0)
                block = decode_block(data.read(), where)
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
        raise ShardError(f"{path}: corrupt or truncated tar ({type(e).__name__}: {e})") from None
    raise ShardError(f"{path}: ends after {pos} records (cut, or a damaged tar header after them), but the "
                     f"manifest lists at least {hi}")


def slice_block(block: RecordBlock, i: int, j: int) -> RecordBlock:
    lo, hi = block.offsets[i], block.offsets[j]
    return RecordBlock(seq=block.seq[lo:hi], offsets=block.offsets[i:j + 1] - lo, ids=block.ids[i:j],
                       cluster_id=block.cluster_id[i:j], cluster_size=block.cluster_size[i:j],
                       index_in_cluster=block.index_in_cluster[i:j], source=block.source[i:j])  # labels: unused here


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
    skip: int           # slots of this window's shuffled order consumed before this read
    ends: np.ndarray    # per sample of this read: the slots consumed once it is delivered
    rest: tuple         # the stream's pieces after this one
    next_epoch: int
    window: int

    def after(self, count: int) -> StreamState:
        """Stream state once `count` of this read's samples have been delivered."""
        if count < len(self.ends):
            head = [[self.epoch, self.start, self.piece_stop, int(self.ends[count - 1]) if count else self.skip]]
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
            parts, slots = [], []
            while True:
                if pending is None and (pending := next(chunks, None)) is None:
                    break
                raw, block = pending
                if raw >= end:
                    break
                take = min(len(block), end - raw)
                parts.append(slice_block(block, 0, take))
                slots.append(np.arange(raw - start, raw - start + take))
                pending = (raw + take, slice_block(block, take, len(block))) if take < len(block) else None
            if parts:
                samples, ends = self._window_samples(concat_blocks(parts), np.concatenate(slots), epoch, start,
                                                     end - start, skip)
                if len(samples):
                    yield samples, WindowPosition(epoch, start, stop, skip, ends, rest, next_epoch, size)
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

    def _window_samples(self, block: RecordBlock, slots: np.ndarray, epoch: int, start: int, size: int,
                        skip: int) -> tuple[Samples, np.ndarray]:
        """The samples of the records read (at `slots` of the window) in the window's shuffled order, from
        order position `skip` on, and per sample the order positions consumed once it is delivered."""
        cfg = self.cfg
        order = np.empty(size, np.int64)
        order[window_permutation(cfg.seed, epoch, start, size)] = np.arange(size)
        order = order[slots]
        idx = np.flatnonzero(selected(block, cfg.sampling, cfg.seed, epoch) & (order >= skip))
        idx = idx[np.argsort(order[idx])]
        keys = record_keys(cfg.seed, epoch, block.cluster_id[idx], block.index_in_cluster[idx])
        starts = block.offsets[idx]
        ids = np.asarray(block.ids, dtype=object)[idx]
        samples = crop_and_mask(block.seq, starts, block.offsets[idx + 1] - starts, keys, ids, cfg.max_len,
                                cfg.mask_prob)
        return samples, order[idx] + 1
