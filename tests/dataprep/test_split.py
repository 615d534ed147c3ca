"""Cutting each split into shards: whole clusters per split, every record once, no tiny tail shard."""
from __future__ import annotations

import numpy as np
import pytest

from dataprep.split import shard_jobs


def digests(n: int) -> np.ndarray:
    """Stand-ins for n records' sequence digests."""
    return np.random.default_rng(n).integers(1 << 63, size=n, dtype=np.uint64)


@pytest.mark.parametrize("n, per_shard", [(3 * 1000 + 3, 1000), (2_000, 1000), (999, 1000), (10_001, 700)])
def test_shards_of_a_split_are_balanced(n, per_shard):
    """Found at scale: 2.82M kept records with --shard-mb 256 gave train shards of 929,792, 929,792, 929,792 and
    2,542 records (75.6, 75.6, 75.6 and 0.2 MB), far under the design's 50 MB minimum. The same number of shards,
    each at most `per_shard` records, now differ by one record at most."""
    cluster_id = np.arange(n)  # singletons
    jobs = shard_jobs(cluster_id, digests(n), valid_fraction=0.0, seed=0, records_per_shard=per_shard)
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
    jobs = shard_jobs(cluster_id, digests(20_000), valid_fraction=0.2, seed=1, records_per_shard=1500)
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
    jobs = shard_jobs(np.arange(n), digests(n), valid_fraction=0.0, seed=0, records_per_shard=target, at_most=False)
    sizes = [len(j.records) for j in jobs]
    assert len(jobs) == max(1, round(n / target)) and sum(sizes) == n and max(sizes) - min(sizes) <= 1, sizes
    if len(jobs) > 1:
        assert 0.75 * target <= min(sizes) and max(sizes) <= 1.25 * target, sizes
    else:
        assert n < 1.5 * target


def test_a_grown_corpus_keeps_its_validation_clusters(tmp_path):
    """Found by an audit probe: 50 new records (0.25 %) added to 20,000 reshuffled the validation split, because
    clusters were drawn by their position (a permutation of the cluster count): of the 945 validation records only
    54 stayed in validation when the new file came first, 198 when it came last; the rest moved into train, so a run
    continued on the grown corpus trains on its old validation data. The choice now depends on each cluster's
    sequences only."""
    from dataprep.synth import SynthConfig, write_fasta
    from tests.dataprep.helpers import build_small, read_back

    old, new = tmp_path / "old.fa", tmp_path / "new.fa"
    write_fasta(SynthConfig(3000, seed=5, invalid_fraction=0), old)
    write_fasta(SynthConfig(30, seed=99, invalid_fraction=0), tmp_path / "tmp.fa")
    new.write_text((tmp_path / "tmp.fa").read_text().replace(">syn", ">new"))

    def valid(inputs: list, out: str) -> set[bytes]:
        build_small(tmp_path, inputs, out=out, valid_fraction=0.05)
        return {seq for seq, split, *_ in read_back(tmp_path / out).values() if split == "valid"}

    before = valid([old], "before")
    for inputs in ([new, old], [old, new]):
        after = valid(inputs, "after")
        assert len(before & after) >= 0.97 * len(before), (len(before), len(before & after))
        assert abs(len(after) - 0.05 * 3030 * 0.95) < 15  # still about 5 % (of ~95 % unique records)


def test_the_validation_clusters_follow_the_seed():
    """--seed draws the split (docs/dataprep.md): the same seed the same clusters, another seed others."""
    from dataprep.split import valid_clusters

    cluster_id = np.random.default_rng(3).integers(0, 2000, 10_000)
    d = digests(10_000)
    picks = [valid_clusters(cluster_id, d, 0.05, seed) for seed in (0, 0, 1)]
    assert picks[0].sum() == round(0.05 * (cluster_id.max() + 1))
    assert np.array_equal(picks[0], picks[1])
    assert (picks[0] & picks[2]).sum() < 0.3 * picks[0].sum()  # another seed: mostly other clusters
    # and the record order of the shards (a seed-independent shuffle passed every other test)
    from dataprep.split import shuffled_order

    orders = [shuffled_order(1000, seed) for seed in (0, 0, 1)]
    assert np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[0], orders[2])
    assert sorted(orders[0].tolist()) == list(range(1000))


