"""PackedBatch built from sequences, and moved between devices."""
from __future__ import annotations

import numpy as np
import torch

from rnalm.batch import IGNORE_INDEX, PackedBatch


def test_from_sequences_packs_tokens_targets_and_ids_back_to_back():
    seqs = [np.array([0, 5, 6, 2]), np.array([0, 7, 2])]
    targets = [np.array([IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX], np.int8), np.full(3, IGNORE_INDEX, np.int8)]
    b = PackedBatch.from_sequences(seqs, targets, ids=["a", "b"])
    assert b.tokens.tolist() == [0, 5, 6, 2, 0, 7, 2] and b.cu_seqlens.tolist() == [0, 4, 7] and b.max_seqlen == 4
    assert b.positions.tolist() == [0, 1, 2, 3, 0, 1, 2] and b.ids == ("a", "b")
    assert b.targets.dtype == torch.int64 and b.targets.tolist()[:2] == [IGNORE_INDEX, 5]  # int8 in, loss-ready out
    assert b.lengths.dtype == torch.int64 and b.lengths.tolist() == [4, 3]


def test_to_moves_every_tensor_and_keeps_the_rest():
    b = PackedBatch.from_sequences([np.array([0, 5, 2])], [np.array([IGNORE_INDEX, 5, IGNORE_INDEX])], ids=["a"])
    moved = b.to("meta")
    assert all(t.device.type == "meta" for t in (moved.tokens, moved.cu_seqlens, moved.positions, moved.targets))
    assert moved.max_seqlen == 3 and moved.ids == ("a",) and b.tokens.device.type == "cpu"
