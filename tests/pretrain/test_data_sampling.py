"""Hashing, cluster sampling and the stream plan (pure functions, no shards)."""
from __future__ import annotations

import numpy as np
import pytest

from pretrain.data import cluster_pick
from pretrain.data.plan import ShardTable, StreamState, redistribute, split_pieces
from pretrain.data.sampling import hash_combine, selected, splitmix64, stream_at

M64 = (1 << 64) - 1


def splitmix64_reference(x: int) -> int:
    """The published splitmix64 output function with Python integers."""
    z = (x + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_matches_reference_and_known_value():
    assert int(splitmix64(0)) == 0xE220A8397B1DCDAF  # first output of SplitMix64 seeded with 0
    xs = np.array([0, 1, 2**40 + 7, 2**63 + 5, M64], dtype=np.uint64)
    assert splitmix64(xs).tolist() == [splitmix64_reference(int(x)) for x in xs]
    keys = np.array([3, 3, 99], dtype=np.uint64)
    assert stream_at(keys, np.array([0, 1, 5])).tolist() == [
        splitmix64_reference((3 + c * 0x9E3779B97F4A7C15) & M64) for c in (0, 1)] + [
        splitmix64_reference((99 + 5 * 0x9E3779B97F4A7C15) & M64)]


def test_cluster_pick_is_deterministic_in_range_and_vectorised():
    sizes = np.arange(1, 2001, dtype=np.int64)
    ids = np.arange(2000, dtype=np.int64) * 7919
    pick = cluster_pick(3, 5, ids, sizes)
    assert pick.dtype == np.int64 and np.all(pick >= 0) and np.all(pick < sizes)
    assert np.array_equal(pick, cluster_pick(3, 5, ids, sizes))
    scalar = [int(cluster_pick(3, 5, np.array([i]), np.array([s]))[0]) for i, s in zip(ids[:20], sizes[:20])]
    assert scalar == pick[:20].tolist()
    assert not np.array_equal(pick, cluster_pick(3, 6, ids, sizes))  # a new draw each epoch
    assert not np.array_equal(pick, cluster_pick(4, 5, ids, sizes))  # and for each seed


def test_an_unknown_sampling_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown sampling 'clusters'"):
        selected(None, "clusters", 0, 0)


def test_cluster_pick_is_uniform_over_members():
    counts = np.bincount(cluster_pick(0, np.arange(20000), 12345, 4), minlength=4)
    assert counts.sum() == 20000 and np.all(np.abs(counts - 5000) < 300), counts


def test_hash_combine_depends_on_every_part():
    base = int(hash_combine(1, 2, 3))
    assert len({base, int(hash_combine(1, 2, 4)), int(hash_combine(1, 3, 3)), int(hash_combine(2, 2, 3)),
                int(hash_combine(3, 2, 1))}) == 5


def test_every_seeded_draw_depends_on_each_of_its_inputs():
    """Record keys (crops, masks), window shuffles and shard orders: another data.seed, epoch, record or window
    gives another draw (dropping the seed or the window start from one of them passed every other test: runs
    with different seeds would have shared their masks, and every window of an epoch its order)."""
    from pretrain.data.sampling import record_keys, shard_order, window_permutation

    cid, idx = np.arange(1000), np.zeros(1000, np.int64)
    keys = record_keys(3, 5, cid, idx)
    assert len(set(keys.tolist())) == 1000
    for other in (record_keys(4, 5, cid, idx), record_keys(3, 6, cid, idx), record_keys(3, 5, cid, idx + 1)):
        assert not np.any(other == keys)
    perm = window_permutation(3, 5, 0, 500)
    assert sorted(perm.tolist()) == list(range(500)) and np.array_equal(perm, window_permutation(3, 5, 0, 500))
    for seed, epoch, start in ((4, 5, 0), (3, 6, 0), (3, 5, 500)):
        assert not np.array_equal(window_permutation(seed, epoch, start, 500), perm)
    order = shard_order(3, 5, 50)
    assert sorted(order.tolist()) == list(range(50)) and np.array_equal(order, shard_order(3, 5, 50))
    assert not np.array_equal(shard_order(4, 5, 50), order) and not np.array_equal(shard_order(3, 6, 50), order)


def test_shard_table_locates_ranges_in_the_epoch_order():
    table = ShardTable(["a", "b", "c"], [5, 0, 7], seed=1)
    for epoch in range(3):
        got = table.locate(epoch, 0, 12)
        assert sum(hi - lo for _, lo, hi, _ in got) == 12
        assert [raw for *_, raw in got] == sorted(raw for *_, raw in got)
        sub = table.locate(epoch, 3, 9)
        assert sum(hi - lo for _, lo, hi, _ in sub) == 6 and sub[0][3] == 3
    orders = {tuple(s for s, *_ in table.locate(e, 0, 12)) for e in range(10)}
    assert len(orders) == 2  # both orders of the two non-empty shards occur over epochs


def covered(pieces) -> list[int]:
    return sorted(i for _, a, b, _ in pieces for i in range(a, b))


@pytest.mark.parametrize("n", [1, 2, 3, 7])
def test_split_pieces_balances_and_keeps_partly_read_windows(n):
    pieces = [[0, 0, 95, 4], [0, 130, 400, 0], [0, 405, 407, 2]]
    shares = split_pieces(pieces, n, window=50)
    flat = [p for share in shares for p in share]
    assert covered(flat) == covered(pieces)
    sizes = [sum(b - a for _, a, b, _ in s) for s in shares]
    assert max(sizes) - min(sizes) <= 50 + 2 or n == 7
    for _, a, b, skip in flat:
        if skip:  # a piece that resumes inside a window still starts at it and holds that whole window
            assert [a, skip] in ([0, 4], [405, 2]) and (b >= min(50, 95) if a == 0 else b == 407)


def test_a_share_boundary_inside_a_partly_read_window_moves_to_the_windows_end():
    """The cases above never put a boundary inside the partly read window (their targets all pass it): here the
    first share's 25 records would end inside window [0, 50), whose shuffle depends on its extent; the window
    goes whole to that share and the next share starts at its end."""
    shares = split_pieces([[0, 0, 100, 10]], 4, window=50)
    assert shares[0] == [[0, 0, 50, 10]]
    assert covered([p for share in shares for p in share]) == list(range(100))
    assert [p for share in shares[1:] for p in share] == [[0, 50, 75, 0], [0, 75, 100, 0]]
    # a partly read window shorter than the piece's rest of it: the piece's end, not the window's
    assert split_pieces([[0, 0, 30, 10]], 4, window=50)[0] == [[0, 0, 30, 10]]


def test_redistribute_hands_over_exactly_the_remaining_work():
    table = ShardTable(["s0", "s1", "s2"], [300, 250, 450], seed=0)  # 1000 records
    n_old = 4
    old = []
    for s in range(n_old):
        e, a, b, _ = table.default_piece(1, n_old, s)
        old.append(StreamState([[1, a + 10 * s, b, s]], 2))          # mid-epoch 1, window partly read
    old[3] = StreamState([[2, 990, 1000, 1]], 3)                       # already in epoch 2
    old[0] = StreamState([], 1)                                        # epoch 1 not yet started
    new = redistribute(old, table, new_streams=3, window=32)
    assert all(st.next_epoch == 3 for st in new)
    for epoch in (1, 2):
        remaining = []
        for s, st in enumerate(old):
            remaining += [p for p in st.pieces if p[0] == epoch]
            remaining += [table.default_piece(e, n_old, s) for e in range(st.next_epoch, 3) if e == epoch]
        handed = [p for st in new for p in st.pieces if p[0] == epoch]
        assert covered(handed) == covered(remaining)  # nothing lost, nothing twice
        starts = {(p[1], p[3]) for p in remaining if p[3]}
        assert starts <= {(p[1], p[3]) for p in handed}  # partly read windows keep their position
    for st in new:  # each new stream reads its epochs in order
        assert [p[0] for p in st.pieces] == sorted(p[0] for p in st.pieces)


def test_redistribute_from_fresh_states_is_a_fresh_start():
    table = ShardTable(["s"], [100], seed=0)
    new = redistribute([StreamState(), StreamState()], table, 3, window=10)
    assert [(st.pieces, st.next_epoch) for st in new] == [([], 0)] * 3


def test_a_streams_epoch_is_the_one_it_reads_until_its_pieces_are_done():
    """The epoch of every step's log line: the first remaining piece's, then the next one to start."""
    assert StreamState([[2, 0, 10, 0], [3, 0, 5, 0]], 3).epoch == 2 and StreamState([], 3).epoch == 3
