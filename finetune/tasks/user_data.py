"""The user's own labelled sequences (tasks `classify` and `regress`): CSV or TSV files, plain or compressed,
with a header naming a sequence column and a label column, or FASTA files whose headers carry `key=value`
labels; one file per split.

Validation is a seeded random part of train when no file is given. Training and validation records that are
near-duplicates of a test record (`finetune.neardup`) are dropped and counted, as in every task here: a test set
with near-copies in training measures memory, not generalisation.
"""
from __future__ import annotations

import csv
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from finetune.neardup import leakage_mask
from finetune.structure import (FastaRecord, StructureError, check_letters, content_suffixes, header_label,
                                open_text, read_fasta, to_rna)
from finetune.tasks.common import CheckedSplitOptions, Splits

T = TypeVar("T")


@dataclass
class UserDataConfig(CheckedSplitOptions):
    train: str = ""                   # CSV/TSV (.tsv: tab-separated) with a header row, or FASTA (.fa/.fasta/
                                      # .fna/.fas: the label is label_column=value in each header); gz/zst fine
    valid: str = ""                   # empty: valid_fraction of train, at random (seeded)
    test: str = ""
    sequence_column: str = ""             # "": `sequence` (evaluate: the column the model was trained on)
    label_column: str = ""                # "": `label` (evaluate: the model's); FASTA: the header's key
    valid_fraction: float = 0.1
    near_dup_kmer: int = 8                 # leakage filter (finetune.neardup): train/valid records whose distinct
    near_dup_containment: float = 0.5      # k-mers are this share in a test record's are dropped; kmer 0: no
    near_dup_shared_run: int = 0           # also drop those sharing an identical stretch of this many nt; 0: no
    limit_train: int | None = None
    limit_valid: int | None = None
    limit_test: int | None = None
    seed: int = 0


FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".fas")


