"""Writing shards: worker processes gather and compress blocks from the store, the parent appends them to tars."""
from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .arrays import offsets_from_lengths
from .shards import ShardInfo, ShardWriter, compressor, encode_columns
from .split import ShardJob
from .store import Store

CLUSTER_FIELDS = ("keep", "cluster_id", "cluster_size", "index_in_cluster")


@dataclass(frozen=True)
class WriteContext:
    out_dir: str
    store_dir: str
    cluster_dir: str  # keep.npy (store index per kept record) + the three cluster columns
    block_records: int = 4096
    zstd_level: int = 3


@lru_cache(maxsize=2)
def _open(ctx: WriteContext) -> tuple[Store, dict[str, np.ndarray]]:
    cols = {name: np.load(Path(ctx.cluster_dir) / f"{name}.npy", mmap_mode="r") for name in CLUSTER_FIELDS}
    return Store(ctx.store_dir), cols


def _payload(args: tuple[WriteContext, np.ndarray]) -> tuple[bytes, int, int]:
    """The compressed block of the records at kept-list positions `pos` (in that order): store bytes are
    passed straight into the block (no per-record strings), identical to `compress_block` of the RecordBlock."""
    ctx, pos = args
    store, cols = _open(ctx)
    idx = np.asarray(cols["keep"][pos])
    offsets = offsets_from_lengths(store.seq_len[idx])
    raw = encode_columns(store.seq_bytes(idx), offsets, store.id_bytes(idx), store.label_bytes(idx),
                         cols["cluster_id"][pos], cols["cluster_size"][pos], cols["index_in_cluster"][pos],
                         store.source[idx])
    return compressor(ctx.zstd_level).compress(raw), len(pos), int(offsets[-1])


def write_jobs(ctx: WriteContext, jobs: list[ShardJob], workers: int,
               progress: Callable[[ShardInfo], None] = lambda info: None) -> list[ShardInfo]:
    """Write every job's shard in order; blocks are gathered and compressed by `workers` processes."""
    pieces = [(ctx, j.records[a: a + ctx.block_records]) for j in jobs
              for a in range(0, len(j.records), ctx.block_records)]
    pool = mp.get_context("fork").Pool(workers) if workers > 1 and len(pieces) > 1 else None
    try:
        payloads = pool.imap(_payload, pieces, chunksize=2) if pool else map(_payload, pieces)
        infos = []
        for job in jobs:
            infos.append(_write_one(ctx, job, payloads))
            progress(infos[-1])
        return infos
    finally:
        if pool:
            pool.terminate()


def _write_one(ctx: WriteContext, job: ShardJob, payloads) -> ShardInfo:
    writer = ShardWriter(Path(ctx.out_dir) / job.path, level=ctx.zstd_level)
    try:
        for _ in range(-(-len(job.records) // ctx.block_records)):
            writer.write_payload(*next(payloads))
        nbytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return ShardInfo(path=job.path, split=job.split, records=writer.records, blocks=writer.blocks,
                     tokens=writer.tokens, bytes=nbytes, sha256=sha)
