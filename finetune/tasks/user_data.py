"""The user's own labelled sequences (tasks `classify` and `regress`): CSV or TSV files, plain or compressed,
with a header naming a sequence column and a label column, one file per split.

Validation is a seeded random part of train when no file is given. Training and validation records that are
near-duplicates of a test record (`finetune.neardup`) are dropped and counted, as in every task here: a test set
with near-copies in training measures memory, not generalisation.
"""
from __future__ import annotations

import csv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from finetune.neardup import leakage_mask
from finetune.structure import StructureError, open_text, check_letters
from finetune.tasks.common import Splits

T = TypeVar("T")


@dataclass
class UserDataConfig:
    train: str = ""                   # CSV/TSV (.tsv: tab-separated; gzip/zstd fine) with a header row
    valid: str = ""                   # empty: valid_fraction of train, at random (seeded)
    test: str = ""
    sequence_column: str = "sequence"
    label_column: str = "label"
    valid_fraction: float = 0.1
    near_dup_kmer: int = 8                 # leakage filter (finetune.neardup): train/valid records whose distinct
    near_dup_containment: float = 0.5      # k-mers are this share in a test record's are dropped; kmer 0: kept
    near_dup_shared_run: int = 0           # also drop those sharing an identical stretch of this many nt; 0: no
    limit_train: int | None = None
    limit_valid: int | None = None
    limit_test: int | None = None
    seed: int = 0


def read_labelled(path: str, cfg: UserDataConfig, parse_label: Callable[[str, str], T]) -> list[tuple[str, T]]:
    """(sequence, parse_label(text, where)) per row. Errors name the file, line and reason."""
    text = open_text(Path(path))
    reader = csv.DictReader(text, delimiter="\t" if ".tsv" in [s.lower() for s in Path(path).suffixes] else ",")
    cols = reader.fieldnames or []
    missing = [c for c in (cfg.sequence_column, cfg.label_column) if c not in cols]
    if missing:
        raise StructureError(f"{path}: no column {', '.join(map(repr, missing))} in the header {cols} (set "
                             "--data.sequence_column / --data.label_column; a .tsv file is read tab-separated)")
    rows = []
    for lineno, row in enumerate(reader, 2):
        where = f"{path}:{lineno}"
        seq, label = (row[cfg.sequence_column] or "").strip(), (row[cfg.label_column] or "").strip()
        if not seq:
            raise StructureError(f"{where}: empty sequence")
        check_letters(seq, where)
        if not label:
            raise StructureError(f"{where}: empty label")
        rows.append((seq, parse_label(label, where)))
    if not rows:
        raise StructureError(f"{path}: no records")
    return rows


def required(path: str, option: str) -> str:
    if not path:
        raise ValueError(f"--data.{option} is required (a file of the {option} records)")
    return path


def user_splits(train: list[T], valid: list[T] | None, test: list[T], seq: Callable[[T], str], cfg: Any) -> Splits[T]:
    """Train/valid minus near-duplicates of test records, and validation drawn from train at random (seeded) when
    none is given. `cfg`: a data config with fields near_dup_{kmer,containment,shared_run}, valid_fraction, seed
    and limit_{train,valid,test}, as UserDataConfig."""
    pool = train + (valid or [])
    dup = (leakage_mask([seq(e) for e in pool], [seq(e) for e in test], cfg.near_dup_kmer,
                        cfg.near_dup_containment, cfg.near_dup_shared_run)
           if cfg.near_dup_kmer > 0 else np.zeros(len(pool), dtype=bool))
    n_train = len(train)
    train = [e for e, d in zip(train, dup[:n_train]) if not d]
    if valid is None:
        order = np.random.default_rng(cfg.seed).permutation(len(train))
        n_valid = int(round(cfg.valid_fraction * len(train)))
        train, valid = [train[i] for i in order[n_valid:]], [train[i] for i in order[:n_valid]]
    else:
        valid = [e for e, d in zip(valid, dup[n_train:]) if not d]
    splits = Splits(train, valid, test, int(dup.sum()))
    return splits.limited(cfg.limit_train, cfg.limit_valid, cfg.limit_test)


def removal_note(splits: Splits[Any]) -> str:
    return (f"{splits.removed_near_duplicates} train/valid record(s) were near-duplicates of test records "
            "(finetune.neardup) and were left out")


def files_used(cfg: UserDataConfig) -> dict[str, str]:
    return {"train": cfg.train, "valid": cfg.valid or f"{cfg.valid_fraction:g} of train (seed {cfg.seed})",
            "test": cfg.test}
