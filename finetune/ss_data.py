"""Secondary-structure data sets: bpRNA (SPOT-RNA TR0/VL0/TS0 marks) and ArchiveII leave-one-family-out.

ArchiveII inter-family folds follow the paper: the held-out family is the test set, the other families are
split at random into train/validation. On top of that, every non-test record that is a near-duplicate of any
test record (`finetune.neardup`: shared distinct 8-mers cover at least half of the smaller sequence's) is
removed from train/validation ("leakage filter"), and so is every validation record that is a near-duplicate of
a training record (the paper's split kept them). The counts removed are reported with every fold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.neardup import near_duplicate_mask
from finetune.structure import StructureRecord, read_structure_csv
from finetune.tasks.common import data_file

BPRNA_FILE = "ss/bpRNA-1m90_len10-100.csv.gz"
ARCHIVEII_FILE = "ss/archiveII_3975.csv.gz"
BPRNA_SPLITS = ("TR0", "VL0", "TS0")
# The paper's 9 held-out families (ArchiveII prefixes); grp2 (11 records) is never a test family.
ARCHIVEII_FAMILIES: tuple[str, ...] = ("5s", "srp", "tRNA", "tmRNA", "RNaseP", "grp1", "16s", "telomerase", "23s")


@dataclass
class SSSplits:
    train: list[StructureRecord]
    valid: list[StructureRecord]
    test: list[StructureRecord]
    info: dict = field(default_factory=dict)


def load_bprna(data_root: str | Path) -> dict[str, list[StructureRecord]]:
    """bpRNA-1m(90) <= 100 nt records by SPOT-RNA split (TR0, VL0, TS0); unmarked records are dropped."""
    out: dict[str, list[StructureRecord]] = {s: [] for s in BPRNA_SPLITS}
    for rec, row in read_structure_csv(data_file(data_root, BPRNA_FILE)):
        if row["spot_split"] in out:
            out[row["spot_split"]].append(rec)
    return out


def bprna_splits(data_root: str | Path) -> SSSplits:
    s = load_bprna(data_root)
    return SSSplits(s["TR0"], s["VL0"], s["TS0"], {"dataset": "bpRNA", "test": "TS0"})


def load_archiveii(data_root: str | Path) -> list[tuple[StructureRecord, str]]:
    """(record, family_prefix) for all 3,975 ArchiveII structures."""
    return [(rec, row["family_prefix"]) for rec, row in read_structure_csv(data_file(data_root, ARCHIVEII_FILE))]


def archiveii_fold(records: list[tuple[StructureRecord, str]], test_family: str, valid_fraction: float = 0.1,
                   seed: int = 0, kmer: int = 8, max_containment: float = 0.5) -> SSSplits:
    """Leave `test_family` out: test = that family; train/valid = the rest minus near-duplicates of the test set."""
    if test_family not in {fam for _, fam in records}:
        raise ValueError(f"unknown ArchiveII family {test_family!r}; families: {', '.join(ARCHIVEII_FAMILIES)}")
    test = [r for r, fam in records if fam == test_family]
    rest = [r for r, fam in records if fam != test_family]
    dup = near_duplicate_mask([r.sequence for r in rest], [r.sequence for r in test], kmer, max_containment)
    kept = [r for r, d in zip(rest, dup) if not d]
    order = np.random.default_rng(seed).permutation(len(kept))
    n_valid = max(1, int(round(valid_fraction * len(kept))))
    valid = [kept[i] for i in order[:n_valid]]
    train = [kept[i] for i in order[n_valid:]]
    # the epoch and threshold kept are the best on validation: near-copies of training records (three in four
    # of a random draw, ArchiveII holding many variants of each structure) would pick the one that memorised best
    valid_dup = near_duplicate_mask([r.sequence for r in valid], [r.sequence for r in train], kmer, max_containment)
    valid = [r for r, d in zip(valid, valid_dup) if not d]
    info = {"dataset": "ArchiveII", "test": test_family, "removed_near_duplicates": int(dup.sum()),
            "removed_valid_near_train": int(valid_dup.sum()),
            "removed_ids": [r.id for r, d in zip(rest, dup) if d][:50],
            "near_duplicate_rule": f"shared distinct {kmer}-mers >= {max_containment} of the smaller sequence's"}
    return SSSplits(train, valid, test, info)
