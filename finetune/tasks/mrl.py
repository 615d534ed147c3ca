"""Mean ribosome load (MRL) regression with the 1D-ResNet head.

Data (../shared/data/mrl): only Sample et al.'s *test* sets exist there, so the chosen file is split at
random (seeded) into train / validation / test (default 80/10/10) and results say so. Records that are
near-duplicates of a test record, or share an identical 25-nt stretch with one (`finetune.neardup`), are then
dropped from train/validation: the varying-length human UTRs are the same UTRs cut to several lengths and the
designed library holds SNV variants of each UTR, so a plain random split gives 41% of the human test UTRs (and
57% of the designed ones) a near-copy in training. Default file: the
varying-length 25-100 nt library (Random7600 + Human7600); R^2 is reported on the held-out part overall and
per `set` (random, human). Targets are standardised with the training mean/std (stored in the checkpoint);
predictions are transformed back and clamped at >= 0, as the original.
"""
from __future__ import annotations

import csv
import gzip
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from finetune.backbone import BackboneConfig, load_finetuned
from finetune.heads import HeadConfig
from finetune.neardup import leakage_mask
from finetune.results import markdown_table, write_results
from finetune.tasks.common import DEFAULT_DATA_ROOT, CheckedSplitOptions, Splits, data_file
from finetune.tasks.regress import COLUMNS, Example, Scaler, evaluate_examples, fit_and_test
from finetune.trainer import TrainConfig, pick_device, seed_everything
from finetune.unfreeze import UnfreezeConfig

MIN_LOAD = 0.0  # predictions are clamped at 0, as the original's
MRL_FILES = {
    "varlen": "mrl/sample2019_varlen25to100_random7600_human7600.csv.gz",
    "egfp": "mrl/sample2019_egfp_unmod1_test20k.csv.gz",
    "designed": "mrl/sample2019_designed_human_test25k.csv.gz",
}


@dataclass
class MRLDataConfig(CheckedSplitOptions):
    root: str = DEFAULT_DATA_ROOT
    file: Literal["varlen", "egfp", "designed"] = "varlen"
    valid_fraction: float = 0.1
    test_fraction: float = 0.1
    near_dup_kmer: int = 8                 # leakage filter (finetune.neardup): train/valid records whose distinct
    near_dup_containment: float = 0.5      # k-mers are this share in a test record's are dropped, and so are
    near_dup_shared_run: int = 25          # those sharing an identical stretch of this many nt with one (UTRs of
                                           # one gene's isoforms, a designed UTR's halves); 0: no such check
    limit_train: int | None = None
    limit_valid: int | None = None
    limit_test: int | None = None
    seed: int = 0


@dataclass
class MRLConfig:
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: MRLDataConfig = field(default_factory=MRLDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="finetune_out/mrl", epochs=15, batch_size=64, eval_batch_size=128, lr=1e-4, optimizer="adam",
        lr_decay_steps=5000))
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(
        head_only_epochs=3, every=3, blocks_per_step=27, max_blocks=27))
    head: HeadConfig = field(default_factory=HeadConfig)


def load_splits(cfg: MRLDataConfig) -> Splits[Example]:
    """Test: a seeded random part of the file (the same records whatever the filter); valid and train: the rest
    minus near-duplicates of test records, and validation minus near-duplicates of training records."""
    if not (0 < cfg.valid_fraction and 0 < cfg.test_fraction and cfg.valid_fraction + cfg.test_fraction < 1):
        raise ValueError(f"--data.valid_fraction {cfg.valid_fraction} and --data.test_fraction {cfg.test_fraction}: "
                         "each above 0 and together below 1 (the rest is the training set)")
    path = data_file(cfg.root, MRL_FILES[cfg.file])
    with gzip.open(path, "rt") as f:
        rows = [Example(r["utr"], float(r["rl"]), r.get("set", cfg.file)) for r in csv.DictReader(f)]
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_test, n_valid = int(round(cfg.test_fraction * len(rows))), int(round(cfg.valid_fraction * len(rows)))
    test, rest = [rows[i] for i in order[:n_test]], [rows[i] for i in order[n_test:]]
    dup = leakage_mask([e.sequence for e in rest], [e.sequence for e in test], cfg.near_dup_kmer,
                       cfg.near_dup_containment, cfg.near_dup_shared_run)
    rest = [e for e, d in zip(rest, dup) if not d]
    splits = Splits(rest[n_valid:], rest[:n_valid], test, int(dup.sum())).valid_apart(lambda e: e.sequence, cfg)
    return splits.nonempty().limited(cfg.limit_train, cfg.limit_valid, cfg.limit_test)


def saved_scaler(meta: dict[str, Any]) -> Scaler:
    """The scaler stored with an MRL model (models saved before `min` was stored clamp at 0 too)."""
    return Scaler(**{"min": MIN_LOAD, **meta["scaler"]})


def split_note(seed: int, removed: int | None = None, valid_removed: int | None = None) -> str:
    """Said in every results file: the test set is a random part of a test file, not the paper's split."""
    dropped = "" if removed is None else f", minus {removed} train/valid near-duplicates of test records"
    dropped += "" if valid_removed is None else f" and {valid_removed} valid near-duplicates of train records"
    return ("only Sample et al. test sets exist in shared data: this file was split at random "
            f"(seed {seed}) into train/valid/test{dropped}; not comparable to the paper's split")


def train(cfg: MRLConfig) -> dict[str, Any]:
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg.data)
    return fit_and_test("mrl", cfg, splits, MIN_LOAD, {"data": asdict(cfg.data)}, {
        "file": MRL_FILES[cfg.data.file],
        "note": split_note(cfg.data.seed, splits.removed_near_duplicates, splits.removed_valid_near_train)})


SPLIT_KEYS = ("file", "valid_fraction", "test_fraction", "seed")


def trained_split(asked: MRLDataConfig, meta: dict[str, Any], where: str) -> MRLDataConfig:
    """The split the model was trained with (file, fractions, seed from its finetune.json): another one would
    put training records into the "test" set. Asking for a different one explicitly is an error."""
    trained = {k: meta["data"][k] for k in SPLIT_KEYS}
    default = MRLDataConfig()
    clash = {k: getattr(asked, k) for k in SPLIT_KEYS
             if getattr(asked, k) != getattr(default, k) and getattr(asked, k) != trained[k]}
    if clash:
        raise ValueError(f"{where} was trained on the split {trained}; evaluating with {clash} would test on "
                         f"records it was trained on (the test part of the split it was trained with is used)")
    return replace(asked, **trained)


def evaluate(cfg: MRLConfig) -> dict[str, Any]:
    model, meta = load_finetuned(cfg.model.path, pick_device(cfg.train.device), task="mrl")
    data = trained_split(cfg.data, meta, cfg.model.path)
    rows = evaluate_examples(model, load_splits(data).test, saved_scaler(meta), cfg.train.eval_batch_size,
                             cfg.train.progress)
    out = Path(cfg.train.out_dir)
    result = {"task": "mrl", "model": cfg.model.path, "file": MRL_FILES[data.file], "split_seed": data.seed,
              "rows": rows, "note": split_note(data.seed)}
    write_results(out, "eval_results", result, markdown_table(rows, COLUMNS) + f"\n{result['note']}\n")
    return result
