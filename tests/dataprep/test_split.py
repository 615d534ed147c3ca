"""Cutting each split into shards: whole clusters per split, every record once, no tiny tail shard."""
from __future__ import annotations

import numpy as np
import pytest

from dataprep.split import shard_jobs


@pytest.mark.parametrize("n, per_shard", [(3 * 1000 + 3, 1000), (2_000, 1000), (999, 1000), (10_001, 700)])
def test_shards_of_a_split_are_balanced(n, per_shard):
    """Found at scale: 2.82M kept records with --shard-mb 256 gave train shards of 929,792, 929,792, 929,792 and
    2,542 records (75.6, 75.6, 75.6 and 0.2 MB), far under the design's 50 MB minimum. The same number of shards,
    each at most `per_shard` records, now differ by one record at most."""
    cluster_id = np.arange(n)  # singletons
    jobs = shard_jobs(cluster_id, n, valid_fraction=0.0, seed=0, records_per_shard=per_shard)
    sizes = [len(j.records) for j in jobs]
    assert all(j.split == "train" for j in jobs) and [j.index for j in jobs] == list(range(len(jobs)))
    assert len(jobs) == -(-n // per_shard)  # the fewest shards that respect the bound
    assert max(sizes) <= per_shard and max(sizes) - min(sizes) <= 1, sizes
    assert np.array_equal(np.sort(np.concatenate([j.records for j in jobs])), np.arange(n))
    for j in jobs:
        assert np.all(np.diff(j.shuffled) > 0)  # increasing positions in the shuffled layout


def test_clusters_stay_whole_and_each_split_is_balanced():
    rng = np.random.default_rng(0)
    cluster_id = rng.integers(0, 3000, 20_000)
    jobs = shard_jobs(cluster_id, 3000, valid_fraction=0.2, seed=1, records_per_shard=1500)
    for split in ("train", "valid"):
        sizes = [len(j.records) for j in jobs if j.split == split]
        assert sizes and max(sizes) <= 1500 and max(sizes) - min(sizes) <= 1, (split, sizes)
    train = np.concatenate([j.records for j in jobs if j.split == "train"])
    valid = np.concatenate([j.records for j in jobs if j.split == "valid"])
    assert len(train) + len(valid) == 20_000
    assert not set(cluster_id[train].tolist()) & set(cluster_id[valid].tolist())


@pytest.mark.parametrize("n", [500, 1_400, 1_600, 2_049, 2_600, 3_001, 10_400])
def test_a_shard_size_target_gives_the_nearest_number_of_equal_shards(n):
    """--shard-mb is a target (the design wants shards of 50 MB..1 GB): the ceiling would halve the shards of a
    split just over one target (1M synthetic records at the default 256 MB: two train shards of 37.5 MB)."""
    target = 1000
    jobs = shard_jobs(np.arange(n), n, valid_fraction=0.0, seed=0, records_per_shard=target, at_most=False)
    sizes = [len(j.records) for j in jobs]
    assert len(jobs) == max(1, round(n / target)) and sum(sizes) == n and max(sizes) - min(sizes) <= 1, sizes
    if len(jobs) > 1:
        assert 0.75 * target <= min(sizes) and max(sizes) <= 1.25 * target, sizes
    else:
        assert n < 1.5 * target
