"""Writing shard jobs (in parallel processes): gather records from the store, cut blocks, compress, tar."""
from __future__ import annotations

import multiprocessing as mp
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .shards import RecordBlock, ShardInfo, ShardWriter
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


def write_job(ctx: WriteContext, job: ShardJob) -> ShardInfo:
    store, cols = _open(ctx)
    writer = ShardWriter(Path(ctx.out_dir) / job.path, level=ctx.zstd_level)
    try:
        for a in range(0, len(job.records), ctx.block_records):
            pos = job.records[a: a + ctx.block_records]
            idx = np.asarray(cols["keep"][pos])
            seq, off = store.gather_seqs(idx)
            writer.write(RecordBlock(seq=seq, offsets=off, ids=store.ids_of(idx),
                                     cluster_id=np.asarray(cols["cluster_id"][pos]),
                                     cluster_size=np.asarray(cols["cluster_size"][pos]),
                                     index_in_cluster=np.asarray(cols["index_in_cluster"][pos]),
                                     source=np.asarray(store.source[idx]), labels=store.labels_of(idx)))
        nbytes, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    return ShardInfo(path=job.path, split=job.split, records=writer.records, blocks=writer.blocks,
                     tokens=writer.tokens, bytes=nbytes, sha256=sha)


def _write_star(args: tuple[WriteContext, ShardJob]) -> ShardInfo:
    return write_job(*args)


def write_jobs(ctx: WriteContext, jobs: list[ShardJob], workers: int) -> list[ShardInfo]:
    """Write every job, with `workers` processes when there is more than one job."""
    if workers <= 1 or len(jobs) <= 1:
        return [write_job(ctx, j) for j in jobs]
    with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
        return list(pool.imap(_write_star, [(ctx, j) for j in jobs]))
