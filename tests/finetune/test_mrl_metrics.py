"""finetune.tasks.regress.evaluate_examples (MRL and the user's regression): each reported figure is that metric of the model's own predictions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr

from finetune.backbone import TaskModel
from finetune.heads import HeadConfig, RibosomeLoadHead
from finetune.tasks.mrl import MIN_LOAD, saved_scaler
from finetune.tasks.regress import Example, Scaler, evaluate_examples, predict_values
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo


def nano_mrl_model() -> TaskModel:
    torch.manual_seed(0)
    lm = RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=1, num_heads=4))
    return TaskModel(lm, RibosomeLoadHead(32, HeadConfig(mrl_num_blocks=1))).eval()


def test_rows_are_r2_pearson_and_mse_of_the_predictions_overall_and_per_group():
    model = nano_mrl_model()
    rng = np.random.default_rng(0)
    examples = [Example("".join(rng.choice(list("ACGU"), int(rng.integers(20, 50)))), float(rng.uniform(2, 8)),
                        "human" if i % 3 else "random") for i in range(30)]
    scaler = Scaler(mean=5.0, std=1.5)
    pred = predict_values(model, [e.sequence for e in examples], scaler, batch_size=5, progress=False)
    assert pred.shape == (30,) and np.std(pred) > 0
    for i in (0, 7, 29):  # each prediction is its own sequence's, in input order
        alone = predict_values(model, [examples[i].sequence], scaler, batch_size=1, progress=False)
        assert alone[0] == pytest.approx(pred[i], rel=1e-4)
    true = np.array([e.value for e in examples])

    def r2(t, p):
        return 1 - np.sum((t - p) ** 2) / np.sum((t - t.mean()) ** 2)

    rows = evaluate_examples(model, examples, scaler, batch_size=5, progress=False)
    assert rows["all"] == pytest.approx({"n": 30, "r2": r2(true, pred), "pearson_r": pearsonr(true, pred)[0],
                                         "mse": np.mean((true - pred) ** 2)})
    assert r2(true, pred) != pytest.approx(r2(pred, true))  # the argument order shows
    for group in ("human", "random"):
        sel = np.array([e.group == group for e in examples])
        assert rows[group] == pytest.approx({"n": int(sel.sum()), "r2": r2(true[sel], pred[sel]),
                                             "pearson_r": pearsonr(true[sel], pred[sel])[0],
                                             "mse": np.mean((true[sel] - pred[sel]) ** 2)})


def test_scaler_round_trip_and_no_negative_load():
    scaler = Scaler(mean=5.0, std=1.5, min=MIN_LOAD)
    y = np.array([0.5, 5.0, 9.5])
    assert np.allclose(scaler.inverse(scaler.transform(y)), y)
    assert scaler.inverse(np.array([-10.0, 0.0, 1.0])).tolist() == [0.0, 5.0, 6.5]  # a mean ribosome load is >= 0
    assert Scaler(mean=5.0, std=1.5).inverse(np.array([-10.0])).tolist() == [-10.0]  # the user's values: no clamp
    # an MRL model saved before the clamp was stored keeps it
    assert saved_scaler({"scaler": {"mean": 5.0, "std": 1.5}}).inverse(np.array([-10.0])).tolist() == [0.0]


def test_a_group_of_one_record_has_no_r2_rather_than_nan(recwarn):
    """A small test subset can hold one record of a group: R^2 is undefined there; it was NaN (sklearn's
    UndefinedMetricWarning), which json.dumps writes as the non-JSON token NaN into results.json."""
    model = nano_mrl_model()
    examples = [Example("ACGUACGUAC" * 3, 3.0 + i, "human" if i else "random") for i in range(4)]
    rows = evaluate_examples(model, examples, Scaler(mean=5.0, std=1.5), batch_size=4, progress=False)
    assert rows["random"]["n"] == 1 and rows["random"]["r2"] is None
    assert rows["human"]["n"] == 3 and isinstance(rows["human"]["r2"], float)
    assert not [w for w in recwarn if "R^2" in str(w.message)]


def test_pearson_is_none_where_undefined_rather_than_nan():
    """Constant targets made np.corrcoef NaN, which json.dumps writes as the non-JSON token NaN."""
    model = nano_mrl_model()
    examples = [Example("ACGUACGUAC" * 3 + "G" * i, 3.0) for i in range(4)]
    rows = evaluate_examples(model, examples, Scaler(mean=5.0, std=1.5), batch_size=4, progress=False)
    assert rows["all"]["pearson_r"] is None and rows["all"]["r2"] is not None
    one = evaluate_examples(model, examples[:1], Scaler(mean=5.0, std=1.5), batch_size=4, progress=False)
    assert one["all"]["pearson_r"] is None and one["all"]["r2"] is None
    from finetune.tasks.regress import _pearson

    assert _pearson(np.array([1.0, 2.0, 3.0]), np.array([2.0, 2.0, 2.0])) is None  # constant predictions too
