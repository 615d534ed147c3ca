"""Splice-site classification (acceptor / donor / non-site) from the CLS embedding.

Data (../shared/data/splice): only GUE's dev and test files exist. Test = GUE test (4,562). GUE dev is split
at random into train (90%) and validation (10%), after removing the dev windows that are near-duplicates of a
test window (`finetune.neardup`: the k-mer rule, or an identical stretch of 50 nt): besides 31 exact copies, GUE
dev holds windows of the same loci as test windows shifted by a few to a few hundred nt (1,013 removed in all), so
no test locus is trained on. Metrics:
accuracy, F1 per class, macro F1.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.backbone import BackboneConfig, load_finetuned
from finetune.heads import HeadConfig
from finetune.results import markdown_table, write_results
from finetune.tasks.classify import Example, columns, evaluate_examples, fit_and_test
from finetune.tasks.common import DEFAULT_DATA_ROOT, CheckedSplitOptions, Splits, data_file
from finetune.tasks.user_data import user_splits
from finetune.trainer import TrainConfig, pick_device, seed_everything
from finetune.unfreeze import UnfreezeConfig

SPLICE_FILE = "splice/gue_splice_reconstructed_dev_test.csv.gz"
CLASSES = ("acceptor", "donor", "non_splice_site")  # GUE labels 0, 1, 2
TEST_NAME = "GUE splice test"


@dataclass
class SpliceDataConfig(CheckedSplitOptions):
    root: str = DEFAULT_DATA_ROOT
    valid_fraction: float = 0.1
    near_dup_kmer: int = 8                 # leakage filter (finetune.neardup): dev windows whose distinct k-mers
    near_dup_containment: float = 0.5      # are this share in a test window's are dropped, and so are
    near_dup_shared_run: int = 50          # those sharing an identical stretch of this many nt with one (windows
                                           # of one locus shifted by up to 350 nt); 0: no such check
    limit_train: int | None = None
    limit_valid: int | None = None
    limit_test: int | None = None
    seed: int = 0


@dataclass
class SpliceConfig:
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: SpliceDataConfig = field(default_factory=SpliceDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="finetune_out/splice", epochs=5, batch_size=32, eval_batch_size=64, lr=1e-5, weight_decay=1e-6,
        optimizer="adamw", lr_end_factor=1.0))
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(head_only_epochs=0))
    head: HeadConfig = field(default_factory=HeadConfig)


def load_splits(cfg: SpliceDataConfig) -> Splits[Example]:
    path = data_file(cfg.root, SPLICE_FILE)
    dev, test = [], []
    with gzip.open(path, "rt") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            label = int(row["label"])
            if label not in range(len(CLASSES)):
                raise ValueError(f"{path}:{lineno}: label {label} not in 0..{len(CLASSES) - 1}")
            (dev if row["split"] == "dev" else test).append((row["sequence"], label))
    return user_splits(dev, None, test, lambda e: e[0], cfg).nonempty()


COLUMNS = columns(CLASSES)


def train(cfg: SpliceConfig) -> dict[str, Any]:
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg.data)
    return fit_and_test("splice", cfg, splits, CLASSES, TEST_NAME, {}, {
        "note": (f"train/valid = GUE dev minus its {splits.removed_near_duplicates} near-duplicates of test "
                 f"windows ({cfg.data.valid_fraction:g} of it at random, seed {cfg.data.seed}, for validation, minus "
                 f"its {splits.removed_valid_near_train} near-duplicates of train windows); test = GUE test")})


def evaluate(cfg: SpliceConfig) -> dict[str, Any]:
    model, meta = load_finetuned(cfg.model.path, pick_device(cfg.train.device), task="splice")
    rows = {TEST_NAME: evaluate_examples(model, load_splits(cfg.data).test, CLASSES, cfg.train.eval_batch_size,
                                         cfg.train.progress)}
    out = Path(cfg.train.out_dir)
    result = {"task": "splice", "model": cfg.model.path, "rows": rows}
    write_results(out, "eval_results", result, markdown_table(rows, COLUMNS))
    return result
