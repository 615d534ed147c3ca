"""Writing shards: blocks are read from the store and compressed by a pool of threads.

The store is either the normalised one (one slice per record of a block: the records are in shuffled order) or,
when MMseqs2 left the time to lay it out, the kept records in shuffled order (`write_permuted`: a block is a few
slices); the shards are the same bytes. Reading holds the GIL; zstd compression releases it, so `threads`
compressors overlap with reading the next blocks. Threads rather than processes: no store is
mapped twice and no compressed block crosses a pipe (processes cost 1.7x the CPU for a slower stage, see
BENCHMARKS.md); more cores are used through more ranks (`--mpi`).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import offsets_from_lengths
from .shards import ZSTD_LEVEL, ShardInfo, ShardWriter, compress_encoded, compressor, encode_columns
from .split import ShardJob
from .store import Store

CLUSTER_FIELDS = ("cluster_id", "cluster_size", "index_in_cluster")


@dataclass(frozen=True)
class WriteContext:
    out_dir: str
    store_dir: str
    cluster_dir: str  # the cluster columns per kept record, and keep.npy (store index per kept record)
    block_records: int = 4096
    zstd_level: int = ZSTD_LEVEL
    shuffled: bool = False  # store_dir holds the kept records in shuffled order (`store.write_permuted`)


class _Blocks:
    """Uncompressed blocks of kept-list positions: store bytes go straight into the block (no per-record
    strings), identical to `encode_block` of the RecordBlock."""

    def __init__(self, ctx: WriteContext):
        self.store = Store(ctx.store_dir)
        self.cols = {name: np.load(Path(ctx.cluster_dir) / f"{name}.npy", mmap_mode="r") for name in CLUSTER_FIELDS}
        self.keep = None if ctx.shuffled else np.load(Path(ctx.cluster_dir) / "keep.npy", mmap_mode="r")

    def encode(self, pos: np.ndarray, shuffled: np.ndarray) -> tuple[bytes, int, int]:
        """The block of kept-list positions `pos` (at `shuffled` in the shuffled order)."""
        store, cols = self.store, self.cols
        idx = shuffled if self.keep is None else np.asarray(self.keep[pos])
        offsets = offsets_from_lengths(store.seq_len[idx])
        raw = encode_columns(store.seq_bytes(idx), offsets, store.id_bytes(idx), store.label_bytes(idx),
                             cols["cluster_id"][pos], cols["cluster_size"][pos], cols["index_in_cluster"][pos],
                             store.source[idx])
        return raw, len(pos), int(offsets[-1])


def _compressed(ctx: WriteContext, jobs: list[ShardJob], threads: int) -> Iterator[tuple[bytes, int, int]]:
    """(zstd block, records, tokens) of every job's blocks, in order; at most 2 x threads blocks in flight."""
    blocks, local = _Blocks(ctx), threading.local()

    def compress(raw: bytes) -> bytes:
        if not hasattr(local, "cctx"):  # a ZstdCompressor must not be shared between threads
            local.cctx = compressor(ctx.zstd_level)
        return compress_encoded(local.cctx, raw)

    with ThreadPoolExecutor(max(1, threads), thread_name_prefix="zstd") as pool:
        pending: deque = deque()
        for job in jobs:
            for a in range(0, len(job.records), ctx.block_records):
                b = a + ctx.block_records
                raw, records, tokens = blocks.encode(job.records[a: b], job.shuffled[a: b])
                pending.append((pool.submit(compress, raw), records, tokens))
                while len(pending) > 2 * threads:
                    future, records, tokens = pending.popleft()
                    yield future.result(), records, tokens
        while pending:
            future, records, tokens = pending.popleft()
            yield future.result(), records, tokens


def write_jobs(ctx: WriteContext, jobs: list[ShardJob], threads: int,
               progress: Callable[[ShardInfo], None] = lambda info: None) -> list[ShardInfo]:
    """Write every job's shard in order, blocks compressed by `threads` threads."""
    payloads = _compressed(ctx, jobs, threads)
    infos = []
    for job in jobs:
        infos.append(_write_one(ctx, job, payloads))
        progress(infos[-1])
    return infos


def _write_one(ctx: WriteContext, job: ShardJob, payloads: Iterator) -> ShardInfo:
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
