"""Sequence regression with the original's mean-ribosome-load head (Linear -> 1D ResNet -> masked mean -> Linear):
the user's own labelled files (`python -m finetune regress`), and the pieces MRL regression shares.

Targets are standardised with the training mean/std (stored with the model) and predictions transformed back.
Metrics: R^2, Pearson r, MSE (model selection on validation R^2), overall and per group where records have one.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import r2_score

from finetune.backbone import BackboneConfig, TaskModel, load_finetuned
from finetune.heads import HeadConfig, RibosomeLoadHead
from finetune.results import markdown_table, write_results
from finetune.structure import StructureError
from finetune.tasks.common import Splits, batched_inference, fit_test_and_report, model_device, tokens_for
from finetune.tasks.user_data import (UserDataConfig, files_used, read_labelled, removal_note, required,
                                      trained_columns, user_splits)
from finetune.trainer import TrainConfig, pick_device, seed_everything
from finetune.unfreeze import UnfreezeConfig

COLUMNS = ("n", "r2", "pearson_r", "mse")


@dataclass
class RegressConfig:
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: UserDataConfig = field(default_factory=UserDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(  # the original's MRL recipe
        out_dir="finetune_out/regress", epochs=15, batch_size=64, eval_batch_size=128, lr=1e-4, optimizer="adam",
        lr_decay_steps=5000))
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(
        head_only_epochs=3, every=3, blocks_per_step=27, max_blocks=27))
    head: HeadConfig = field(default_factory=HeadConfig)


@dataclass
class Example:
    sequence: str
    value: float
    group: str = ""  # rows are also reported per group when there are several (MRL: random/human library)


@dataclass
class Scaler:
    mean: float
    std: float
    min: float | None = None  # predictions are clamped here (a mean ribosome load is >= 0)

    @classmethod
    def of(cls, values: np.ndarray, clamp_min: float | None = None) -> Scaler:
        """The mean and std of `values` (std 1 where all are equal: constant targets standardise to 0, not NaN)."""
        return cls(float(values.mean()), float(values.std()) or 1.0, clamp_min)

    def transform(self, y: np.ndarray) -> np.ndarray:
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        y = z * self.std + self.mean
        return y if self.min is None else np.clip(y, self.min, None)


def standardised(scaler: Scaler, batch: list[Example]) -> torch.Tensor:
    """Training targets, standardised in float64 (in float32, values of 1e8 +- 1 would all be 1e8)."""
    return torch.tensor(scaler.transform(np.array([e.value for e in batch], dtype=np.float64)), dtype=torch.float32)


@torch.no_grad()
def predict_values(model: TaskModel, seqs: list[str], scaler: Scaler, batch_size: int,
                   progress: bool = True) -> np.ndarray:
    device = model_device(model)

    def run(idx: list[int]) -> list[float]:
        return model(tokens_for([seqs[i] for i in idx], device)).float().cpu().numpy().tolist()

    return scaler.inverse(np.array(batched_inference(seqs, batch_size, run, desc="regress", progress=progress)))


def _r2(true: np.ndarray, pred: np.ndarray) -> float | None:
    """None for fewer than 2 records (R^2 is undefined: sklearn warns and gives NaN, which is not JSON)."""
    return float(r2_score(true, pred)) if len(true) >= 2 else None


def _pearson(true: np.ndarray, pred: np.ndarray) -> float | None:
    """None where undefined (fewer than 2 records, or constant values: NaN is not JSON)."""
    return float(np.corrcoef(true, pred)[0, 1]) if len(true) >= 2 and np.std(true) > 0 and np.std(pred) > 0 else None


def evaluate_examples(model: TaskModel, examples: list[Example], scaler: Scaler, batch_size: int,
                      progress: bool = True) -> dict[str, dict[str, Any]]:
    pred = predict_values(model, [e.sequence for e in examples], scaler, batch_size, progress)
    true = np.array([e.value for e in examples])
    groups = np.array([e.group for e in examples])
    rows = {"all": {"n": len(true), "r2": _r2(true, pred), "pearson_r": _pearson(true, pred),
                    "mse": float(np.mean((true - pred) ** 2))}}
    for g in sorted(set(groups)) if len(set(groups)) > 1 else []:
        sel = groups == g
        rows[g] = {"n": int(sel.sum()), "r2": _r2(true[sel], pred[sel]), "pearson_r": _pearson(true[sel], pred[sel]),
                   "mse": float(np.mean((true[sel] - pred[sel]) ** 2))}
    return rows


def fit_and_test(task: str, cfg: Any, splits: Splits[Example], clamp_min: float | None,
                 meta_extra: dict[str, Any], result_extra: dict[str, Any]) -> dict[str, Any]:
    """common.fit_test_and_report with the pooled 1D-ResNet head on targets standardised with the training mean/std
    (stored with the model), best epoch by validation R^2."""
    scaler = Scaler.of(np.array([e.value for e in splits.train]), clamp_min)

    def loss_fn(m: TaskModel, batch: list[Example]) -> torch.Tensor:
        device = model_device(m)
        target = standardised(scaler, batch).to(device)
        return F.mse_loss(m(tokens_for([e.sequence for e in batch], device)).float(), target)

    def evaluate(m: TaskModel, examples: list[Example], scaler: Scaler) -> dict[str, dict[str, Any]]:
        return evaluate_examples(m, examples, scaler, cfg.train.eval_batch_size, cfg.train.progress)

    return fit_test_and_report(
        task, cfg, splits, lambda dim: RibosomeLoadHead(dim, cfg.head), loss_fn,
        lambda m: evaluate(m, splits.valid, scaler)["all"], "r2",
        lambda m, saved: evaluate(m, splits.test, Scaler(**saved["scaler"])),
        lambda result: titled(result, markdown_table(result["rows"], COLUMNS)),
        {"scaler": asdict(scaler), **meta_extra}, result_extra)


def titled(result: dict[str, Any], table: str) -> str:
    return f"### {result['test_set']}\n\n{table}" if "test_set" in result else table


# ------------------------------------------------------------------ the user's own files
def parse_value(label: str, where: str) -> float:
    try:
        value = float(label)
    except ValueError:
        raise StructureError(f"{where}: label {label!r} is not a number") from None
    if not math.isfinite(value):
        raise StructureError(f"{where}: label {label!r} is not a finite number")
    return value


def read_examples(path: str, data: UserDataConfig) -> list[Example]:
    return [Example(s, v) for s, v in read_labelled(path, data, parse_value)]


def load_splits(data: UserDataConfig) -> Splits[Example]:
    train = read_examples(required(data.train, "train"), data)
    valid = read_examples(data.valid, data) if data.valid else None
    test = read_examples(required(data.test, "test"), data)
    return user_splits(train, valid, test, lambda e: e.sequence, data).nonempty()


def train(cfg: RegressConfig, data: Splits[Example] | None = None) -> dict[str, Any]:
    """`data`: load_splits(cfg.data), when the caller has it already."""
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg.data) if data is None else data
    data = {"data": files_used(cfg.data)}
    note = removal_note(splits.removed_near_duplicates, splits.removed_valid_near_train)
    return fit_and_test("regress", cfg, splits, None, data, {"test_set": Path(cfg.data.test).name, **data,
                                                            "note": note})


def evaluate(cfg: RegressConfig) -> dict[str, Any]:
    """Score a fine-tuned regression model (model.path) on data.test."""
    model, meta = load_finetuned(cfg.model.path, pick_device(cfg.train.device), task="regress")
    test = read_examples(required(cfg.data.test, "test"), trained_columns(cfg.data, meta))[:cfg.data.limit_test]
    rows = evaluate_examples(model, test, Scaler(**meta["scaler"]), cfg.train.eval_batch_size, cfg.train.progress)
    result = {"task": "regress", "model": cfg.model.path, "test_set": Path(cfg.data.test).name, "rows": rows}
    write_results(cfg.train.out_dir, "eval_results", result, titled(result, markdown_table(rows, COLUMNS)))
    return result
