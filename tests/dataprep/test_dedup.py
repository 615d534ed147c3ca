"""Digests and exact dedup: equal bytes <=> merged, even when every digest collides."""
from __future__ import annotations

import numpy as np
import pytest

from dataprep.arrays import offsets_from_lengths
from dataprep.dedup import dedup
from dataprep.digest import PAD, segment_digests
from dataprep.normalize import NormalizeConfig, parse_chunk
from dataprep.store import Store, StoreWriter


def random_segments(rng, n, max_len=40):
    lens = rng.integers(0, max_len, n)
    buf = np.frombuffer(b"ACGU", np.uint8)[rng.integers(0, 4, lens.sum() + PAD)]
    return buf, offsets_from_lengths(lens)


def test_digest_depends_on_content_position_and_length():
    rng = np.random.default_rng(0)
    buf, off = random_segments(rng, 20000)
    h = segment_digests(buf, off)
    keys = [buf[off[i]: off[i + 1]].tobytes() for i in range(len(off) - 1)]
    by_key = {}
    for k, d in zip(keys, h.tolist()):
        by_key.setdefault(k, set()).add(d)
    assert all(len(v) == 1 for v in by_key.values())  # equal bytes -> equal digest
    assert len(set(h.tolist())) == len(by_key)  # distinct bytes -> distinct digests (no collision here)
    # same bytes at another offset, words swapped, and zero padding vs shorter record
    a = np.frombuffer(b"xxACGUACGUAAAACCCCGGGG" + bytes(PAD), np.uint8)
    segs = segment_digests(a, np.array([2, 22]))
    again = segment_digests(np.frombuffer(b"ACGUACGUAAAACCCCGGGG" + bytes(PAD), np.uint8), np.array([0, 20]))
    swapped = segment_digests(np.frombuffer(b"AAAACCCCACGUACGUGGGG" + bytes(PAD), np.uint8), np.array([0, 20]))
    assert segs[0] == again[0] != swapped[0]
    z = np.frombuffer(b"ACGU\x00\x00\x00\x00" + bytes(PAD), np.uint8)
    assert segment_digests(z, np.array([0, 4]))[0] != segment_digests(z, np.array([0, 5]))[0]
    with pytest.raises(ValueError, match="needs PAD bytes after the last segment"):   # its loads would read past
        segment_digests(np.frombuffer(b"ACGUACGU", np.uint8), np.array([0, 4]))


def make_store(tmp_path, text: str) -> Store:
    p = parse_chunk(text.encode(), 1, NormalizeConfig(min_len=1))
    w = StoreWriter(tmp_path / "store", labels=False)
    w.append(p, 0, 0)
    w.close()
    return Store(tmp_path / "store")


def test_dedup_keeps_first_and_confirms_bytes_under_forced_collisions(tmp_path):
    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACGU"), int(rng.integers(5, 30)))) for _ in range(300)]
    order = rng.integers(0, len(seqs), 2000)
    text = "".join(f">r{i}\n{seqs[k]}\n" for i, k in enumerate(order))
    store = make_store(tmp_path, text)
    expected_keep = sorted({k: i for i, k in reversed(list(enumerate(order)))}.values())
    res = dedup(store)
    assert res.keep.tolist() == expected_keep
    # every digest equal (worst case): byte comparison must still give the same answer
    store.seqh = np.zeros(len(store), np.uint64)
    store.idh = np.zeros(len(store), np.uint64)
    res2 = dedup(store, bucket_records=10_000)
    assert res2.keep.tolist() == expected_keep
    # hash-partitioned into many buckets: same answer
    res3 = dedup(make_store(tmp_path / "b", text), bucket_records=100)
    assert res3.keep.tolist() == expected_keep
    first = {}
    for i, k in enumerate(order.tolist()):
        first.setdefault(k, i)
    assert sorted(zip(res3.dup.tolist(), res3.dup_rep.tolist())) == [
        (i, first[k]) for i, k in enumerate(order.tolist()) if first[k] != i]


def test_an_id_conflict_is_told_from_a_repeat_by_bytes_under_forced_collisions(tmp_path):
    """Same id and same sequence: a duplicate; same id and another sequence: a conflict (rejected). With every
    digest equal, only the byte comparison can tell the two apart (it was not exercised: dropping it passed)."""
    rng = np.random.default_rng(2)
    seqs = ["".join(rng.choice(list("ACGU"), int(rng.integers(5, 30)))) for _ in range(50)]
    names = rng.integers(0, 25, 400)
    records = [(f"id{n}", int(2 * n + rng.integers(0, 2))) for n in names]  # each id: one of two sequences
    text = "".join(f">{name}\n{seqs[k]}\n" for name, k in records)
    first: dict[str, int] = {}
    want = []
    for i, (name, k) in enumerate(records):
        f = first.setdefault(name, i)
        if seqs[records[f][1]] != seqs[k]:
            want.append((i, f))
    assert 50 < len(want) < 350  # both repeats and conflicts
    for forced in (False, True):
        store = make_store(tmp_path / str(forced), text)
        if forced:
            store.seqh = np.zeros(len(store), np.uint64)
            store.idh = np.zeros(len(store), np.uint64)
        res = dedup(store)
        assert sorted(zip(res.conflict.tolist(), res.conflict_first.tolist())) == want


def test_records_alike_in_their_first_bytes_or_one_a_prefix_of_the_other_are_not_merged(tmp_path):
    """Under forced digest collisions the byte comparison alone decides: records that differ only after their
    first 16 nt, or of which one is the other plus a tail, are distinct (comparing a prefix, or the lengths
    loosely, merged them)."""
    rng = np.random.default_rng(4)
    stem = "".join(rng.choice(list("ACGU"), 16))
    seqs = [stem + tail for tail in ("", "A", "AC", "C", "CA", "ACGU", "ACGA", "")]  # the last repeats the first
    store = make_store(tmp_path, "".join(f">r{i}\n{s}\n" for i, s in enumerate(seqs)))
    store.seqh = np.zeros(len(store), np.uint64)
    res = dedup(store)
    assert res.keep.tolist() == list(range(7)) and list(zip(res.dup.tolist(), res.dup_rep.tolist())) == [(7, 0)]


def test_a_record_rejected_for_its_id_is_no_representative_of_a_later_copy(tmp_path):
    """r1 reuses r0's id with another sequence (rejected); r2 holds r1's sequence under its own id: r2 is kept, not
    merged into the rejected r1, which would lose that sequence."""
    store = make_store(tmp_path, ">a\nACGUACGU\n>a\nGGGGCCCC\n>b\nGGGGCCCC\n")
    res = dedup(store)
    assert res.keep.tolist() == [0, 2] and res.conflict.tolist() == [1] and len(res.dup) == 0
