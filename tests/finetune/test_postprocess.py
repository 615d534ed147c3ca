"""Post-processing invariants (canonical, |i-j| >= 4, one partner, above threshold, greedy) and threshold tuning."""
from __future__ import annotations

import numpy as np
import pytest

from finetune.postprocess import THRESHOLD_GRID, canonical_mask, decode_at_thresholds, decode_pairs
from finetune.structure import StructureRecord
from finetune.tasks.ss import tune_threshold

CANON = {("A", "U"), ("U", "A"), ("G", "C"), ("C", "G"), ("G", "U"), ("U", "G")}


def sym_probs(n, rng):
    p = rng.random((n, n)) ** 3
    return (p + p.T) / 2


def test_threshold_grid_is_the_papers():
    assert THRESHOLD_GRID[0] == 0.01 and THRESHOLD_GRID[-1] == 0.29 and len(THRESHOLD_GRID) == 29


def test_canonical_mask():
    m = canonical_mask("GAAAACNNNNU")
    assert m[0, 5] and m[5, 0]            # G-C at distance 5
    assert m[0, 10] and m[10, 0]           # G-U wobble, in both orders
    assert canonical_mask("UAAAG")[0, 4]   # U-G: U first
    assert m[1, 10] and not m[1, 2]        # A-U pairs, A-A does not
    assert not m[6, 10]                    # N never pairs
    assert not canonical_mask("GAAC")[0, 3]  # |i-j| = 3: sharp loop
    assert canonical_mask("GAAAC")[0, 4] and canonical_mask("GAAAC")[4, 0]  # |i-j| = 4: the shortest hairpin pairs


def test_canonical_mask_ignores_case():
    """predict_ss hands decode_pairs the FASTA's letters as written: soft-masked (lower-case) bases pair too."""
    assert np.array_equal(canonical_mask("gaaaacnnnnu"), canonical_mask("GAAAACNNNNU"))
    assert canonical_mask("gaaaac")[0, 5] and canonical_mask("aaaaatttt")[0, 8]


def test_canonical_mask_a_u_and_t():
    m = canonical_mask("AAAAATTTT")
    assert m[0, 8] and m[0, 5] and not m[0, 4] and not m[0, 3]


@pytest.mark.parametrize("seed", range(5))
def test_invariants_on_random_inputs(seed):
    rng = np.random.default_rng(seed)
    n = 60
    seq = "".join(rng.choice(list("ACGUTN"), n))
    probs = sym_probs(n, rng)
    for thr in (0.01, 0.1, 0.29):
        pairs = decode_pairs(probs, seq, thr)
        assert len(pairs) > 0
        i, j = pairs[:, 0], pairs[:, 1]
        assert np.all(i < j) and np.all(j - i >= 4)
        assert len(np.unique(pairs.ravel())) == pairs.size                     # one partner per base
        assert all((seq[a].replace("T", "U"), seq[b].replace("T", "U")) in CANON for a, b in pairs)
        assert np.all(probs[i, j] > thr)
        assert np.all(np.diff(i) > 0)                                          # sorted by i


def test_greedy_takes_the_most_probable_pair_first():
    seq = "GGGGAAAACCCC"
    probs = np.zeros((12, 12))
    for (a, b), p in {(0, 11): 0.6, (0, 10): 0.9, (1, 11): 0.8, (1, 10): 0.3}.items():
        probs[a, b] = probs[b, a] = p
    # 0.9 (0,10) first; (0,11) and (1,10) conflict with it; then (1,11) 0.8 crosses nothing and is free
    assert decode_pairs(probs, seq, 0.1).tolist() == [[0, 10], [1, 11]]
    assert decode_pairs(probs, seq, 0.85).tolist() == [[0, 10]]
    assert decode_pairs(probs, seq, 0.95).tolist() == []


