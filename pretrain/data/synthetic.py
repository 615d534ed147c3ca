"""Write small shard sets (the dataprep format, through dataprep.shards' writer) for tests and benchmarks.

`write_shards` takes records that already exist (e.g. read from a FASTA file); `synthetic_corpus` makes random
ncRNA-like records (log-normal lengths around ~120 nt, clusters of 1..8 members) for scale tests.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from dataprep.shards import Manifest, ShardInfo, ShardWriter, blocks_from_arrays, write_manifest


def cluster_members(cluster_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cluster_size, index_in_cluster) per record, from the cluster ids (vectorised)."""
    order = np.argsort(cluster_id, kind="stable")
    sorted_ids = cluster_id[order]
    first = np.r_[True, sorted_ids[1:] != sorted_ids[:-1]]
    starts = np.flatnonzero(first)
    sizes = np.diff(np.r_[starts, len(order)])
    group = np.cumsum(first) - 1
    size = np.empty_like(cluster_id)
    index = np.empty_like(cluster_id)
    size[order] = sizes[group]
    index[order] = np.arange(len(order)) - starts[group]
    return size, index


def write_shards(out: str | Path, seq: np.ndarray, offsets: np.ndarray, ids: list[str], cluster_id: np.ndarray,
                 split: np.ndarray, records_per_shard: int = 2000, block_records: int = 256) -> Manifest:
    """Write `out/<split>/shard-NNNNNN.tar` + `out/manifest.json` for the given records (in this order)."""
    out = Path(out)
    cluster_id = np.asarray(cluster_id, dtype=np.int64)
    size, index = cluster_members(cluster_id)
    infos = []
    for name in sorted(set(split.tolist())):
        rows = np.flatnonzero(split == name)
        for k, a in enumerate(range(0, len(rows), records_per_shard)):
            r = rows[a:a + records_per_shard]
            lengths = offsets[r + 1] - offsets[r]
            sub_off = np.zeros(len(r) + 1, dtype=np.int64)
            np.cumsum(lengths, out=sub_off[1:])
            gather = np.repeat(offsets[r], lengths) + np.arange(sub_off[-1]) - np.repeat(sub_off[:-1], lengths)
            rel = f"{name}/shard-{k:06d}.tar"
            writer = ShardWriter(out / rel)
            for block in blocks_from_arrays(seq[gather], sub_off, [ids[i] for i in r], cluster_id[r], size[r],
                                            index[r], np.zeros(len(r), np.int32), None, block_records):
                writer.write(block)
            nbytes, sha = writer.close()
            infos.append(ShardInfo(rel, name, writer.records, writer.blocks, writer.tokens, nbytes, sha))
    manifest = Manifest(shards=infos, sources=[], params={"writer": "pretrain.data.synthetic"}, tools={},
                        out_dir=str(out))
    write_manifest(out, manifest)
    return manifest


def synthetic_corpus(n: int, seed: int = 0, mean_len: float = 120.0, max_len: int = 4000,
                     valid_fraction: float = 0.0) -> dict:
    """Random records: arrays for `write_shards` (seq, offsets, ids, cluster_id, split)."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(mean_len) - 0.18, 0.6, n), 16, max_len).astype(np.int64)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    seq = np.frombuffer(b"ACGUN", dtype=np.uint8)[rng.choice(5, int(offsets[-1]), p=[.2475, .2475, .2475, .2475, .01])]
    sizes = rng.integers(1, 9, n)  # cluster sizes; consecutive records form a cluster, then the order is shuffled
    cluster_id = np.repeat(np.arange(n), sizes)[:n]
    perm = rng.permutation(n)
    lengths_p = lengths[perm]
    offsets_p = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths_p, out=offsets_p[1:])
    gather = np.repeat(offsets[perm], lengths_p) + np.arange(offsets_p[-1]) - np.repeat(offsets_p[:-1], lengths_p)
    cluster_id = cluster_id[perm]
    in_valid = splitmix_fraction(cluster_id, seed) < valid_fraction
    return {"seq": seq[gather], "offsets": offsets_p, "ids": [f"syn{i:08d}" for i in range(n)],
            "cluster_id": cluster_id, "split": np.where(in_valid, "valid", "train")}


def splitmix_fraction(cluster_id: np.ndarray, seed: int) -> np.ndarray:
    """A fixed pseudo-random number in [0, 1) per cluster (whole clusters go to one split)."""
    from .sampling import hash_combine
    return (hash_combine(seed, cluster_id) >> np.uint64(11)).astype(np.float64) / float(1 << 53)
