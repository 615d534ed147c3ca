"""No test record of splice or MRL has a near-copy in that task's training or validation data (real data).

Splice windows are 400-nt genomic windows: GUE dev holds windows of the same loci as test windows, shifted by a
few to a few hundred nt. MRL's varying-length human UTRs are the same UTRs cut to several lengths, and the
designed library holds SNV variants of each UTR, so a plain random split puts near-copies on both sides.
"""
from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest

from finetune.neardup import kmer_matrix, leakage_mask, near_duplicate_mask, shared_run_mask
from finetune.tasks import mrl, splice


def _leaks(train_valid: list[str], test: list[str]) -> int:
    return int(near_duplicate_mask(train_valid, test).sum())


def _sharing_a_stretch(train_valid: list[str], test: list[str], run: int = 50) -> int:
    """Plainly: windows holding a `run`-nt substring of some test window (windows of one locus, shifted)."""
    stretches = {t[i:i + run] for t in test for i in range(len(t) - run + 1)}
    return sum(any(w[i:i + run] in stretches for i in range(len(w) - run + 1)) for w in train_valid)


def test_splice_training_windows_do_not_overlap_test_windows(shared_data):
    """The k-mer rule alone let windows shifted by 200-350 nt through (289 shared a 50-nt stretch with a test
    window, 168 a 100-nt one): they overlap by less than half of their length."""
    s = splice.load_splits(splice.SpliceDataConfig(root=str(shared_data)))
    dev, test = [seq for seq, _ in s.train + s.valid], [seq for seq, _ in s.test]
    assert _leaks(dev, test) == 0 and _sharing_a_stretch(dev, test) == 0
    assert len(s.test) == 4562 and s.removed_near_duplicates > 31  # more than the 31 exact copies
    assert len(s.train) + len(s.valid) + s.removed_near_duplicates + s.removed_valid_near_train == 4562
    train, valid = [seq for seq, _ in s.train], [seq for seq, _ in s.valid]  # the epoch kept is chosen on valid
    assert s.removed_valid_near_train > 0 and _leaks(valid, train) == 0 and _sharing_a_stretch(valid, train) == 0


def test_shared_stretches_are_found_only_in_acgu_runs_of_full_length():
    rng = np.random.default_rng(0)
    locus = "".join(rng.choice(list("ACGU"), 800))
    windows = [locus[shift:shift + 400] for shift in (0, 150, 349, 350, 351)]
    assert shared_run_mask(windows, [locus[:400]]).tolist() == [True, True, True, True, False]
    dna = locus[300:400].replace("U", "t")  # DNA letters and case of the same bases
    cut = locus[:30] + "N" + locus[31:79]  # an N leaves 48- and 30-nt runs
    assert shared_run_mask([dna, cut, locus[:49]], ["GGG", locus[:400]]).tolist() == [True, False, False]
    assert shared_run_mask([locus], []).tolist() == [False] and shared_run_mask([], [locus]).tolist() == []


def test_containment_counts_distinct_kmers():
    """A k-mer repeated in a sequence counts once: a poly-A run is one 8-mer, not a share of the sequence per copy."""
    m = kmer_matrix(["A" * 12, "ACGUACGUACGU", "ACGNACGUACGU"])
    assert m.toarray().max() == 1 and np.asarray(m.sum(axis=1)).ravel().tolist() == [1, 4, 1]


def test_a_reference_of_one_or_two_windows_matches_each_of_them():
    """The reference's hashes are few here: the largest one and a lone one must match like any other."""
    locus = "".join(np.random.default_rng(1).choice(list("ACGU"), 51))
    assert shared_run_mask([locus[:50], locus[1:]], [locus]).tolist() == [True, True]
    assert shared_run_mask([locus[:50], locus[1:]], [locus[:50]]).tolist() == [True, False]


