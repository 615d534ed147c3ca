"""finetune.trainer on a tiny model and synthetic losses (fast): the optimizer groups, the lr decay, clipping,
the epoch kept, the step and time caps, the settings refused,
validation in eval mode without gradients, bf16 off CUDA."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from finetune.backbone import TaskModel
from finetune.heads import SpliceSiteHead
from finetune.tasks.common import tokens_for
from finetune.trainer import TrainConfig, check_train_config, fit, seed_everything, train_epoch, weights_finite
from finetune.unfreeze import UnfreezeConfig
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo

TOKENS = tokens_for(["ACGUACGUAC", "GGGAAACC"], "cpu")


def tiny_model() -> TaskModel:
    torch.manual_seed(0)
    return TaskModel(RiNALMo(ModelConfig.preset("nano", dim=16, num_layers=2, num_heads=2)), SpliceSiteHead(16, 3))


def loss_fn(model, batch):
    return model(TOKENS).logsumexp(-1).mean()


def run_fit(tmp_path, scores, unfreeze=UnfreezeConfig(head_only_epochs=0), higher_is_better=True, batches=2,
            **train):
    """fit over len(scores) epochs whose validations give `scores`; (history, the scores saved)."""
    given, saved = iter(scores), []
    cfg = TrainConfig(out_dir=str(tmp_path), epochs=len(scores), progress=False, **train)
    history = fit(tiny_model(), cfg, unfreeze, lambda e: range(batches), loss_fn, lambda m: {"score": next(given)},
                  lambda m, v: saved.append(v["score"]), "score", higher_is_better)
    return history, saved


def test_the_head_learns_at_lr_and_each_unfrozen_step_at_lr_over_the_divisor(tmp_path, monkeypatch):
    made = []

    class Recorded(torch.optim.AdamW):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", Recorded)
    history, _ = run_fit(tmp_path, [1.0, 2.0], UnfreezeConfig(head_only_epochs=1, every=1, blocks_per_step=2),
                         lr=1e-3, weight_decay=0.05, optimizer="adamw", lr_decay_steps=10**6)
    (opt,) = made
    assert [g["base_lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-4])
    assert all(g["weight_decay"] == 0.05 for g in opt.param_groups)
    assert history[0]["trainable_lm_params"] == 0 < history[1]["trainable_lm_params"]
    made.clear()
    run_fit(tmp_path, [1.0])                       # train.optimizer=adam (the default): torch's Adam
    assert not made


def test_an_equal_score_is_no_improvement_and_lower_can_be_better(tmp_path):
    assert run_fit(tmp_path, [1.0, 1.0, 2.0])[1] == [1.0, 2.0]
    assert run_fit(tmp_path, [3.0, 2.0, 2.5, 2.0], higher_is_better=False)[1] == [3.0, 2.0]


def test_a_score_of_zero_is_a_number_that_can_be_best(tmp_path):
    assert run_fit(tmp_path, [0.0, -1.0])[1] == [0.0]


def test_validation_runs_in_eval_mode_without_gradients_and_training_resumes_in_train_mode(tmp_path):
    seen = []

    def loss(model, batch):
        seen.append(("train", model.training))
        return loss_fn(model, batch)

    def validate(model):
        seen.append(("valid", model.training, torch.is_grad_enabled()))
        return {"score": float(len(seen))}

    cfg = TrainConfig(out_dir=str(tmp_path), epochs=2, progress=False)
    fit(tiny_model(), cfg, UnfreezeConfig(head_only_epochs=0), lambda e: range(1), loss, validate,
        lambda m, v: None, "score")
    assert seen == [("train", True), ("valid", False, False)] * 2


def test_bf16_off_cuda_warns_and_trains_exactly_as_fp32(tmp_path):
    with pytest.warns(UserWarning, match="autocasts on CUDA only: this run on cpu trains in fp32"):
        bf16, _ = run_fit(tmp_path, [1.0], precision="bf16")
    fp32, _ = run_fit(tmp_path, [1.0], precision="fp32")
    assert bf16[0]["train_loss"] == fp32[0]["train_loss"]


def test_a_non_finite_backbone_weight_is_a_non_finite_model():
    model = tiny_model()
    assert weights_finite(model)
    with torch.no_grad():
        next(model.lm.parameters())[0] = float("inf")
    assert not weights_finite(model)


def test_step_cap_per_epoch_and_a_time_budget_that_still_trains_and_validates_one_step(tmp_path):
    history, _ = run_fit(tmp_path, [1.0, 2.0], batches=5, max_steps_per_epoch=2)
    assert [h["steps"] for h in history] == [2, 4]
    history, saved = run_fit(tmp_path, [1.0, 2.0], batches=5, max_seconds=0.0)
    assert [h["steps"] for h in history] == [1] and saved == [1.0]


def test_lr_decays_linearly_to_its_end_factor_and_stays_there():
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([{"params": [weight], "lr": 1.0, "base_lr": 1.0}])
    cfg = TrainConfig(lr_end_factor=0.1, lr_decay_steps=100, progress=False)
    for step, lr in ((0, 1.0), (50, 0.55), (100, 0.1), (250, 0.1)):
        train_epoch(torch.nn.Module(), opt, [0], lambda m, b: weight * 1.0, cfg, torch.device("cpu"), step, 0,
                    lambda: False)
        assert opt.param_groups[0]["lr"] == pytest.approx(lr)


@pytest.mark.parametrize(("grad_clip", "after_two_steps"), [(None, -2e-3 * 1000), (1.0, -2e-3)])
def test_gradients_are_cleared_each_step_and_clipped_to_grad_clip(grad_clip, after_two_steps):
    weight = torch.nn.Parameter(torch.zeros(()))
    opt = torch.optim.SGD([{"params": [weight], "lr": 1e-3, "base_lr": 1e-3}])
    cfg = TrainConfig(grad_clip=grad_clip, lr_end_factor=1.0, progress=False)
    losses, step = train_epoch(torch.nn.Module(), opt, [0, 1], lambda m, b: weight * 1000.0, cfg,
                               torch.device("cpu"), 0, 0, lambda: False)
    assert step == 2 and weight.item() == pytest.approx(after_two_steps)


@pytest.mark.parametrize(("setting", "said"), [
    ({"eval_batch_size": 0}, "train.eval_batch_size must be >= 1, got 0"),
    ({"lr_decay_steps": 0}, "train.lr_decay_steps must be >= 1, got 0"),
    ({"lr": 0.0}, "train.lr must be > 0, got 0.0"), ({"grad_clip": -1.0}, "train.grad_clip must be > 0, got -1.0"),
    ({"weight_decay": -0.1}, "train.weight_decay must be >= 0"), ({"lr_end_factor": -1.0}, "train.lr_end_factor"),
    ({"device": f"cuda:{torch.cuda.device_count()}"}, "CUDA device(s)"), ({"device": "gpu0"}, "use auto, cpu")])
def test_settings_that_cannot_train_are_refused_before_any_work(setting, said):
    with pytest.raises(ValueError, match=re.escape(said)):
        check_train_config(TrainConfig(**setting))


def test_seed_everything_seeds_python_numpy_and_torch():
    draws = []
    for _ in range(2):
        seed_everything(3)
        draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
    assert draws[0] == draws[1]
