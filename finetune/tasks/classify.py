"""Sequence classification from the CLS embedding (CLS -> Linear -> GELU -> Linear, the original's splice head):
the user's own labelled files (`python -m finetune classify`), and the pieces splice-site classification shares.

Classes are the training file's labels, sorted (numbers numerically); a validation or test label that train lacks
is an error. Metrics: accuracy, F1 per class, macro F1 (model selection on validation macro F1).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from finetune.backbone import BackboneConfig, TaskModel, load_finetuned
from finetune.heads import HeadConfig, SpliceSiteHead
from finetune.results import markdown_table, write_results
from finetune.structure import StructureError
from finetune.tasks.common import Splits, batched_inference, fit_test_and_report, model_device, tokens_for
from finetune.tasks.user_data import (UserDataConfig, files_used, read_labelled, removal_note, required,
                                      trained_columns, user_splits)
from finetune.trainer import TrainConfig, pick_device, seed_everything
from finetune.unfreeze import UnfreezeConfig

Example = tuple[str, int]  # (sequence, class index)


@dataclass
class ClassifyConfig:
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: UserDataConfig = field(default_factory=UserDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(  # the original's splice-site recipe
        out_dir="finetune_out/classify", epochs=5, batch_size=32, eval_batch_size=64, lr=1e-5, weight_decay=1e-6,
        optimizer="adamw", lr_end_factor=1.0))
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(head_only_epochs=0))
    head: HeadConfig = field(default_factory=HeadConfig)


def classification_loss(model: TaskModel, batch: list[Example]) -> torch.Tensor:
    device = model_device(model)
    logits = model(tokens_for([s for s, _ in batch], device))
    return F.cross_entropy(logits.float(), torch.tensor([y for _, y in batch], device=device))


@torch.no_grad()
def class_probabilities(model: TaskModel, seqs: list[str], batch_size: int, progress: bool = True) -> np.ndarray:
    device = model_device(model)

    def run(idx: list[int]) -> list[np.ndarray]:
        return list(torch.softmax(model(tokens_for([seqs[i] for i in idx], device)).float(), -1).cpu().numpy())

    return np.stack(batched_inference(seqs, batch_size, run, desc="classify", progress=progress))


def scores(labels: np.ndarray, pred: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, F1 per class and their macro mean. A class neither in `labels` nor predicted has no F1 (None)
    and is left out of the mean: a test set of one class scores 1.0 when every record gets it."""
    per_class = [f1_of(labels == k, pred == k) for k in range(len(classes))]
    defined = [v for v in per_class if v is not None]
    return {"n": int(len(labels)), "accuracy": float(np.mean(labels == pred)) if len(labels) else None,
            "macro_f1": float(np.mean(defined)) if defined else None,
            **{f"f1_{c}": v for c, v in zip(classes, per_class)}}


def f1_of(true: np.ndarray, predicted: np.ndarray) -> float | None:
    tp, fp, fn = int((true & predicted).sum()), int((~true & predicted).sum()), int((true & ~predicted).sum())
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None


def columns(classes: Sequence[str]) -> tuple[str, ...]:
    return ("n", "accuracy", "macro_f1", *(f"f1_{c}" for c in classes))


def evaluate_examples(model: TaskModel, examples: list[Example], classes: Sequence[str], batch_size: int,
                      progress: bool = True) -> dict[str, Any]:
    probs = class_probabilities(model, [s for s, _ in examples], batch_size, progress)
    return scores(np.array([y for _, y in examples]), probs.argmax(1), classes)


def fit_and_test(task: str, cfg: Any, splits: Splits[Example], classes: Sequence[str], test_name: str,
                 meta_extra: dict[str, Any], result_extra: dict[str, Any]) -> dict[str, Any]:
    """common.fit_test_and_report with the CLS head, best epoch by validation macro F1; test row `test_name`."""
    def evaluate(model: TaskModel, examples: list[Example]) -> dict[str, Any]:
        return evaluate_examples(model, examples, classes, cfg.train.eval_batch_size, cfg.train.progress)

    return fit_test_and_report(
        task, cfg, splits, lambda dim: SpliceSiteHead(dim, len(classes), cfg.head), classification_loss,
        lambda m: evaluate(m, splits.valid), "macro_f1", lambda m, _: {test_name: evaluate(m, splits.test)},
        lambda result: markdown_table(result["rows"], columns(classes)), {"classes": list(classes), **meta_extra},
        result_extra)


# ------------------------------------------------------------------ the user's own files
def sorted_labels(labels: set[str]) -> list[str]:
    """Numbers in numeric order (2 before 10), then the other labels (nan, inf too) in text order."""
    def key(label: str) -> tuple[int, float, str]:
        try:
            value = float(label)
        except ValueError:
            return (1, 0.0, label)
        return (0, value, label) if math.isfinite(value) else (1, 0.0, label)
    return sorted(labels, key=key)


def class_index(classes: Sequence[str], source: str) -> Callable[[str, str], int]:
    """A label parser for read_labelled: the label's index in `classes`, or an error naming its line."""
    index = {c: i for i, c in enumerate(classes)}

    def parse(label: str, where: str) -> int:
        if label not in index:
            raise StructureError(f"{where}: label {label!r} is not a class of {source} ({', '.join(classes)})")
        return index[label]
    return parse


def load_splits(data: UserDataConfig) -> tuple[Splits[Example], list[str]]:
    train = read_labelled(required(data.train, "train"), data, lambda label, where: label)
    classes = sorted_labels({label for _, label in train})
    if len(classes) < 2:
        raise ValueError(f"{data.train}: one class only ({classes[0]!r}): nothing to classify")
    parse = class_index(classes, f"the training file {data.train}")
    valid = read_labelled(data.valid, data, parse) if data.valid else None
    test = read_labelled(required(data.test, "test"), data, parse)
    train_ex = [(s, parse(label, data.train)) for s, label in train]
    return user_splits(train_ex, valid, test, lambda e: e[0], data).nonempty(), classes


def train(cfg: ClassifyConfig, data: tuple[Splits[Example], list[str]] | None = None) -> dict[str, Any]:
    """`data`: load_splits(cfg.data), when the caller has it already."""
    seed_everything(cfg.train.seed)
    splits, classes = load_splits(cfg.data) if data is None else data
    data = {"data": files_used(cfg.data)}
    note = removal_note(splits.removed_near_duplicates, splits.removed_valid_near_train)
    return fit_and_test("classify", cfg, splits, classes, Path(cfg.data.test).name, data, {**data, "note": note})


def evaluate(cfg: ClassifyConfig) -> dict[str, Any]:
    """Score a fine-tuned classifier (model.path) on data.test."""
    model, meta = load_finetuned(cfg.model.path, pick_device(cfg.train.device), task="classify")
    classes = meta["classes"]
    test = read_labelled(required(cfg.data.test, "test"), trained_columns(cfg.data, meta),
                         class_index(classes, f"the model {cfg.model.path}"))
    rows = {Path(cfg.data.test).name: evaluate_examples(model, test[:cfg.data.limit_test], classes,
                                                       cfg.train.eval_batch_size, cfg.train.progress)}
    result = {"task": "classify", "model": cfg.model.path, "rows": rows}
    write_results(cfg.train.out_dir, "eval_results", result, markdown_table(rows, columns(classes)))
    return result
