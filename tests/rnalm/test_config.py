"""ModelConfig refuses sizes and settings that would crash late or train silently wrong, naming the field."""
from __future__ import annotations

import pytest

from rnalm.config import ModelConfig


@pytest.mark.parametrize("field, value", [
    ("num_heads", 0), ("num_heads", -4), ("dim", -32), ("num_layers", 0), ("dim", "32"), ("num_layers", True),
    ("attn_dropout", 1.5), ("residual_dropout", -0.5), ("layer_norm_eps", -1.0), ("rope_base", 0.0),
    ("attention_backend", "flashattn"), ("transition_dropout", 1.0), ("layer_norm_eps", 0.0),
    ("dim", 36),  # head_dim 9: rotary embeddings rotate pairs
    ("ffn_align", 0), ("activation_checkpointing", -1), ("num_heads", 3),  # 32 / 3: no whole head_dim
    # (a user review: a hand-written config.json's types passed, "false" as a true token_dropout)
    ("token_dropout", "false"), ("token_dropout", 0), ("ffn_align", 64.0), ("attn_dropout", "0.1"),
    ("rope_base", True), ("activation_checkpointing", "yes"),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{"dim": 32, "num_heads": 4, "num_layers": 2, field: value})


def test_every_preset_is_valid_and_a_resized_one_says_so():
    for name in ("nano", "micro", "mega", "giga"):
        assert ModelConfig.preset(name).num_heads == 20 and ModelConfig.preset(name).name == name
    assert ModelConfig.preset("nano", attn_dropout=0.0).name == "nano"  # same model, other training setting
    assert ModelConfig.preset("nano", dim=64, num_layers=2, num_heads=4).name == "nano-custom"
    assert ModelConfig.preset("nano", num_heads=10).name == "nano-custom"  # another head count is another model too
    with pytest.raises(ValueError, match="unknown model preset 'pico'"):
        ModelConfig.preset("pico")


def test_derived_sizes_and_the_released_form():
    giga = ModelConfig()
    assert (giga.ffn_dim, giga.ffn_width, giga.head_dim) == (3413, 3456, 64)  # 3413 rounded up to 64s
    assert ModelConfig(ffn_align=1).ffn_width == 3413
    nano = ModelConfig.preset("nano", activation_checkpointing=100)
    assert nano.checkpointed_blocks == 6
    assert ModelConfig.preset("nano", activation_checkpointing=True).checkpointed_blocks == 6
    assert ModelConfig.preset("nano", activation_checkpointing=2).checkpointed_blocks == 2
    run = ModelConfig(attention_backend="sdpa", activation_checkpointing=3, ffn_align=128, attn_dropout=0.0)
    assert run.released() == ModelConfig(attn_dropout=0.0)  # machine choices reset, what it computes kept
    assert ModelConfig.from_dict(run.to_dict()) == run
    with pytest.raises(ValueError, match=r"unknown model config keys: \['hidden'\]"):
        ModelConfig.from_dict({**run.to_dict(), "hidden": 5})