def read_labelled(path: str, cfg: UserDataConfig, parse_label: Callable[[str, str], T]) -> list[tuple[str, T]]:
    """(sequence, parse_label(text, where)) per row, or per FASTA record (label: `label_column=value` in its
    header). Errors name the file, line (record) and reason. A .tsv file is read without quoting (a quote in a
    note column is text); a CSV's quotes must close."""
    suffixes = content_suffixes(path)
    seq_column, label_column = columns(cfg)
    if suffixes and suffixes[-1] in FASTA_SUFFIXES:
        return [(r.sequence, parse_label(_fasta_label(path, r, label_column), f"{path}: record {r.id!r}"))
                for r in read_fasta(path)]
    tsv = ".tsv" in suffixes
    reader = csv.reader(open_text(Path(path)), delimiter="\t" if tsv else ",", strict=True,
                        quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
    try:
        header = [c.strip() for c in next(reader, [])]
        column = _columns(path, header, (seq_column, label_column))
        rows = [_row(path, reader.line_num, fields, column, len(header), parse_label) for fields in reader
                if any(fields)]
    except csv.Error as e:
        raise StructureError(f"{path}:{reader.line_num}: {e} (unclosed quote, or line ends of another system?)") \
            from None
    if not rows:
        raise StructureError(f"{path}: no records")
    return rows


def columns(cfg: UserDataConfig) -> tuple[str, str]:
    """(sequence column, label column), defaults filled in."""
    return cfg.sequence_column or "sequence", cfg.label_column or "label"


def _fasta_label(path: str, record: FastaRecord, key: str) -> str:
    label = header_label(path, record, key)
    if label is None:
        raise StructureError(f"{path}: record {record.id!r} has no {key}=... in its header (--data.label_column "
                             "names the header field of a FASTA file)")
    return label


def _columns(path: str, header: list[str], wanted: tuple[str, str]) -> tuple[int, int]:
    """(sequence, label) column indices of the header."""
    missing = [c for c in wanted if c not in header]
    if missing:
        raise StructureError(f"{path}: no column {', '.join(map(repr, missing))} in the header {header} (set "
                             "--data.sequence_column / --data.label_column; a .tsv file is read tab-separated, "
                             "others comma-separated)")
    twice = [c for c in wanted if header.count(c) > 1]
    if twice:
        raise StructureError(f"{path}: the header names column {', '.join(map(repr, twice))} more than once")
    return header.index(wanted[0]), header.index(wanted[1])


def _row(path: str, lineno: int, fields: list[str], column: tuple[int, int], width: int,
         parse_label: Callable[[str, str], T]) -> tuple[str, T]:
    where = f"{path}:{lineno}"
    if len(fields) != width:  # more: a separator inside an unquoted value, which shifts the columns after it
        raise StructureError(f"{where}: {len(fields)} field(s), the header has {width} (a value holding the "
                             "separator must be quoted)")
    seq, label = fields[column[0]].strip(), fields[column[1]].strip()
    if not seq:
        raise StructureError(f"{where}: empty sequence")
    check_letters(seq, where)
    if not label:
        raise StructureError(f"{where}: empty label")
    return seq, parse_label(label, where)


def required(path: str, option: str) -> str:
    if not path:
        raise ValueError(f"--data.{option} is required (a file of the {option} records)")
    return path


def user_splits(train: list[T], valid: list[T] | None, test: list[T], seq: Callable[[T], str], cfg: Any) -> Splits[T]:
    """Train/valid minus near-duplicates of test records, and validation drawn from train at random (seeded) when
    none is given. `cfg`: a data config with fields near_dup_{kmer,containment,shared_run}, valid_fraction, seed
    and limit_{train,valid,test}, as UserDataConfig."""
    pool = train + (valid or [])
    dup = leakage_mask([seq(e) for e in pool], [seq(e) for e in test], cfg.near_dup_kmer, cfg.near_dup_containment,
                       cfg.near_dup_shared_run)
    n_train = len(train)
    train = shuffled([e for e, d in zip(train, dup[:n_train]) if not d], cfg.seed)  # limit_train: not one class
    if valid is None:
        n_valid = int(round(cfg.valid_fraction * len(train)))
        splits = Splits(train[n_valid:], train[:n_valid], test, int(dup.sum())).valid_apart(seq, cfg)
    else:  # the user's own validation file: said, not changed
        valid = shuffled([e for e, d in zip(valid, dup[n_train:]) if not d], cfg.seed)
        warn_copies(train, valid, seq)
        splits = Splits(train, valid, test, int(dup.sum()))
    return splits.limited(cfg.limit_train, cfg.limit_valid, cfg.limit_test)


def warn_copies(train: list[T], valid: list[T], seq: Callable[[T], str]) -> None:
    """A validation file that repeats training sequences picks the epoch that memorised best: said, not changed."""
    seen = {to_rna(seq(e)) for e in train}
    copies = sum(to_rna(seq(e)) in seen for e in valid)
    if copies:
        print(f"warning: {copies} of {len(valid)} validation sequences are also in the training data (model "
              "selection then favours memorising)", file=sys.stderr)


def shuffled(items: list[T], seed: int) -> list[T]:
    return [items[i] for i in np.random.default_rng(seed).permutation(len(items))]


def removal_note(removed: int, valid_removed: int = 0) -> str:
    note = f"{removed} train/valid record(s) were near-duplicates of test records (finetune.neardup) and were left out"
    return note + (f"; so were {valid_removed} validation record(s) drawn from train, near-duplicates of training "
                   "records" if valid_removed else "")


def valid_source(cfg: Any) -> str:
    """Where validation came from: the file, or the share of train drawn at random."""
    return cfg.valid or f"{cfg.valid_fraction:g} of train (seed {cfg.seed})"


def files_used(cfg: UserDataConfig) -> dict[str, str]:
    """What finetune.json and results.json record of the data (evaluate reads the columns from there)."""
    seq_column, label_column = columns(cfg)
    return {"train": cfg.train, "valid": valid_source(cfg), "test": cfg.test, "sequence_column": seq_column,
            "label_column": label_column}


def trained_columns(asked: UserDataConfig, meta: dict[str, Any]) -> UserDataConfig:
    """Evaluation reads the columns the model was trained on, unless the options name others."""
    trained = meta.get("data", {})
    return replace(asked, **{k: trained[k] for k in ("sequence_column", "label_column")
                             if k in trained and not getattr(asked, k)})
