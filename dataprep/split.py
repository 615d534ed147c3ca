"""Cluster-held-out train/valid split, global shuffle, and cutting each split into shard jobs.

The shuffle is one seeded permutation of all kept records, drawn before clustering; each split takes its records
in that order. So the records can be laid out in shuffled order while MMseqs2 runs (`shuffled_order`,
`store.write_permuted`), and a shard block is then a nearly contiguous range of that layout.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from .digest import fmix64


@dataclass(frozen=True)
class ShardJob:
    split: str
    index: int
    records: np.ndarray  # positions in the kept list, in shard order
    shuffled: np.ndarray  # the same records' positions in the shuffled order (increasing)

    @property
    def path(self) -> str:
        return f"{self.split}/shard-{self.index:06d}.tar"


def shuffled_order(n: int, seed: int) -> np.ndarray:
    """Kept-list positions in shuffled order (seeded)."""
    return np.random.default_rng([seed, 2]).permutation(n)


# Candidates per wanted validation cluster: those found near a train record go back to train (two thirds on the
# ncRNA corpus at 70 % identity over 80 % of either sequence: 150 of 465 candidates were left at 1 %, 760 of 2,319
# at 5 %), so the rest still fill the wanted number.
CANDIDATES_PER_VALID = 4
# Clusters of more records are ranked after all others, so never validation candidates in practice: the holdout
# search returns ~S^2 hits for a candidate of S near-copies (S = 2,000: 4.0M rows, 31 s of 2 cores, reduced to a
# single cluster pair), ~1.9e9 for a 44k-record rRNA family (~57 GB of output, ~260 GB of memory to read), and one
# such family would fill validation with its copies.
VALID_MAX_CLUSTER = 1_000


def cluster_ranking(cluster_id: np.ndarray, seq_digest: np.ndarray, seed: int) -> np.ndarray:
    """Cluster ids in validation order: by a seeded key of their content (the smallest digest of a member's
    sequence), not of their position in the input, so a grown corpus keeps its validation clusters (a draw over
    cluster numbers moved 96 % of them into train when 0.25 % more records came first); clusters of more than
    VALID_MAX_CLUSTER records last."""
    n_clusters = int(cluster_id.max()) + 1 if len(cluster_id) else 0
    content = np.full(n_clusters, np.iinfo(np.uint64).max, np.uint64)
    np.minimum.at(content, cluster_id, seq_digest)
    salt = np.random.default_rng([seed, 1]).integers(np.iinfo(np.uint64).max, dtype=np.uint64, endpoint=True)
    too_large = np.bincount(cluster_id, minlength=n_clusters) > VALID_MAX_CLUSTER
    return np.lexsort((fmix64(content ^ salt), too_large))


def wanted_valid(n_clusters: int, valid_fraction: float) -> int:
    """round(fraction * clusters); when the fraction is > 0, at least one and never all (a single cluster: none)."""
    n_valid = int(round(valid_fraction * n_clusters))
    if valid_fraction > 0 and n_clusters > 0:
        n_valid = min(max(n_valid, 1), n_clusters - 1)
    return n_valid


def valid_candidates(cluster_id: np.ndarray, seq_digest: np.ndarray, valid_fraction: float, seed: int) -> np.ndarray:
    """The clusters whose records are searched against all records before validation is chosen among them."""
    return _candidates(cluster_ranking(cluster_id, seq_digest, seed), valid_fraction)


def _candidates(ranking: np.ndarray, valid_fraction: float) -> np.ndarray:
    n = min(CANDIDATES_PER_VALID * wanted_valid(len(ranking), valid_fraction), max(len(ranking) - 1, 0))
    return ranking[:n]


def valid_clusters(cluster_id: np.ndarray, seq_digest: np.ndarray, valid_fraction: float, seed: int,
                   linked: np.ndarray | None = None) -> np.ndarray:
    """Bool per cluster: held out for validation, `wanted_valid` clusters in `cluster_ranking` order.

    `linked` ([m, 2] cluster ids): pairs of clusters with records within the clustering thresholds of each other
    (an MMseqs2 search of the `valid_candidates`' records against all records). MMseqs2 keeps each member near its
    own representative only, so such pairs are common. Validation is then taken from the candidates alone, without
    any candidate linked to a cluster outside them (repeated until none is), and in whole groups of linked
    candidates, so that no validation record has a linked record in train."""
    ranking = cluster_ranking(cluster_id, seq_digest, seed)
    n_valid = wanted_valid(len(ranking), valid_fraction)
    chosen = np.zeros(len(ranking), bool)
    if linked is None:
        chosen[ranking[:n_valid]] = True
        return chosen
    a, b = np.concatenate([linked, linked[:, ::-1]]).T
    ok = np.zeros(len(ranking), bool)
    ok[_candidates(ranking, valid_fraction)] = True
    while (out := ok[a] & ~ok[b]).any():
        ok[a[out]] = False
    inside = ok[a] & ok[b]
    graph = sp.coo_matrix((np.ones(int(inside.sum())), (a[inside], b[inside])), shape=(len(ranking),) * 2)
    group = connected_components(graph, directed=False)[1]
    of = group[ranking[ok[ranking]]]  # the candidates' groups, in ranking order
    groups, first = np.unique(of, return_index=True)
    order = groups[np.argsort(first)]  # groups by their best-ranked member
    sizes = np.bincount(of)[order]
    taken = order[np.cumsum(sizes) - sizes < n_valid]  # until n_valid clusters are reached
    chosen[np.isin(group, taken)] = True  # (a cluster that is no candidate is a group of its own, not taken)
    return chosen


def shard_jobs(cluster_id: np.ndarray, seq_digest: np.ndarray, valid_fraction: float, seed: int,
               records_per_shard: int, at_most: bool = True, linked: np.ndarray | None = None) -> list[ShardJob]:
    """Every kept record in exactly one job; whole clusters per split (`valid_clusters`, from the kept records'
    cluster ids and sequence digests, and the `linked` clusters); each split in the shuffled order.

    Each split is cut into shards of equal size (+-1 record): the fewest of at most `records_per_shard` records
    (`at_most`, --shard-records), or the number nearest to `records_per_shard` each (a target, --shard-mb: shards of
    0.75..1.25x the target, or a single one of up to 1.5x). Cutting every `records_per_shard` left a tail shard of
    any size (3M synthetic records: three train shards of 75.6 MB and one of 0.2 MB)."""
    order = shuffled_order(len(cluster_id), seed)
    in_valid = valid_clusters(cluster_id, seq_digest, valid_fraction, seed, linked)[cluster_id[order]]
    jobs = []
    for split, where in (("train", np.flatnonzero(~in_valid)), ("valid", np.flatnonzero(in_valid))):
        n = len(where)
        k = -(-n // records_per_shard)  # shards
        if not at_most and n:
            k = max(1, int(n / records_per_shard + 0.5))
        cuts = [n * i // max(k, 1) for i in range(k + 1)]  # (an empty split: no shards)
        for i, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            at = where[a:b]
            jobs.append(ShardJob(split, i, order[at], at))
    return jobs