def test_an_exact_copy_of_a_test_sequence_is_left_out_whatever_its_length_or_letters():
    """From a user review: sequences shorter than k (8 nt) or without ACGU k-mers have no k-mer to share, so even
    their exact copies went through to training. `near_dup_kmer=0` still keeps everything (documented)."""
    short, unknown, kept = "ACGUAC", "NNNNNNNNNNNN", "GGGAAAUCCCUUAGC"
    test = [short.lower().replace("U", "T"), unknown]
    assert leakage_mask([short, unknown, kept], test).tolist() == [True, True, False]
    assert leakage_mask([short, unknown, kept], test, k=0).tolist() == [False, False, False]
    assert leakage_mask([], test).tolist() == []  # (no candidate: an empty list is no bool array)


@pytest.mark.parametrize("file", ["varlen", "designed"])
def test_mrl_test_utrs_have_no_near_copy_in_train_or_valid(shared_data, file):
    """The k-mer rule alone kept 22 varlen and 85 designed records sharing a 25-nt stretch with a test UTR."""
    s = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data), file=file))
    train_valid, test = [e.sequence for e in s.train + s.valid], [e.sequence for e in s.test]
    assert _leaks(train_valid, test) == 0 and _sharing_a_stretch(train_valid, test, run=25) == 0
    assert s.removed_near_duplicates > 0
    total = {"varlen": 15200, "designed": 25000}[file]
    assert len(s.train) + len(s.valid) + len(s.test) + s.removed_near_duplicates + s.removed_valid_near_train == total
    # validation picks the epoch kept: before, a third (varlen) to half (designed) of it had a near-copy in train
    train, valid = [e.sequence for e in s.train], [e.sequence for e in s.valid]
    assert _leaks(valid, train) == 0 and _sharing_a_stretch(valid, train, run=25) == 0
    assert s.removed_valid_near_train > {"varlen": 200, "designed": 1000}[file]


def test_mrl_test_part_is_the_same_random_sample_as_before_the_filter(shared_data):
    """Models trained before the filter are still evaluated on the records they never saw."""
    s = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data)))
    assert len(s.test) == len(s.valid) + s.removed_valid_near_train == 1520
    assert {e.group for e in s.test} == {"random", "human"}
    other = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data), valid_fraction=0.2, seed=1))
    assert len(other.test) == 1520 and len(other.valid) + other.removed_valid_near_train == 3040
    assert len({e.sequence for e in s.test} & {e.sequence for e in other.test}) < 0.2 * 1520  # --data.seed draws it


def test_mrl_split_drops_records_sharing_a_stretch_with_a_test_utr(tmp_path):
    """Pairs of 80-nt UTRs sharing 30 nt (under half their 8-mers): no test UTR keeps its partner in training."""
    rng = np.random.default_rng(1)
    rows = []
    for _ in range(100):
        common = "".join(rng.choice(list("ACGU"), 30))
        rows += ["".join(rng.choice(list("ACGU"), 50)) + common, common + "".join(rng.choice(list("ACGU"), 50))]
    (tmp_path / "mrl").mkdir()
    with gzip.open(tmp_path / mrl.MRL_FILES["egfp"], "wt", newline="") as f:
        w = csv.writer(f)
        w.writerow(["utr", "rl"])
        w.writerows([u, 5.0] for u in rows)

    def split(run: int) -> tuple[list[str], list[str], int, int]:
        s = mrl.load_splits(mrl.MRLDataConfig(root=str(tmp_path), file="egfp", near_dup_shared_run=run))
        return ([e.sequence for e in s.train + s.valid], [e.sequence for e in s.test], s.removed_near_duplicates,
                s.removed_valid_near_train)

    kept, test, removed, _ = split(0)
    assert removed == 0 and _sharing_a_stretch(kept, test, run=30) > 0  # the k-mer rule misses them
    kept, test, removed, valid_removed = split(25)
    assert _sharing_a_stretch(kept, test, run=30) == 0 and len(test) == 20 and valid_removed > 0
    assert removed == _sharing_a_stretch(split(0)[0], test, run=30) and len(kept) + removed + valid_removed == 180