def test_validation_takes_no_cluster_linked_to_train():
    """Clusters of near-duplicates found by the search (`linked`) end up on one side: a candidate linked to a
    non-candidate goes to train (and so do candidates linked to it, in turn); linked candidates go together."""
    from dataprep.split import CANDIDATES_PER_VALID, cluster_ranking, valid_candidates, valid_clusters, wanted_valid

    cluster_id = np.random.default_rng(5).integers(0, 1000, 5000)
    d = digests(5000)
    ranking, cand = cluster_ranking(cluster_id, d, 0), valid_candidates(cluster_id, d, 0.05, 0)
    last = CANDIDATES_PER_VALID * 50 - 1
    assert wanted_valid(1000, 0.05) == 50 and np.array_equal(cand, ranking[:last + 1])
    plain = valid_clusters(cluster_id, d, 0.05, 0)
    assert np.array_equal(plain, valid_clusters(cluster_id, d, 0.05, 0, np.zeros((0, 2), np.int64)))
    outside = ranking[500:]
    linked = np.array([[ranking[0], outside[0]],          # the best candidate is near a train cluster
                       [ranking[1], ranking[2]], [ranking[2], outside[1]],  # a chain out through a candidate
                       [ranking[3], ranking[last]],      # two candidates: together, though one ranks last
                       [ranking[4], ranking[4]],         # a cluster's own records: no link
                       # the same as the first two, each pair written the other way round (a search's hits go
                       # from query to target, so a link can come in either order)
                       [outside[2], ranking[5]], [ranking[6], ranking[5]]])
    chosen = valid_clusters(cluster_id, d, 0.05, 0, linked)
    assert not chosen[ranking[[0, 1, 2, 5, 6]]].any() and chosen[ranking[[3, 4, last]]].all()
    assert chosen.sum() == 50 and chosen[ranking[7:54]].all() and not chosen[ranking[54:last]].any()
    assert all(chosen[x] == chosen[y] for x, y in linked)  # every link has both ends on one side
    assert plain.sum() == 50 and plain[ranking[:50]].all()  # without links: the first 50, as before
    # a group that reaches past the wanted number is taken whole (51), not dropped
    straddling = valid_clusters(cluster_id, d, 0.05, 0, np.array([[ranking[49], ranking[last]]]))
    assert straddling.sum() == 51 and straddling[ranking[:50]].all() and straddling[ranking[last]]
    # at least one validation cluster and one train cluster wherever there are two; a single one stays in train
    assert [wanted_valid(10, 0.01), wanted_valid(2, 0.9), wanted_valid(1, 0.5), wanted_valid(1, 0.9),
            wanted_valid(10, 0.0), wanted_valid(0, 0.5)] == [1, 1, 0, 0, 0, 0]


def test_four_candidates_are_searched_per_wanted_validation_cluster_and_never_all_clusters():
    from dataprep.split import valid_candidates

    assert len(valid_candidates(np.arange(1000), digests(1000), 0.01, seed=0)) == 40
    assert len(valid_candidates(np.arange(10), digests(10), 0.3, seed=0)) == 9


def test_clusters_too_large_for_the_holdout_search_are_never_candidates(monkeypatch):
    """A candidate of S records costs ~S^2 holdout-search hits: clusters over VALID_MAX_CLUSTER come last, the
    others keep their order (a corpus without such clusters keeps its validation)."""
    from dataprep import split

    sizes = [1] * 500 + [split.VALID_MAX_CLUSTER + 1, split.VALID_MAX_CLUSTER] + [1] * 2500
    cluster_id = np.repeat(np.arange(len(sizes)), sizes)
    seq = digests(len(cluster_id))
    ranking = split.cluster_ranking(cluster_id, seq, seed=0)
    monkeypatch.setattr(split, "VALID_MAX_CLUSTER", 10**9)
    uncapped = split.cluster_ranking(cluster_id, seq, seed=0)
    assert ranking[-1] == 500 and uncapped[-1] != 500
    np.testing.assert_array_equal(ranking[:-1], uncapped[uncapped != 500])
    monkeypatch.undo()
    everything_but_one = split.valid_candidates(cluster_id, seq, 0.3, seed=0)   # 4 x 900 > 3,001 clusters
    assert len(everything_but_one) == len(sizes) - 1 and 500 not in everything_but_one and 501 in everything_but_one