def test_ties_are_broken_by_i_then_j():
    """Equal probabilities: the documented order (i, j) decides, so a tie gives the same structure every run."""
    seq = "GGGGAAAACCCC"
    probs = np.zeros((12, 12))
    for a, b in [(0, 10), (0, 11), (1, 10), (1, 11)]:
        probs[a, b] = probs[b, a] = 0.5
    # (0, 10) comes first; (0, 11) and (1, 10) share a base with it; (1, 11) is free
    assert decode_pairs(probs, seq, 0.1).tolist() == [[0, 10], [1, 11]]
    probs[0, 10] = probs[10, 0] = 0.0
    # without (0, 10): (0, 11) first, which blocks (1, 11); then (1, 10)
    assert decode_pairs(probs, seq, 0.1).tolist() == [[0, 11], [1, 10]]


def test_a_pair_at_exactly_the_threshold_is_not_taken():
    """'probability > threshold', as decode_at_thresholds cuts: the two must agree at a grid value too."""
    seq = "GGGGAAAACCCC"
    probs = np.zeros((12, 12))
    probs[0, 11] = probs[11, 0] = 0.12
    probs[1, 10] = probs[10, 1] = 0.13
    assert decode_pairs(probs, seq, 0.12).tolist() == [[1, 10]]
    assert decode_pairs(probs, seq, 0.11).tolist() == [[0, 11], [1, 10]]
    assert [x.tolist() for x in decode_at_thresholds(probs, seq, [0.11, 0.12, 0.13])] == [
        [[0, 11], [1, 10]], [[1, 10]], []]


def test_non_canonical_high_probability_is_dropped():
    seq = "AAAAAAAAAA"
    probs = np.full((10, 10), 0.99)
    assert decode_pairs(probs, seq, 0.01).shape == (0, 2)


def test_decode_at_thresholds_equals_separate_decodes():
    rng = np.random.default_rng(7)
    seq = "".join(rng.choice(list("ACGU"), 50))
    probs = sym_probs(50, rng) * 0.4
    many = decode_at_thresholds(probs, seq, THRESHOLD_GRID)
    for thr, pairs in zip(THRESHOLD_GRID, many):
        assert pairs.tolist() == decode_pairs(probs, seq, thr).tolist()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="does not match sequence length"):
        decode_pairs(np.zeros((5, 5)), "ACGUACGU", 0.1)


def test_tune_threshold_finds_the_separating_value():
    # true pairs get probability 0.2, decoys 0.12: any threshold in [0.12, 0.2) gives F1 1; lowest such wins
    seq = "GGGGAAAACCCCAAAAGGGGAAAACCCC"
    n = len(seq)
    true = np.array([[0, 11], [1, 10], [16, 27], [17, 26]])
    probs = np.zeros((n, n))
    probs[true[:, 0], true[:, 1]] = 0.2
    probs[2, 25] = 0.12  # a G-C decoy
    probs = probs + probs.T
    grid = list(THRESHOLD_GRID)
    thr, f1 = tune_threshold([decode_at_thresholds(probs, seq, grid)], [StructureRecord("r", seq, true)], grid,
                             shift=False)
    assert thr == 0.12 and f1 == 1.0
    grid.reverse()  # --eval.thresholds in any order (the first best once won: 0.19 here)
    assert tune_threshold([decode_at_thresholds(probs, seq, grid)], [StructureRecord("r", seq, true)], grid,
                          shift=False) == (0.12, 1.0)


def test_tune_threshold_scores_with_the_metric_it_is_asked_for():
    """A near miss at a low threshold: the +-1 F1 (tune_on f1_shift, the paper's) prefers it, the exact F1 does not."""
    seq = "GGGGAAAACCCC"
    true = np.array([[0, 11], [2, 9]])
    probs = np.zeros((12, 12))
    probs[0, 11] = probs[11, 0] = 0.25   # a true pair
    probs[2, 8] = probs[8, 2] = 0.1      # (2, 9) one base off
    grid = list(THRESHOLD_GRID)
    per_seq = [decode_at_thresholds(probs, seq, grid)]
    records = [StructureRecord("r", seq, true)]
    assert tune_threshold(per_seq, records, grid, shift=True) == (0.01, 1.0)
    thr, f1 = tune_threshold(per_seq, records, grid, shift=False)
    assert thr == 0.1 and f1 == pytest.approx(2 / 3)
