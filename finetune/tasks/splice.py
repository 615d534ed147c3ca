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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import accuracy_score, f1_score

from finetune.backbone import BackboneConfig, TaskModel, load_backbone, load_finetuned, save_finetuned
from finetune.heads import HeadConfig, SpliceSiteHead
from finetune.neardup import leakage_mask
from finetune.results import markdown_table, write_results
from finetune.tasks.common import DEFAULT_DATA_ROOT, Splits, batched_inference, minibatches, model_device, tokens_for
from finetune.trainer import TrainConfig, fit, pick_device, seed_everything
from finetune.unfreeze import UnfreezeConfig

SPLICE_FILE = "splice/gue_splice_reconstructed_dev_test.csv.gz"
CLASSES = ("acceptor", "donor", "non_splice_site")  # GUE labels 0, 1, 2


@dataclass
class SpliceDataConfig:
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


Example = tuple[str, int]  # (sequence, label)


def load_splits(cfg: SpliceDataConfig) -> Splits[Example]:
    path = Path(cfg.root) / SPLICE_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found (set data.root)")
    dev, test = [], []
    with gzip.open(path, "rt") as f:
        for lineno, row in enumerate(csv.DictReader(f), 2):
            label = int(row["label"])
            if label not in range(len(CLASSES)):
                raise ValueError(f"{path}:{lineno}: label {label} not in 0..{len(CLASSES) - 1}")
            (dev if row["split"] == "dev" else test).append((row["sequence"], label))
    dev_seqs, test_seqs = [s for s, _ in dev], [s for s, _ in test]
    dup = leakage_mask(dev_seqs, test_seqs, cfg.near_dup_kmer, cfg.near_dup_containment, cfg.near_dup_shared_run)
    dev = [e for e, d in zip(dev, dup) if not d]
    order = np.random.default_rng(cfg.seed).permutation(len(dev))
    n_valid = int(round(cfg.valid_fraction * len(dev)))
    splits = Splits([dev[i] for i in order[n_valid:]], [dev[i] for i in order[:n_valid]], test, int(dup.sum()))
    return splits.limited(cfg.limit_train, cfg.limit_valid, cfg.limit_test)


def splice_loss(model: TaskModel, batch: list[Example]) -> torch.Tensor:
    device = model_device(model)
    logits = model(tokens_for([s for s, _ in batch], device))
    return F.cross_entropy(logits.float(), torch.tensor([y for _, y in batch], device=device))


@torch.no_grad()
def class_probabilities(model: TaskModel, seqs: list[str], batch_size: int, progress: bool = True) -> np.ndarray:
    device = model_device(model)

    def run(idx: list[int]) -> list[np.ndarray]:
        return list(torch.softmax(model(tokens_for([seqs[i] for i in idx], device)).float(), -1).cpu().numpy())

    return np.stack(batched_inference(seqs, batch_size, run, desc="splice", progress=progress))


def scores(labels: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    per_class = f1_score(labels, pred, labels=list(range(len(CLASSES))), average=None, zero_division=0)
    return {"n": int(len(labels)), "accuracy": float(accuracy_score(labels, pred)),
            "macro_f1": float(np.mean(per_class)), **{f"f1_{c}": float(v) for c, v in zip(CLASSES, per_class)}}


def evaluate_examples(model: TaskModel, examples: list[Example], batch_size: int, progress: bool = True) -> dict:
    probs = class_probabilities(model, [s for s, _ in examples], batch_size, progress)
    return scores(np.array([y for _, y in examples]), probs.argmax(1))


COLUMNS = ("n", "accuracy", "macro_f1", *(f"f1_{c}" for c in CLASSES))


def train(cfg: SpliceConfig) -> dict[str, Any]:
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg.data)
    lm = load_backbone(cfg.model)
    model = TaskModel(lm, SpliceSiteHead(lm.config.dim, len(CLASSES), cfg.head))
    out = Path(cfg.train.out_dir)

    def validate(m: TaskModel) -> dict[str, Any]:
        return evaluate_examples(m, splits.valid, cfg.train.eval_batch_size, cfg.train.progress)

    def save(m: TaskModel, val: dict[str, Any]) -> None:
        save_finetuned(m, out, {"task": "splice", "head": asdict(cfg.head), "classes": list(CLASSES), "valid": val,
                                "backbone": asdict(cfg.model)})

    history = fit(model, cfg.train, cfg.unfreeze,
                  lambda e: minibatches(splits.train, cfg.train.batch_size, cfg.train.seed + e),
                  splice_loss, validate, save, score_key="macro_f1")
    best, _ = load_finetuned(out)
    best.to(pick_device(cfg.train.device))
    rows = {"GUE splice test": evaluate_examples(best, splits.test, cfg.train.eval_batch_size, cfg.train.progress)}
    result = {"task": "splice", "model": lm.config.name, "rows": rows, "history": history,
              "splits": splits.sizes(), "removed_near_duplicates": splits.removed_near_duplicates,
              "note": (f"train/valid = GUE dev minus its {splits.removed_near_duplicates} near-duplicates of test "
                       "windows (90/10 random split); test = GUE test")}
    write_results(out, "results", result, markdown_table(rows, COLUMNS))
    return result


def evaluate(cfg: SpliceConfig) -> dict[str, Any]:
    model, _ = load_finetuned(cfg.model.path)
    model.to(pick_device(cfg.train.device))
    rows = {"GUE splice test": evaluate_examples(model, load_splits(cfg.data).test, cfg.train.eval_batch_size,
                                                 cfg.train.progress)}
    out = Path(cfg.train.out_dir)
    result = {"task": "splice", "model": cfg.model.path, "rows": rows}
    write_results(out, "eval_results", result, markdown_table(rows, COLUMNS))
    return result
