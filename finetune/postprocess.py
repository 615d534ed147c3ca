"""Pair-probability matrix -> secondary structure, as the original `prob_mat_to_sec_struct`.

1. only canonical pairs (AU, GC, GU in either order; T counts as U; anything else never pairs);
2. no sharp loops: |i - j| >= 4 (at least 3 unpaired bases in a hairpin);
3. probability > threshold;
4. one partner per base, greedily by probability: take the most probable remaining pair, drop every
   other candidate that shares a base with it, repeat (ties broken by (i, j) order).
Greedy acceptance does not depend on the threshold (a lower threshold only appends less probable
candidates), so `decode_at_thresholds` decodes once and cuts at every threshold.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from finetune.structure import nucleotide_codes

MIN_PAIR_DISTANCE = 4
CANONICAL = frozenset({("A", "U"), ("U", "A"), ("G", "C"), ("C", "G"), ("G", "U"), ("U", "G")})
# Paper's threshold grid: 0.01, 0.02, ..., 0.29.
THRESHOLD_GRID: tuple[float, ...] = tuple(round(0.01 * k, 2) for k in range(1, 30))

_CANON_TABLE = np.zeros((5, 5), dtype=bool)  # by nucleotide_codes; -1 (other letters) is the last row/column
for _a, _b in CANONICAL:
    _CANON_TABLE["ACGU".index(_a), "ACGU".index(_b)] = True


def canonical_mask(sequence: str) -> np.ndarray:
    """bool [L, L]: True where (i, j) may pair (canonical and |i - j| >= MIN_PAIR_DISTANCE)."""
    codes = nucleotide_codes(sequence)
    mask = _CANON_TABLE[codes[:, None], codes[None, :]]
    idx = np.arange(len(codes))
    return mask & (np.abs(idx[:, None] - idx[None, :]) >= MIN_PAIR_DISTANCE)


def _greedy_candidates(probs: np.ndarray, sequence: str, min_prob: float) -> tuple[np.ndarray, np.ndarray]:
    """Accepted pairs (i < j) and their probabilities, in decreasing probability, for threshold min_prob."""
    n = len(sequence)
    if probs.shape != (n, n):
        raise ValueError(f"probability matrix shape {probs.shape} does not match sequence length {n}")
    allowed = np.triu(canonical_mask(sequence), k=1) & (probs > min_prob)
    i, j = np.nonzero(allowed)
    p = probs[i, j]
    order = np.lexsort((j, i, -p))
    used = np.zeros(n, dtype=bool)
    keep = np.zeros(len(order), dtype=bool)
    for k, idx in enumerate(order):
        a, b = i[idx], j[idx]
        if not used[a] and not used[b]:
            used[a] = used[b] = True
            keep[k] = True
    chosen = order[keep]
    return np.stack([i[chosen], j[chosen]], axis=1).astype(np.int64), p[chosen]


def decode_pairs(probs: np.ndarray, sequence: str, threshold: float) -> np.ndarray:
    """Pairs (0-based, i < j, sorted by i) predicted from a symmetric probability matrix."""
    pairs, _ = _greedy_candidates(probs, sequence, threshold)
    return pairs[np.argsort(pairs[:, 0], kind="stable")]


def decode_at_thresholds(probs: np.ndarray, sequence: str, thresholds: Sequence[float]) -> list[np.ndarray]:
    """`decode_pairs` at every threshold, with one greedy pass at the lowest."""
    pairs, p = _greedy_candidates(probs, sequence, min(thresholds))
    out = []
    for t in thresholds:
        sel = pairs[p > t]
        out.append(sel[np.argsort(sel[:, 0], kind="stable")])
    return out
