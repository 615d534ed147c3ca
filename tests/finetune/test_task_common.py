"""finetune.tasks.common's split container and batched inference (fast, no model)."""
from __future__ import annotations

import pytest

from finetune.tasks.common import Splits, batched_inference, length_sorted_batches


def test_limited_takes_the_first_n_of_each_part_and_none_keeps_a_part_whole():
    s = Splits(list(range(10)), list(range(10, 15)), list(range(20, 28)))
    assert s.limited(3, None, 2).sizes() == {"train": 3, "valid": 5, "test": 2}
    assert s.limited(None, 1, None) == Splits(s.train, [10], s.test)


@pytest.mark.parametrize("empty", ["train", "valid", "test"])
def test_an_empty_part_is_refused_with_the_sizes(empty):
    parts = {"train": [1, 2], "valid": [3], "test": [4], empty: []}
    with pytest.raises(ValueError, match=f"empty split: .*'{empty}': 0"):
        Splits(**parts, removed_near_duplicates=5).nonempty()


def test_one_sequence_instead_of_a_list_is_refused():
    with pytest.raises(TypeError, match=r"pass \[seq\]"):
        list(length_sorted_batches("ACGU", 2, progress=False))


def test_batched_inference_returns_one_output_per_sequence_in_input_order():
    seqs = ["ACGUA", "AC", "ACGUACG", "A", "ACG"]
    calls = []

    def run(idx):
        calls.append(idx)
        return [seqs[i].lower() for i in idx]

    assert batched_inference(seqs, 2, run, progress=False) == [s.lower() for s in seqs]
    assert calls == [[3, 1], [4, 0], [2]]
