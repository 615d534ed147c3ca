"""Batching helpers shared by the tasks: tokenising with rnalm.tokenizer, shuffled mini-batches, and
length-sorted batched inference (less padding) that returns outputs in input order."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm import tqdm

from rnalm.tokenizer import batch_encode

T = TypeVar("T")
DEFAULT_DATA_ROOT = os.environ.get("RNALM_SHARED_DATA", str(Path(__file__).resolve().parents[3] / "shared" / "data"))


def tokens_for(seqs: Sequence[str], device: torch.device | str) -> torch.Tensor:
    ids, _ = batch_encode(list(seqs))
    return torch.from_numpy(ids).to(device)


def minibatches(items: Sequence[T], batch_size: int, seed: int | None) -> Iterator[list[T]]:
    """Shuffled (seeded) mini-batches; seed None keeps the order."""
    order = np.arange(len(items)) if seed is None else np.random.default_rng(seed).permutation(len(items))
    for start in range(0, len(items), batch_size):
        yield [items[i] for i in order[start:start + batch_size]]


def length_sorted_batches(seqs: Sequence[str], batch_size: int, desc: str = "predict",
                          progress: bool = True) -> Iterator[list[int]]:
    """Index batches of sequences of similar length (less padding), shortest first, with a progress bar."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    yield from tqdm(batches, desc=desc, disable=not progress, leave=False)


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
