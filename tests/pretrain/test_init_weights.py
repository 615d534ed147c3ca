"""train.init_weights: which released weights a run's model section accepts (pretrain.train.read_init_weights)."""
from __future__ import annotations

import pytest
import torch

from pretrain.train import read_init_weights
from rnalm.config import ModelConfig
from rnalm.io import WeightsError, export_official, save_pretrained
from rnalm.model import RiNALMo

TINY = dict(dim=32, num_layers=1)


def test_weights_with_another_head_count_or_rope_base_are_refused(tmp_path):
    """Same shapes, other attention: a 2-head model's weights in a 4-head run would train a different model from
    them without a word; a converted directory records its settings, so they are compared, not overridden."""
    saved = save_pretrained(RiNALMo(ModelConfig.preset("nano", num_heads=2, **TINY)), tmp_path / "two_heads")
    with pytest.raises(WeightsError, match=r"'num_heads': \(2, 4\)"):
        read_init_weights(str(saved), ModelConfig.preset("nano", num_heads=4, **TINY))
    with pytest.raises(WeightsError, match=r"'num_heads': \(2, 4\)"):  # its file: read with its config.json
        read_init_weights(str(saved / "model.safetensors"), ModelConfig.preset("nano", num_heads=4, **TINY))
    with pytest.raises(WeightsError, match=r"'rope_base': \(10000.0, 20000.0\)"):
        read_init_weights(str(saved), ModelConfig.preset("nano", num_heads=2, rope_base=20000.0, **TINY))
    model = RiNALMo(ModelConfig.preset("nano", num_heads=2, **TINY))
    model.load_state_dict(read_init_weights(str(saved), model.config))  # the same settings load


def test_the_original_layout_takes_the_runs_head_count(tmp_path):
    """The original's .pt does not record its head count: the model section's is used, not a refusal."""
    model = RiNALMo(ModelConfig.preset("nano", num_heads=4, **TINY))
    export_official(model.state_dict(), tmp_path / "rinalmo.pt")
    state = read_init_weights(str(tmp_path / "rinalmo.pt"), model.config)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
