"""PretrainLoader: one rank's stream of packed, masked micro-batches, with a small state for exact resume.

Rank r runs K = max(1, num_workers) logical streams, global indices r*K .. r*K+K-1 of world_size*K. The
DataLoader hands out worker batches round-robin; each batch carries its stream's state, and the loader
remembers which logical stream comes next. On resume, physical worker p serves logical stream
(p + next) % K, so the batch order continues exactly as it would have.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from dataprep.shards import ShardError, read_manifest
from rnalm.batch import IGNORE_INDEX, PackedBatch

from .config import DataConfig
from .packing import PackedArrays, Packer
from .plan import ShardTable, StreamState, redistribute
from .stream import RecordStream

STATE_FORMAT = 2  # 2: a piece's skip counts slots of its window's shuffled order (1: records delivered)
# Loader settings that fix which records a state refers to; a resume with other values would be wrong.
_STATE_KEYS = ("split", "sampling", "seed", "shuffle_buffer", "infinite", "dataset")
# Workers are spawned (a fresh interpreter each), not forked from the caller: a fork of a process that runs
# threads (the trainer's metrics server, gloo, DataLoader feeder threads) can leave the child deadlocked for good
# (CPython gh-112275, Python <= 3.11: a rank's worker hung that way in CI). The forkserver would avoid it too,
# but it listens on an AF_UNIX socket under TMPDIR, and a long per-job TMPDIR exceeds the 108-byte path limit.
_WORKERS = multiprocessing.get_context("spawn")


class _StreamsDataset(IterableDataset):
    """What one DataLoader worker (or the calling process) iterates: one logical stream, packed."""

    def __init__(self, cfg: DataConfig, table: ShardTable, rank: int, world_size: int,
                 states: list[StreamState], first: int):
        self.cfg, self.table, self.rank, self.world_size = cfg, table, rank, world_size
        self.states, self.first = states, first

    def __iter__(self) -> Iterator[tuple[PackedArrays, dict]]:
        info = get_worker_info()
        k = len(self.states)
        logical = ((info.id if info is not None else 0) + self.first) % k
        stream = RecordStream(self.cfg, self.table, Path(self.cfg.shards), self.world_size * k,
                              self.rank * k + logical, self.states[logical])
        packer, reported = Packer(self.cfg.token_budget), 0

        def meta(state: StreamState) -> dict:
            nonlocal reported
            corrupt = list(stream.corrupt.items())[reported:]
            reported = len(stream.corrupt)
            return {"worker": logical, "state": state.to_dict(), "corrupt": corrupt}

        try:
            for samples, position in stream.windows():
                for batch, state in packer.add(samples, position):
                    yield batch, meta(state)
        except ShardError as e:  # handed over as data: a DataLoader re-raises a worker's error with its traceback
            yield None, {"error": str(e)}
            return
        if packer:
            batch, state = packer.flush()
            yield batch, meta(state)
        if len(stream.corrupt) > reported:  # damage after the stream's last batch: no batch carries it
            yield None, {"corrupt": list(stream.corrupt.items())[reported:]}


class PretrainLoader:
    """Iterate to get `rnalm.batch.PackedBatch`es (targets + ids); `state_dict()` is the position after the
    last batch yielded; `load_state_dict(list of every rank's state)` before iterating resumes from it."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside 0..world_size-1 (world_size {world_size})")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        manifest = read_manifest(cfg.shards)
        shards = manifest.split_shards(cfg.split)
        if not shards or sum(s.records for s in shards) == 0:
            splits = sorted({s.split for s in manifest.shards})
            raise ValueError(f"{cfg.shards}: no records in split {cfg.split!r} (splits present: {splits})")
        self.table = ShardTable([s.path for s in shards], [s.records for s in shards], cfg.seed, cfg.max_records)
        self.streams_per_rank = max(1, cfg.num_workers)
        self._pin = cfg.pin_memory and torch.cuda.is_available()  # the presets ask for it; pinning needs a GPU
        if cfg.infinite and self.table.total < world_size * self.streams_per_rank:
            raise ValueError(f"{cfg.shards} split {cfg.split!r} has {self.table.total} records, fewer than the "
                             f"{world_size * self.streams_per_rank} streams (world_size x workers) reading it")
        listing = json.dumps([[s.path, s.records, s.sha256] for s in shards]).encode()
        self._dataset = hashlib.sha256(listing).hexdigest()[:16]
        self._streams = [StreamState() for _ in range(self.streams_per_rank)]
        self._next = 0
        self.stats = {"batches": 0, "samples": 0, "tokens": 0, "masked_tokens": 0, "cropped": 0, "epoch": 0,
                      "corrupt_shards_skipped": 0, "corrupt_shards": {}}

    # ------------------------------------------------------------------------------------------ iterate
    def __iter__(self) -> Iterator[PackedBatch]:
        dataset = _StreamsDataset(self.cfg, self.table, self.rank, self.world_size,
                                  [StreamState.from_dict(s.to_dict()) for s in self._streams], self._next)
        if self.cfg.num_workers == 0:
            source = iter(dataset)
        else:
            source = iter(DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers,
                                     prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False,
                                     multiprocessing_context=_WORKERS))
        for arrays, meta in source:
            if "error" in meta:
                raise ShardError(meta["error"])
            self._note_corrupt(meta["corrupt"])
            if arrays is None:
                continue
            batch = arrays.to_batch()
            if self._pin:
                batch = batch.pin_memory()
            state = StreamState.from_dict(meta["state"])
            self._streams[meta["worker"]] = state
            self._next = (meta["worker"] + 1) % self.streams_per_rank
            self._count(batch, arrays.cropped, state)
            yield batch
        if not self.cfg.infinite:  # a finished pass: the next iteration is the same pass again
            self._streams = [StreamState() for _ in range(self.streams_per_rank)]
            self._next = 0

    def _count(self, batch: PackedBatch, cropped: int, state: StreamState) -> None:
        s = self.stats
        s["batches"] += 1
        s["samples"] += batch.num_sequences
        s["cropped"] += cropped
        s["tokens"] += batch.num_tokens
        s["masked_tokens"] += int((batch.targets != IGNORE_INDEX).sum())
        s["epoch"] = state.epoch

    def _note_corrupt(self, corrupt: list[tuple[str, str]]) -> None:
        s = self.stats
        s["corrupt_shards"].update(corrupt)
        s["corrupt_shards_skipped"] = len(s["corrupt_shards"])

    # ------------------------------------------------------------------------------------------- state
    def _identity(self) -> dict:
        cfg = self.cfg
        return {"split": cfg.split, "sampling": cfg.sampling, "seed": cfg.seed, "shuffle_buffer": cfg.shuffle_buffer,
                "infinite": cfg.infinite, "dataset": self._dataset}

    def state_dict(self) -> dict:
        return {"format": STATE_FORMAT, "rank": self.rank, "world_size": self.world_size,
                "streams_per_rank": self.streams_per_rank, **self._identity(), "next_worker": self._next,
                "streams": [s.to_dict() for s in self._streams]}

    def load_state_dict(self, states: list[dict]) -> None:
        """Resume from every rank's `state_dict()` (all-gathered, in any order) of the run being resumed."""
        if not isinstance(states, (list, tuple)) or not states:
            raise TypeError("load_state_dict wants the list of every rank's state_dict()")
        by_rank = {int(s["rank"]): s for s in states}
        old_world = int(states[0]["world_size"])
        if sorted(by_rank) != list(range(old_world)):
            raise ValueError(f"loader states cover ranks {sorted(by_rank)}, but the saved world_size is {old_world}")
        mine = self._identity()
        for s in states:
            if s.get("format") != STATE_FORMAT:
                raise ValueError(f"loader state format {s.get('format')} (want {STATE_FORMAT}): a checkpoint of an "
                                 "earlier version, which counted positions in shuffle windows otherwise; resume it "
                                 "with that version, or start anew")
            diff = {("data.shards' shard set (its digest)" if k == "dataset" else f"data.{k}"): (s.get(k), mine[k])
                    for k in _STATE_KEYS if s.get(k) != mine[k]}
            if diff:
                raise ValueError(f"loader state of rank {s['rank']} does not match this loader's settings "
                                 f"(saved, now): {diff}")
        old_k = int(states[0]["streams_per_rank"])
        if old_world == self.world_size and old_k == self.streams_per_rank:
            own = by_rank[self.rank]
            self._streams = [StreamState.from_dict(d) for d in own["streams"]]
            self._next = int(own["next_worker"])
            return
        old = [StreamState.from_dict(d) for r in range(old_world) for d in by_rank[r]["streams"]]
        new = redistribute(old, self.table, self.world_size * self.streams_per_rank, self.cfg.shuffle_buffer)
        k = self.streams_per_rank
        self._streams = new[self.rank * k:(self.rank + 1) * k]
        self._next = 0
