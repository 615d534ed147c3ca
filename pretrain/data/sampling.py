"""Counter-based hashing (splitmix64, vectorised over numpy arrays) and the per-epoch record selection.

Every random choice of the loader (which cluster member an epoch uses, crops, masks, shuffle windows) is a
hash of (seed, epoch, record or position), never the state of a running generator. That is what makes the
loader's resume state small: a position, not a generator.
"""
from __future__ import annotations

import numpy as np

from dataprep.shards import RecordBlock

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
# Distinct salts so that the cluster pick, record keys and shuffle windows never share a hash stream.
SALT_PICK, SALT_RECORD, SALT_WINDOW, SALT_SHARDS = 0x5049434B, 0x5245434F, 0x57494E44, 0x53484152


def splitmix64(x: np.ndarray | int) -> np.ndarray:
    """The splitmix64 output function on uint64 (wrap-around arithmetic), elementwise."""
    with np.errstate(over="ignore"):
        z = np.asarray(x).astype(np.uint64) + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _MUL1
        z = (z ^ (z >> np.uint64(27))) * _MUL2
    return z ^ (z >> np.uint64(31))


def hash_combine(*parts: np.ndarray | int) -> np.ndarray:
    """One 64-bit hash of a tuple of integers; array parts broadcast (one hash per element)."""
    h = np.zeros((), dtype=np.uint64)
    for part in parts:
        h = splitmix64(h ^ np.asarray(part).astype(np.uint64))
    return h


def stream_at(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Element `counter` of the splitmix64 sequence seeded with `key` (random access, vectorised)."""
    with np.errstate(over="ignore"):
        return splitmix64(keys + counters.astype(np.uint64) * _GOLDEN)


def cluster_pick(seed: int, epoch: int, cluster_id: np.ndarray, cluster_size: np.ndarray) -> np.ndarray:
    """Index (0..cluster_size-1) of the one member each cluster contributes in `epoch`."""
    h = hash_combine(SALT_PICK, seed, epoch, cluster_id)
    return (h % np.asarray(cluster_size).astype(np.uint64)).astype(np.int64)


def record_keys(seed: int, epoch: int, cluster_id: np.ndarray, index_in_cluster: np.ndarray) -> np.ndarray:
    """Per-record uint64 key for crops and masks; (cluster_id, index_in_cluster) is unique in a corpus."""
    return hash_combine(SALT_RECORD, seed, epoch, cluster_id, index_in_cluster)


def selected(block: RecordBlock, sampling: str, seed: int, epoch: int) -> np.ndarray:
    """Boolean mask of the records of `block` that `epoch` uses."""
    if sampling == "uniform":
        return np.ones(len(block), dtype=bool)
    if sampling == "cluster":
        return cluster_pick(seed, epoch, block.cluster_id, block.cluster_size) == block.index_in_cluster
    raise ValueError(f"unknown sampling {sampling!r} (want 'cluster' or 'uniform')")


def window_permutation(seed: int, epoch: int, window_start: int, n: int) -> np.ndarray:
    """The shuffle of one window, keyed by where the window starts in the epoch."""
    return np.random.default_rng([SALT_WINDOW, seed, epoch, window_start]).permutation(n)


def shard_order(seed: int, epoch: int, num_shards: int) -> np.ndarray:
    return np.random.default_rng([SALT_SHARDS, seed, epoch]).permutation(num_shards)
