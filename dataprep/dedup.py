"""Exact dedup over the record store, hash-partitioned so memory stays bounded at any corpus size.

Records are grouped by their 64-bit digest, one hash bucket at a time (buckets are read from the memmapped
digest column, so at most one bucket's arrays are in RAM). Within a group the first record in input order
(source, line) is the representative; every other member is confirmed by comparing bytes, so a digest
collision can never merge two different sequences (members that differ are regrouped and compared again). Two passes:

1. ids: a later record whose id equals an earlier record's id but whose sequence differs is rejected
   (same id, same sequence is just an exact duplicate and is merged by pass 2);
2. sequences: the remaining records are merged into their group's representative.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .arrays import concat_ranges
from .comm import MpiComm, SerialComm
from .store import Store

BUCKET_RECORDS = 4_000_000
_CMP_CHUNK = 1 << 18
_PAIR_CHUNK = 4096


@dataclass
class DedupResult:
    keep: np.ndarray  # int64 store indices of the kept records, in input order
    dup: np.ndarray  # int64 store indices of merged duplicates
    dup_rep: np.ndarray  # int64 store index of each duplicate's representative (kept)
    conflict: np.ndarray  # int64 store indices rejected for a duplicate id with another sequence
    conflict_first: np.ndarray  # the earlier record holding that id


def n_buckets(n: int, bucket_records: int = BUCKET_RECORDS) -> int:
    return max(1, -(-n // bucket_records))


def _same_bytes(blob: np.ndarray, off: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pair (a[i], b[i]): do the two records hold identical bytes? (chunked: bounded temporaries)"""
    la, lb = off[a + 1] - off[a], off[b + 1] - off[b]
    same = la == lb
    idx = np.flatnonzero(same & (la > 0))
    for c in range(0, len(idx), _PAIR_CHUNK):
        i = idx[c: c + _PAIR_CHUNK]
        lens = la[i]
        diff = blob[concat_ranges(off[a[i]], lens)] != blob[concat_ranges(off[b[i]], lens)]
        same[i] = ~np.logical_or.reduceat(diff, np.cumsum(lens) - lens)
    return same


def _group_members(digest: np.ndarray, sel: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(member, first) store-index pairs for every record of `sel` (None = all) that is not the first of its digest
    group, "first" meaning the smallest store index (the store is in input order: `store.merge_parts`).
    Memory: the sort order (8 B/record) plus one bool per record; groups are few, so they are handled apart."""
    d = digest if sel is None else digest[sel]
    order = np.argsort(d)  # not stable (4x faster); ties are resolved below, within the (few) groups
    same = np.empty(max(len(order) - 1, 0), bool)
    for a in range(0, len(same), _CMP_CHUNK):  # chunked so no second sorted copy of the digests is held
        b = min(a + _CMP_CHUNK, len(same))
        w = d[order[a: b + 1]]
        same[a:b] = w[1:] == w[:-1]
    pos = np.flatnonzero(same)  # sorted[p] == sorted[p + 1]; consecutive p form one group
    new_run = np.ones(len(pos), bool)
    new_run[1:] = pos[1:] != pos[:-1] + 1
    run_start = pos[new_run]  # groups cover sorted positions [run_start, run_end]
    run_end = pos[np.append(new_run[1:], True)[: len(pos)]] + 1
    members = order[concat_ranges(run_start, run_end - run_start + 1)]
    if sel is not None:
        members = sel[members]
    group = np.repeat(np.arange(len(run_start)), run_end - run_start + 1)
    by = np.lexsort((members, group))  # within each group, input order
    members, group = members[by], group[by]
    is_first = np.ones(len(members), bool)
    is_first[1:] = group[1:] != group[:-1]
    first = members[is_first][group]
    return members[~is_first], first[~is_first]


def _bucket_pass(digest: np.ndarray, eligible: np.ndarray | None, buckets: list[int], nb: int,
                 confirm: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    out_m, out_f = [], []
    for b in buckets:
        if nb == 1:
            sel = None if eligible is None else np.flatnonzero(eligible)
        else:
            in_bucket = (digest % np.uint64(nb)) == np.uint64(b)
            sel = np.flatnonzero(in_bucket if eligible is None else in_bucket & eligible)
        while sel is None or len(sel):  # members that differ from their group's first are regrouped
            m, f = _group_members(digest, sel)
            ok = confirm(m, f)
            out_m.append(m[ok])
            out_f.append(f[ok])
            sel = np.sort(m[~ok])
    return (np.concatenate(out_m) if out_m else np.zeros(0, np.int64),
            np.concatenate(out_f) if out_f else np.zeros(0, np.int64))


def id_conflicts(store: Store, buckets: list[int], nb: int) -> tuple[np.ndarray, np.ndarray]:
    """(record, earlier record) pairs with the same id and a different sequence."""
    m, f = _bucket_pass(store.idh, None, buckets, nb, lambda a, b: _same_bytes(store.ids, store.id_off, a, b))
    differs = (store.seqh[m] != store.seqh[f]) | ~_same_bytes(store.seq, store.seq_off, m, f)
    return m[differs], f[differs]


def duplicates(store: Store, rejected: np.ndarray, buckets: list[int], nb: int) -> tuple[np.ndarray, np.ndarray]:
    """(duplicate, representative) pairs among the records not `rejected` (bool mask)."""
    return _bucket_pass(store.seqh, ~rejected if rejected.any() else None, buckets, nb,
                        lambda a, b: _same_bytes(store.seq, store.seq_off, a, b))


def finish(store: Store, conflict: np.ndarray, conflict_first: np.ndarray, dup: np.ndarray,
           dup_rep: np.ndarray) -> DedupResult:
    keep = np.ones(len(store), bool)
    keep[conflict] = False
    keep[dup] = False
    return DedupResult(keep=np.flatnonzero(keep), dup=dup, dup_rep=dup_rep, conflict=conflict,
                       conflict_first=conflict_first)


def dedup(store: Store, comm: SerialComm | MpiComm | None = None, bucket_records: int = BUCKET_RECORDS) -> DedupResult | None:
    """Id conflicts, then exact duplicates, each rank of `comm` (default: this process alone) taking every
    size-th bucket; the result on rank 0, None on the others."""
    comm = comm or SerialComm()
    nb = n_buckets(len(store), bucket_records)
    mine = [b for b in range(nb) if b % comm.size == comm.rank]
    pairs = comm.allgather(id_conflicts(store, mine, nb))
    conflict = np.concatenate([p[0] for p in pairs])
    first = np.concatenate([p[1] for p in pairs])
    rejected = np.zeros(len(store), bool)
    rejected[conflict] = True
    gathered = comm.gather(duplicates(store, rejected, mine, nb))
    if comm.rank != 0:
        return None
    return finish(store, conflict, first, np.concatenate([g[0] for g in gathered]),
                  np.concatenate([g[1] for g in gathered]))
