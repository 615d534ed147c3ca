"""Secondary-structure scores as in the RiNALMo paper: per-sequence precision, recall, F1, then the mean.

Exact: a predicted pair counts when it is a true pair. Shifted ("soft matching", the number the paper
reports): a predicted pair (i, j) also counts when a true pair is (i+-1, j) or (i, j+-1); symmetrically a
true pair is recalled when such a neighbour was predicted. Precision with no predicted pairs is 0, recall
with no true pairs is 0 (sklearn's zero_division=0, the original's behaviour), and F1 is 0 when P + R = 0
- so a sequence with no true and no predicted pairs scores 0, as in the original.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

_SHIFTS = np.array([[0, 0], [1, 0], [-1, 0], [0, 1], [0, -1]], dtype=np.int64)


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float


def _keys(pairs: np.ndarray, length: int) -> np.ndarray:
    # stride length + 2 and an offset of 1 so that shifted positions (-1 .. length) never alias
    return (pairs[:, 0] + 1) * (length + 2) + (pairs[:, 1] + 1)


def _relaxed_keys(pairs: np.ndarray, length: int) -> np.ndarray:
    shifted = (pairs[:, None, :] + _SHIFTS[None, :, :]).reshape(-1, 2)
    return _keys(shifted, length)


def pair_scores(true: np.ndarray, pred: np.ndarray, length: int, shift: bool = False) -> PRF:
    """Precision, recall and F1 of predicted pairs against true pairs (0-based, i < j) of one sequence."""
    true_keys, pred_keys = _keys(true, length), _keys(pred, length)
    if shift:
        tp_pred = np.isin(pred_keys, _relaxed_keys(true, length)).sum()
        tp_true = np.isin(true_keys, _relaxed_keys(pred, length)).sum()
    else:
        tp_pred = tp_true = np.isin(pred_keys, true_keys).sum()
    precision = float(tp_pred / len(pred_keys)) if len(pred_keys) else 0.0
    recall = float(tp_true / len(true_keys)) if len(true_keys) else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return PRF(precision, recall, f1)


def mean_scores(items: Iterable[tuple[np.ndarray, np.ndarray, int]], shift: bool = False) -> PRF:
    """Mean over sequences of per-sequence P, R, F1; items are (true_pairs, pred_pairs, length)."""
    scores = [pair_scores(t, p, n, shift) for t, p, n in items]
    if not scores:
        raise ValueError("no sequences to score")
    return PRF(*(float(np.mean([getattr(s, k) for s in scores])) for k in ("precision", "recall", "f1")))


def ss_report(items: list[tuple[np.ndarray, np.ndarray, int]]) -> dict[str, float]:
    """Exact and +-1 shifted mean P/R/F1 plus the sequence count, as one flat dict for results tables."""
    exact, shifted = mean_scores(items, shift=False), mean_scores(items, shift=True)
    return {"n": len(items),
            "precision": exact.precision, "recall": exact.recall, "f1": exact.f1,
            "precision_shift": shifted.precision, "recall_shift": shifted.recall, "f1_shift": shifted.f1}
