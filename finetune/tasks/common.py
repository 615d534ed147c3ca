"""Helpers shared by the tasks: the split container, tokenising with rnalm.tokenizer, shuffled mini-batches,
length-sorted batched inference (less padding) that returns outputs in input order, and the fine-tune -> test ->
results run of the sequence-level tasks."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from finetune.neardup import filter_option_problems, leakage_mask
from finetune.results import write_results
from finetune.trainer import fit, pick_device, progress_bar
from rnalm.tokenizer import batch_encode

T = TypeVar("T")
DEFAULT_DATA_ROOT = os.environ.get("RNALM_SHARED_DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))


def data_file(root: str | Path, relative: str) -> Path:
    """A task's file in the data folder, or an error that says how to point at that folder."""
    path = Path(root) / relative
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: --data.root=DIR names the folder that holds {relative} (the "
                                "shared data; its default is RNALM_SHARED_DATA, else ../shared/data beside the "
                                "repository)")
    return path


class CheckedSplitOptions:
    """Base of the data configs: their valid_fraction and leakage-filter (near_dup_*) options checked with the
    options, before a train run clears OUT (a negative fraction swapped train and validation without a word;
    near_dup_kmer=20 asked for 8 TiB)."""

    def __post_init__(self) -> None:
        problems = filter_option_problems(self.near_dup_kmer, self.near_dup_containment, self.near_dup_shared_run)
        if not 0 <= self.valid_fraction < 1:
            problems.insert(0, f"--data.valid_fraction must be in [0, 1), got {self.valid_fraction}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Splits(Generic[T]):
    """Train / validation / test examples; `removed_near_duplicates`: training-pool examples dropped as near-copies
    of test examples (`finetune.neardup`); `removed_valid_near_train`: validation examples drawn from that pool and
    dropped as near-copies of training examples (`valid_apart`)."""
    train: list[T]
    valid: list[T]
    test: list[T]
    removed_near_duplicates: int = 0
    removed_valid_near_train: int = 0

    def valid_apart(self, seq: Callable[[T], str], cfg: Any) -> Splits[T]:
        """Validation minus near-copies of training examples (the rule of the test filter; `cfg` has its
        near_dup_* fields): the epoch kept is the best on validation, and near-copies of what was trained on (one
        UTR cut to several lengths, SNV variants: a third to half of the MRL validation records) would pick the
        one that memorised best."""
        dup = leakage_mask([seq(e) for e in self.valid], [seq(e) for e in self.train], cfg.near_dup_kmer,
                           cfg.near_dup_containment, cfg.near_dup_shared_run)
        return replace(self, valid=[e for e, d in zip(self.valid, dup) if not d],
                       removed_valid_near_train=int(dup.sum()))

    def limited(self, train: int | None, valid: int | None, test: int | None) -> Splits[T]:
        """The first N of each part (quick runs and tests); None keeps a part whole."""
        return replace(self, train=self.train[:train], valid=self.valid[:valid], test=self.test[:test])

    def nonempty(self) -> Splits[T]:
        if not self.train or not self.valid or not self.test:
            raise ValueError(f"empty split: {self.sizes()} (after leaving out {self.removed_near_duplicates} "
                             "near-duplicates of test records): more records, --data.valid or a larger "
                             "--data.valid_fraction")
        return self

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "valid": len(self.valid), "test": len(self.test)}


def tokens_for(seqs: Sequence[str], device: torch.device | str) -> torch.Tensor:
    ids, _ = batch_encode(list(seqs))
    return torch.from_numpy(ids).to(device)


def minibatches(items: Sequence[T], batch_size: int, seed: int | None, epoch: int = 0) -> Iterator[list[T]]:
    """Mini-batches shuffled by (seed, epoch) (seed + epoch made seed s+1's epoch e seed s's epoch e+1: seed
    replicates shared their orders); seed None keeps the order."""
    order = (np.arange(len(items)) if seed is None
             else np.random.default_rng([seed, epoch]).permutation(len(items)))
    for start in range(0, len(items), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


def length_sorted_batches(seqs: Sequence[str], batch_size: int, desc: str = "predict",
                          progress: bool = True) -> Iterator[list[int]]:
    """Index batches of sequences of similar length (less padding), shortest first, with a progress bar."""
    if isinstance(seqs, str):  # would be read as len(seqs) sequences of 1 nt
        raise TypeError("expected a list of sequences, got one sequence: pass [seq]")
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    yield from progress_bar(batches, desc, progress)


def batched_inference(seqs: Sequence[str], batch_size: int, run: Callable[[list[int]], list[Any]],
                      desc: str = "predict", progress: bool = True) -> list[Any]:
    """Call `run(indices)` on length-sorted index batches; collect one output per sequence, in input order."""
    out: list[Any] = [None] * len(seqs)
    for idx in length_sorted_batches(seqs, batch_size, desc, progress):
        for i, res in zip(idx, run(idx)):
            out[i] = res
    return out


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def fit_test_and_report(task: str, cfg: Any, splits: Splits[Any], make_head: Callable[[int], torch.nn.Module],
                        loss_fn: Callable[[Any, list[Any]], torch.Tensor], validate: Callable[[Any], dict[str, Any]],
                        score_key: str, test_rows: Callable[[Any, dict[str, Any]], dict[str, dict[str, Any]]],
                        table: Callable[[dict[str, Any]], str], meta: dict[str, Any],
                        result_extra: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune `cfg.model` + `make_head(dim)` on splits.train (the best epoch by validate()[score_key]), score
    the best on splits.test (`test_rows(model, its finetune.json)`), write OUT/finetune.json (task, head config,
    `meta`) + weights and OUT/results.{json,md} (`table(result)`, then result["note"] when there is one).
    `cfg`: a task config with sections model, train, unfreeze, head."""
    from finetune.backbone import TaskModel, load_backbone, load_finetuned, mark_finished, save_finetuned

    lm = load_backbone(cfg.model)
    model = TaskModel(lm, make_head(lm.config.dim))
    out = Path(cfg.train.out_dir)

    def save(m: TaskModel, val: dict[str, Any]) -> None:
        save_finetuned(m, out, {"task": task, "head": asdict(cfg.head), "valid": val, "backbone": asdict(cfg.model),
                                **meta}, finished=False)

    history = fit(model, cfg.train, cfg.unfreeze,
                  lambda e: minibatches(splits.train, cfg.train.batch_size, cfg.train.seed, e),
                  loss_fn, validate, save, score_key=score_key)
    mark_finished(out)
    best, saved = load_finetuned(out, pick_device(cfg.train.device))
    result = {"task": task, "model": lm.config.name, "backbone": asdict(cfg.model), "rows": test_rows(best, saved),
              "history": history, "splits": splits.sizes(), "removed_near_duplicates": splits.removed_near_duplicates,
              "removed_valid_near_train": splits.removed_valid_near_train, **result_extra}
    note = f"\n{result['note']}\n" if "note" in result else ""
    write_results(out, "results", result, table(result) + note)
    return result
