"""No test record of splice or MRL has a near-copy in that task's training or validation data (real data).

Splice windows are 400-nt genomic windows: GUE dev holds windows of the same loci as test windows, shifted by a
few to a few hundred nt. MRL's varying-length human UTRs are the same UTRs cut to several lengths, and the
designed library holds SNV variants of each UTR, so a plain random split puts near-copies on both sides.
"""
from __future__ import annotations

import pytest

from finetune.neardup import near_duplicate_mask
from finetune.tasks import mrl, splice


def _leaks(train_valid: list[str], test: list[str]) -> int:
    return int(near_duplicate_mask(train_valid, test).sum())


def test_splice_training_windows_do_not_overlap_test_windows(shared_data):
    s = splice.load_splits(splice.SpliceDataConfig(root=str(shared_data)))
    assert _leaks([seq for seq, _ in s.train + s.valid], [seq for seq, _ in s.test]) == 0
    assert len(s.test) == 4562 and s.removed_near_duplicates > 31  # more than the 31 exact copies
    assert len(s.train) + len(s.valid) + s.removed_near_duplicates == 4562


@pytest.mark.parametrize("file", ["varlen", "designed"])
def test_mrl_test_utrs_have_no_near_copy_in_train_or_valid(shared_data, file):
    s = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data), file=file))
    assert _leaks([e.sequence for e in s.train + s.valid], [e.sequence for e in s.test]) == 0
    assert s.removed_near_duplicates > 0
    total = {"varlen": 15200, "designed": 25000}[file]
    assert len(s.train) + len(s.valid) + len(s.test) + s.removed_near_duplicates == total


def test_mrl_test_part_is_the_same_random_sample_as_before_the_filter(shared_data):
    """Models trained before the filter are still evaluated on the records they never saw."""
    s = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data)))
    assert len(s.test) == len(s.valid) == 1520
    assert {e.group for e in s.test} == {"random", "human"}
