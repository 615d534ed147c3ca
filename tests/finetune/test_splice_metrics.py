"""finetune.tasks.classify.scores (splice sites and the user's classes) on hand-checked cases, and evaluate_examples on the model's own class choices."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.backbone import TaskModel
from finetune.heads import SpliceSiteHead
from finetune.tasks.common import tokens_for
from finetune.tasks.classify import class_probabilities, classification_loss, evaluate_examples, scores
from finetune.tasks.splice import CLASSES
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo


def test_scores_hand_checked():
    labels, pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    # class 0: P 1/2 R 1/2; class 1: P 2/3 R 1; class 2: P 1 R 1/2
    f1 = [0.5, 0.8, 2 / 3]
    assert scores(labels, pred, CLASSES) == pytest.approx({"n": 6, "accuracy": 4 / 6, "macro_f1": np.mean(f1),
                                                  **{f"f1_{c}": v for c, v in zip(CLASSES, f1)}})
    # a class neither present nor predicted has no F1 and is left out of the macro mean (it counted as 0)
    assert scores(np.array([0, 1]), np.array([0, 1]), CLASSES) == pytest.approx(
        {"n": 2, "accuracy": 1.0, "macro_f1": 1.0, **{f"f1_{c}": v for c, v in zip(CLASSES, [1.0, 1.0, None])}})
    # absent but predicted: F1 0, counted
    assert scores(np.array([0, 0]), np.array([0, 2]), CLASSES)["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    # no records: no numbers (NaN is not JSON)
    assert scores(np.zeros(0, int), np.zeros(0, int), CLASSES) == {"n": 0, "accuracy": None, "macro_f1": None,
                                                                    **{f"f1_{c}": None for c in CLASSES}}


def tiny_classifier() -> TaskModel:
    """A seeded one-block model with the splice head, in eval mode (no dropout: the same logits twice)."""
    torch.manual_seed(0)
    lm = RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=1, num_heads=4))
    return TaskModel(lm, SpliceSiteHead(32, len(CLASSES))).eval()


def test_the_classification_loss_is_cross_entropy_against_each_records_class():
    model = tiny_classifier()
    batch = [("ACGUACGUAA", 2), ("GGGAAACCC", 1)]
    logits = model(tokens_for([s for s, _ in batch], "cpu"))
    torch.testing.assert_close(classification_loss(model, batch), F.cross_entropy(logits, torch.tensor([2, 1])))


def test_evaluate_examples_scores_each_sequences_own_prediction():
    model = tiny_classifier()
    rng = np.random.default_rng(0)
    examples = [("".join(rng.choice(list("ACGU"), int(rng.integers(20, 60)))), int(rng.integers(0, 3)))
                for _ in range(24)]
    with torch.no_grad():  # an untrained head picks one class for all: centre and widen its logits
        head = model.pred_head.linear_out
        head.weight.mul_(100.0)
        head.bias.sub_(model(tokens_for([s for s, _ in examples], "cpu")).mean(0))
    probs = np.stack([class_probabilities(model, [s], 1, progress=False)[0] for s, _ in examples])
    assert np.allclose(probs.sum(1), 1) and len(set(probs.argmax(1).tolist())) > 1
    expected = scores(np.array([y for _, y in examples]), probs.argmax(1), CLASSES)
    assert evaluate_examples(model, examples, CLASSES, batch_size=5, progress=False) == pytest.approx(expected)


def test_a_splice_label_outside_the_classes_names_the_file_and_line(tmp_path):
    """Labels 0..2 (none, donor, acceptor); a 3 would index past the head's three logits or be trained as noise."""
    import gzip

    from finetune.tasks.splice import SPLICE_FILE, SpliceDataConfig, load_splits

    path = tmp_path / SPLICE_FILE
    path.parent.mkdir(parents=True)
    rows = ["split,label,label_name,sequence", "dev,1,donor,ACGUACGU", "test,2,acceptor,GGGAAACC", "dev,3,x,ACGUAAAA"]
    path.write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    with pytest.raises(ValueError, match=rf"{SPLICE_FILE}:4: label 3 not in 0..2"):
        load_splits(SpliceDataConfig(root=str(tmp_path)))
