"""Cluster-held-out train/valid split, global shuffle, and cutting each split into shard jobs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    records: np.ndarray  # positions in the kept list, in shard order

    @property
    def path(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"


def valid_clusters(n_clusters: int, valid_fraction: float, seed: int) -> np.ndarray:
    """Bool per cluster: held out for validation (round(fraction * clusters) clusters, seeded choice)."""
    n_valid = int(round(valid_fraction * n_clusters))
    if valid_fraction > 0 and n_clusters > 1:
        n_valid = min(max(n_valid, 1), n_clusters - 1)
    chosen = np.zeros(n_clusters, bool)
    chosen[np.random.default_rng([seed, 1]).permutation(n_clusters)[:n_valid]] = True
    return chosen


def shard_jobs(cluster_id: np.ndarray, n_clusters: int, valid_fraction: float, seed: int,
               records_per_shard: int) -> list[ShardJob]:
    """Every kept record in exactly one job; whole clusters per split; records shuffled within a split."""
    is_valid = valid_clusters(n_clusters, valid_fraction, seed)[cluster_id]
    jobs = []
    for k, (split, members) in enumerate((("train", np.flatnonzero(~is_valid)), ("valid", np.flatnonzero(is_valid)))):
        order = members[np.random.default_rng([seed, 2, k]).permutation(len(members))]
        for i, a in enumerate(range(0, len(order), records_per_shard)):
            jobs.append(ShardJob(split, i, order[a: a + records_per_shard]))
    return jobs
