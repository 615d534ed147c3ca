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
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score

from finetune.backbone import BackboneConfig, TaskModel, load_backbone, load_finetuned, save_finetuned
from finetune.heads import HeadConfig, RibosomeLoadHead
from finetune.neardup import leakage_mask
from finetune.results import markdown_table, write_results
from finetune.tasks.common import DEFAULT_DATA_ROOT, Splits, batched_inference, minibatches, model_device, tokens_for
from finetune.trainer import TrainConfig, fit, pick_device, seed_everything
from finetune.unfreeze import UnfreezeConfig

MRL_FILES = {
    "varlen": "mrl/sample2019_varlen25to100_random7600_human7600.csv.gz",
    "egfp": "mrl/sample2019_egfp_unmod1_test20k.csv.gz",
    "designed": "mrl/sample2019_designed_human_test25k.csv.gz",
}


@dataclass
class MRLDataConfig:
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


@dataclass
class Example:
    sequence: str
    mrl: float
    group: str   # `set` column (random/human) or the file name


def load_splits(cfg: MRLDataConfig) -> Splits[Example]:
    """Test: a seeded random part of the file (the same records whatever the filter); valid and train: the rest
    minus near-duplicates of test records."""
    path = Path(cfg.root) / MRL_FILES[cfg.file]
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (set data.root)")
    with gzip.open(path, "rt") as f:
        rows = [Example(r["utr"], float(r["rl"]), r.get("set", cfg.file)) for r in csv.DictReader(f)]
    order = np.random.default_rng(cfg.seed).permutation(len(rows))
    n_test, n_valid = int(round(cfg.test_fraction * len(rows))), int(round(cfg.valid_fraction * len(rows)))
    test, rest = [rows[i] for i in order[:n_test]], [rows[i] for i in order[n_test:]]
    dup = leakage_mask([e.sequence for e in rest], [e.sequence for e in test], cfg.near_dup_kmer,
                       cfg.near_dup_containment, cfg.near_dup_shared_run)
    rest = [e for e, d in zip(rest, dup) if not d]
    splits = Splits(rest[n_valid:], rest[:n_valid], test, int(dup.sum()))
    return splits.limited(cfg.limit_train, cfg.limit_valid, cfg.limit_test)


@dataclass
class Scaler:
    mean: float
    std: float

    def transform(self, y: np.ndarray | torch.Tensor):
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        return np.clip(z * self.std + self.mean, 0.0, None)


@torch.no_grad()
def predict_mrl(model: TaskModel, seqs: list[str], scaler: Scaler, batch_size: int, progress: bool = True) -> np.ndarray:
    device = model_device(model)

    def run(idx: list[int]) -> list[float]:
        return model(tokens_for([seqs[i] for i in idx], device)).float().cpu().numpy().tolist()

    return scaler.inverse(np.array(batched_inference(seqs, batch_size, run, desc="mrl", progress=progress)))


def _r2(true: np.ndarray, pred: np.ndarray) -> float | None:
    """None for fewer than 2 records (R^2 is undefined: sklearn warns and gives NaN, which is not JSON)."""
    return float(r2_score(true, pred)) if len(true) >= 2 else None


def evaluate_examples(model: TaskModel, examples: list[Example], scaler: Scaler, batch_size: int,
                      progress: bool = True) -> dict[str, dict[str, Any]]:
    pred = predict_mrl(model, [e.sequence for e in examples], scaler, batch_size, progress)
    true = np.array([e.mrl for e in examples])
    groups = np.array([e.group for e in examples])
    rows = {"all": {"n": len(true), "r2": _r2(true, pred),
                    "pearson_r": float(np.corrcoef(true, pred)[0, 1]) if np.std(pred) > 0 else 0.0,
                    "mse": float(np.mean((true - pred) ** 2))}}
    for g in sorted(set(groups)) if len(set(groups)) > 1 else []:
        sel = groups == g
        rows[g] = {"n": int(sel.sum()), "r2": _r2(true[sel], pred[sel]),
                   "mse": float(np.mean((true[sel] - pred[sel]) ** 2))}
    return rows


COLUMNS = ("n", "r2", "pearson_r", "mse")


def split_note(seed: int, removed: int | None = None) -> str:
    """Said in every results file: the test set is a random part of a test file, not the paper's split."""
    dropped = "" if removed is None else f", minus {removed} train/valid near-duplicates of test records"
    return ("only Sample et al. test sets exist in shared data: this file was split at random "
            f"(seed {seed}) into train/valid/test{dropped}; not comparable to the paper's split")


def train(cfg: MRLConfig) -> dict[str, Any]:
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg.data)
    y = np.array([e.mrl for e in splits.train])
    scaler = Scaler(float(y.mean()), float(y.std()) or 1.0)
    lm = load_backbone(cfg.model)
    model = TaskModel(lm, RibosomeLoadHead(lm.config.dim, cfg.head))
    out = Path(cfg.train.out_dir)

    def loss_fn(m: TaskModel, batch: list[Example]) -> torch.Tensor:
        device = model_device(m)
        target = scaler.transform(torch.tensor([e.mrl for e in batch], device=device, dtype=torch.float32))
        return F.mse_loss(m(tokens_for([e.sequence for e in batch], device)).float(), target)

    def validate(m: TaskModel) -> dict[str, Any]:
        return evaluate_examples(m, splits.valid, scaler, cfg.train.eval_batch_size, cfg.train.progress)["all"]

    def save(m: TaskModel, val: dict[str, Any]) -> None:
        save_finetuned(m, out, {"task": "mrl", "head": asdict(cfg.head), "scaler": asdict(scaler), "valid": val,
                                "data": asdict(cfg.data), "backbone": asdict(cfg.model)})

    history = fit(model, cfg.train, cfg.unfreeze,
                  lambda e: minibatches(splits.train, cfg.train.batch_size, cfg.train.seed + e),
                  loss_fn, validate, save, score_key="r2")
    best, meta = load_finetuned(out)
    best.to(pick_device(cfg.train.device))
    rows = evaluate_examples(best, splits.test, Scaler(**meta["scaler"]), cfg.train.eval_batch_size,
                             cfg.train.progress)
    result = {"task": "mrl", "model": lm.config.name, "file": MRL_FILES[cfg.data.file], "rows": rows,
              "history": history, "splits": splits.sizes(),
              "removed_near_duplicates": splits.removed_near_duplicates,
              "note": split_note(cfg.data.seed, splits.removed_near_duplicates)}
    write_results(out, "results", result, markdown_table(rows, COLUMNS, "test subset") + f"\n{result['note']}\n")
    return result


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
    model, meta = load_finetuned(cfg.model.path)
    model.to(pick_device(cfg.train.device))
    data = trained_split(cfg.data, meta, cfg.model.path)
    rows = evaluate_examples(model, load_splits(data).test, Scaler(**meta["scaler"]),
                             cfg.train.eval_batch_size, cfg.train.progress)
    out = Path(cfg.train.out_dir)
    result = {"task": "mrl", "model": cfg.model.path, "file": MRL_FILES[data.file], "split_seed": data.seed,
              "rows": rows, "note": split_note(data.seed)}
    write_results(out, "eval_results", result, markdown_table(rows, COLUMNS, "test subset") + f"\n{result['note']}\n")
    return result
