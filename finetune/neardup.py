"""Near-duplicate detection between a training pool and a test set (the leakage filter of every task split).

Two sequences are near-duplicates when the shared distinct k-mers (default 8) cover at least
`max_containment` (default 0.5) of the smaller sequence's k-mers. For substitutions spread evenly that is
roughly >= 92% identity; real near-copies (the same gene elsewhere, a UTR cut to another length, an SNV
variant, a genomic window shifted by a few hundred nt) share long identical stretches and score far higher.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from finetune.structure import nucleotide_codes, to_rna

_CHUNK = 4096  # candidate rows per dense block: bounds memory at _CHUNK x len(reference) floats
MAX_KMER = 12  # the k-mer matrix has 4^k columns: its index takes 134 MB at k 12, 34 GB at k 16 (k 32 overflowed)


def filter_option_problems(kmer: int, containment: float, shared_run: int) -> list[str]:
    """What is wrong with `leakage_mask`'s options as the near_dup_* options of a data config."""
    problems = []
    if not 0 <= kmer <= MAX_KMER:
        problems.append(f"--data.near_dup_kmer must be in 0..{MAX_KMER} (0: no k-mer check), got {kmer}")
    if not 0 < containment <= 1:
        problems.append(f"--data.near_dup_containment must be in (0, 1], got {containment}")
    if shared_run < 0:
        problems.append(f"--data.near_dup_shared_run must be >= 0 (0: no such check), got {shared_run}")
    return problems


def kmer_matrix(seqs: list[str], k: int = 8) -> sp.csr_matrix:
    """Binary [n, 4^k] matrix of the distinct k-mers (over ACGU; k-mers with other letters skipped) of each sequence."""
    rows, cols = [], []
    for r, s in enumerate(seqs):
        x = nucleotide_codes(s)
        if len(x) < k:
            continue
        win = np.lib.stride_tricks.sliding_window_view(x, k)
        ok = (win >= 0).all(axis=1)
        ids = np.unique((win[ok] * (4 ** np.arange(k - 1, -1, -1))).sum(axis=1))
        rows.append(np.full(len(ids), r))
        cols.append(ids)
    data_rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    data_cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
    return sp.csr_matrix((np.ones(len(data_rows), dtype=np.float32), (data_rows, data_cols)),
                         shape=(len(seqs), 4 ** k))


def _run_hashes(seqs: list[str], run: int) -> tuple[np.ndarray, np.ndarray]:
    """(64-bit hash, sequence index) of every window of `run` nt over ACGU only, all sequences at once (a hash
    collision only drops a training record: the safe side of a leakage filter)."""
    x = np.concatenate([np.append(nucleotide_codes(s), -1) for s in seqs] or [np.full(1, -1)])  # -1 ends each sequence
    n = len(x) - run + 1
    if n <= 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(seqs)), [len(s) + 1 for s in seqs])[:n]
    invalid = np.concatenate([[0], np.cumsum(x < 0)])
    ok = invalid[run:run + n] == invalid[:n]
    v = np.where(x < 0, 0, x + 1).astype(np.uint64)
    h = np.zeros(n, np.uint64)
    for j in range(run):  # polynomial hash, wrapping modulo 2^64
        h = h * np.uint64(0x9E3779B97F4A7C15) + v[j:j + n]
    return h[ok], owner[ok]


def shared_run_mask(candidates: list[str], reference: list[str], run: int = 50) -> np.ndarray:
    """True for each candidate that shares an identical stretch of `run` nt with some reference sequence: two
    windows of one genome that overlap by that much, whatever their k-mer containment."""
    ref = np.unique(_run_hashes(reference, run)[0])
    h, owner = _run_hashes(candidates, run)
    out = np.zeros(len(candidates), dtype=bool)
    if len(ref):
        at = np.minimum(np.searchsorted(ref, h), len(ref) - 1)
        out[owner[ref[at] == h]] = True
    return out


def near_duplicate_mask(candidates: list[str], reference: list[str], k: int = 8,
                        max_containment: float = 0.5) -> np.ndarray:
    """True for each candidate whose k-mer containment with some reference sequence reaches max_containment."""
    a, b = kmer_matrix(candidates, k), kmer_matrix(reference, k)
    na, nb = np.asarray(a.sum(axis=1)).ravel(), np.asarray(b.sum(axis=1)).ravel()
    out = np.zeros(len(candidates), dtype=bool)
    for start in range(0, len(candidates), _CHUNK):
        stop = start + _CHUNK
        shared = (a[start:stop] @ b.T).toarray()
        denom = np.maximum(np.minimum(na[start:stop, None], nb[None, :]), 1)
        out[start:stop] = ((shared / denom) >= max_containment).any(axis=1)
    return out


def leakage_mask(candidates: list[str], reference: list[str], k: int = 8, max_containment: float = 0.5,
                 shared_run: int = 0) -> np.ndarray:
    """The filter of a task split: near-duplicates by the k-mer rule (k > 0; with exact copies, as sequences shorter
    than k or without ACGU k-mers have none to share), or (shared_run > 0) candidates sharing an identical stretch
    of `shared_run` nt with some reference sequence."""
    out = np.zeros(len(candidates), bool)
    if k > 0:
        copies = {to_rna(s) for s in reference}
        exact = np.array([to_rna(s) in copies for s in candidates], dtype=bool)
        out = near_duplicate_mask(candidates, reference, k, max_containment) | exact
    if shared_run:
        out |= shared_run_mask(candidates, reference, shared_run)
    return out
