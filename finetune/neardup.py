"""Near-duplicate detection between a training pool and a test set (the leakage filter of every task split).

Two sequences are near-duplicates when the shared distinct k-mers (default 8) cover at least
`max_containment` (default 0.5) of the smaller sequence's k-mers. For substitutions spread evenly that is
roughly >= 92% identity; real near-copies (the same gene elsewhere, a UTR cut to another length, an SNV
variant, a genomic window shifted by a few hundred nt) share long identical stretches and score far higher.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

_CHUNK = 4096  # candidate rows per dense block: bounds memory at _CHUNK x len(reference) floats


def kmer_matrix(seqs: list[str], k: int = 8) -> sp.csr_matrix:
    """Binary [n, 4^k] matrix of the distinct k-mers (over ACGU; k-mers with other letters skipped) of each sequence."""
    code = np.full(256, -1, dtype=np.int64)
    for c, v in zip("ACGU", range(4)):
        code[ord(c)] = code[ord(c.lower())] = v
    code[ord("T")] = code[ord("t")] = 3
    rows, cols = [], []
    for r, s in enumerate(seqs):
        x = code[np.frombuffer(s.encode("ascii"), dtype=np.uint8)]
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
