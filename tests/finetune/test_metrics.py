"""The paper's F1 on hand-checked cases, and against an independent sklearn/matrix re-statement."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score

from finetune.metrics import mean_scores, pair_scores, ss_report


def P(*pairs):
    return np.array(pairs, dtype=np.int64).reshape(-1, 2)


def test_identical_structures_score_one():
    s = pair_scores(P((0, 10), (1, 9), (2, 8)), P((0, 10), (1, 9), (2, 8)), 12)
    assert (s.precision, s.recall, s.f1) == (1.0, 1.0, 1.0)


def test_exact_vs_shifted_hand_checked():
    true, pred = P((0, 10), (2, 8)), P((0, 11), (5, 7))
    exact = pair_scores(true, pred, 12)
    assert (exact.precision, exact.recall, exact.f1) == (0.0, 0.0, 0.0)
    soft = pair_scores(true, pred, 12, shift=True)
    # (0,11) is (0,10) with j+1: one of two predictions right, one of two true pairs recalled
    assert (soft.precision, soft.recall, soft.f1) == (0.5, 0.5, 0.5)


def test_shift_is_one_coordinate_only():
    # (1,11) moves both ends of (0,10): not a +-1 match
    assert pair_scores(P((0, 10)), P((1, 11)), 12, shift=True).f1 == 0.0
    # (1,10) and (0,9) are; two predictions near one true pair both count for precision
    s = pair_scores(P((0, 10)), P((1, 10), (0, 9)), 12, shift=True)
    assert (s.precision, s.recall) == (1.0, 1.0)


def test_partial_prediction():
    true = P((0, 20), (1, 19), (2, 18), (3, 17))
    s = pair_scores(true, P((0, 20), (1, 19), (5, 12)), 21)
    assert s.precision == pytest.approx(2 / 3) and s.recall == pytest.approx(0.5)
    assert s.f1 == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))


def test_empty_structures_follow_the_paper():
    # sklearn zero_division=0 in the original: no predictions -> P = 0; no true pairs -> R = 0; F1 = 0
    assert pair_scores(P((0, 10)), P(), 12).f1 == 0.0
    assert pair_scores(P(), P((0, 10)), 12).f1 == 0.0
    both = pair_scores(P(), P(), 12, shift=True)
    assert (both.precision, both.recall, both.f1) == (0.0, 0.0, 0.0)


def test_pseudoknotted_pairs_count_like_any_other():
    true = P((0, 12), (1, 11), (5, 18), (6, 17))  # (0,12) x (5,18) cross
    s = pair_scores(true, P((0, 12), (1, 11), (5, 18)), 20)
    assert s.precision == 1.0 and s.recall == 0.75


def test_edges_do_not_wrap():
    # a pair at the last position shifted by +1 would leave the matrix; it must not alias another pair
    assert pair_scores(P((0, 11)), P((1, 11)), 12, shift=True).f1 == 1.0
    # (1, 0) would be (0, 11) shifted to j = 12 if keys wrapped at the row end
    assert pair_scores(P((0, 11)), P((1, 5)), 12, shift=True).f1 == 0.0
    assert pair_scores(P((1, 11)), P((2, 5)), 12, shift=True).f1 == 0.0


def test_mean_is_per_sequence_not_pooled():
    items = [(P((0, 10)), P((0, 10)), 12),                                      # F1 1
             (P(*[(i, 40 - i) for i in range(10)]), P((30, 35)), 41)]            # F1 0
    assert mean_scores(items).f1 == 0.5
    rep = ss_report(items)
    assert rep["n"] == 2 and rep["f1"] == 0.5 and rep["f1_shift"] == 0.5
    with pytest.raises(ValueError, match="no sequences to score"):  # not a mean of nothing (NaN, or 0)
        mean_scores([])


def test_ss_report_puts_each_mean_under_its_name():
    """Six different means: a precision reported as recall, or an exact figure as the shifted one, shows."""
    items = [(P((0, 10), (1, 9)), P((0, 11)), 12),              # exact P 0 R 0; shifted P 1 R 1/2
             (P((0, 10)), P((0, 10), (2, 7), (3, 6)), 12)]      # P 1/3 R 1 either way
    rep = ss_report(items)
    assert rep == pytest.approx({"n": 2, "precision": 1 / 6, "recall": 0.5, "f1": 0.25,
                                 "precision_shift": 2 / 3, "recall_shift": 0.75, "f1_shift": 7 / 12})


def _reference(true, pred, n, shift):
    """The paper's recipe on matrices: relax the target for precision, the prediction for recall (sklearn)."""
    def mat(pairs):
        m = np.zeros((n, n), dtype=int)
        m[pairs[:, 0], pairs[:, 1]] = 1
        m[pairs[:, 1], pairs[:, 0]] = 1
        return m

    def relax(m):
        p = np.pad(m, 1)
        r = p + np.roll(p, 1, 0) + np.roll(p, -1, 0) + np.roll(p, 1, 1) + np.roll(p, -1, 1)
        return (r[1:-1, 1:-1] > 0).astype(int)

    t, p = mat(true), mat(pred)
    iu = np.triu_indices(n, 1)
    prec = precision_score((relax(t) if shift else t)[iu], p[iu], zero_division=0)
    rec = recall_score(t[iu], (relax(p) if shift else p)[iu], zero_division=0)
    return prec, rec


@pytest.mark.parametrize("shift", [False, True])
def test_matches_matrix_reference_on_random_structures(shift):
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(6, 40))

        def rand_pairs():
            perm = rng.permutation(n)[: 2 * int(rng.integers(0, n // 3 + 1))]
            return np.sort(perm.reshape(-1, 2), axis=1)

        true, pred = rand_pairs(), rand_pairs()
        if rng.random() < 0.5 and len(true):  # make some near misses
            pred = np.clip(true + rng.integers(-1, 2, size=true.shape) * (rng.random(true.shape) < 0.5), 0, n - 1)
            pred = pred[pred[:, 0] < pred[:, 1]]
            _, first = np.unique(pred.ravel(), return_index=True)
            keep = np.zeros(pred.size, bool)
            keep[first] = True
            pred = pred[keep.reshape(-1, 2).all(1)]
        s = pair_scores(true, pred, n, shift=shift)
        ref_p, ref_r = _reference(true, pred, n, shift)
        assert s.precision == pytest.approx(ref_p) and s.recall == pytest.approx(ref_r)


def test_markdown_table_rows_columns_and_number_formats(tmp_path):
    from finetune.results import markdown_table, write_results

    table = markdown_table({"TS0": {"f1": 0.61234, "n": 473, "mcc": None}, "VL0": {"f1": 0.5}}, ["f1", "mcc", "n"])
    assert table == ("| test set | f1 | mcc | n |\n|---|---|---|---|\n| TS0 | 0.612 | n/a | 473 |\n"
                     "| VL0 | 0.500 |  |  |\n")
    write_results(tmp_path / "out", "results", {"f1": 0.5}, table)
    assert (tmp_path / "out" / "results.md").read_text() == table
    assert (tmp_path / "out" / "results.json").read_text() == '{\n  "f1": 0.5\n}\n'
