"""bench/block_traffic.py: a block's matmul FLOPs and its other ops' bytes, counted on the meta device."""
from __future__ import annotations

import json

import pytest

from bench.block_traffic import count_block, main
from rnalm.config import ModelConfig

TINY = dict(dim=64, num_layers=1, num_heads=4)


@pytest.mark.parametrize("align", [1, 64])
def test_matmul_flops_are_six_per_weight_per_token_at_the_width_the_matmuls_run(align):
    cfg = ModelConfig.preset("nano", **TINY, ffn_align=align)
    d, w, tokens = cfg.dim, cfg.ffn_width, 256
    c = count_block(cfg, tokens)
    assert (cfg.ffn_dim, w) == (170, 170 if align == 1 else 192)
    # forward 2, backward 4 (input and weight gradients): Wqkv, out_proj, the FFN's two inputs and its output
    assert c.matmul_flops == 6 * tokens * (3 * d * d + d * d + 3 * d * w)
    assert c.calls["matmul"] == 5 * 3


def test_the_traffic_is_the_blocks_own_ops_as_cuda_runs_them():
    """LayerNorms, SwishGate, RoPE and the two residual dropouts are counted; dropout as CUDA's one kernel (no
    bernoulli/div of the CPU composite); attention not at all; the bytes grow with the tokens."""
    cfg = ModelConfig.preset("nano", **TINY)
    c = count_block(cfg, 256)
    assert c.calls["native_layer_norm"] == c.calls["native_layer_norm_backward"] == 2
    assert c.calls["native_dropout"] == c.calls["native_dropout_backward"] == 2
    assert c.calls["sigmoid"] == 1 and c.calls["addcmul"] == 8   # SwishGate's forward; RoPE: q, k, both halves, x2
    assert not {"bernoulli", "bernoulli_", "div_", "_scaled_dot_product_attention_math", "bmm"} & set(c.calls)
    c2 = count_block(cfg, 512)
    per_token = (sum(c2.bytes.values()) - sum(c.bytes.values())) / 256
    assert per_token > 100 * cfg.dim        # > 100 passes of 1 byte per channel: dozens of kernels over [T, dim]
    assert sum(c.bytes.values()) > 256 * per_token * 0.9    # mostly per token: weight-sized ops are a small part


def test_main_writes_the_estimate(tmp_path):
    out = tmp_path / "t.json"
    r = main(["--preset", "nano", "--tokens", "512", "--out", str(out), "--matmul-tflops", "1", "--hbm-tbps", "1"])
    assert json.loads(out.read_text()) == r
    assert r["layers"] == 6 and r["ffn_width"] == 896
    assert r["step_matmul_s"] == pytest.approx(6 * r["block_matmul_tflop"])
    assert r["step_other_s"] == pytest.approx(6 * r["block_other_gb"] / 1e3)
    assert r["ops"][0]["gb"] >= r["ops"][-1]["gb"]


def test_eager_rope_makes_no_fp32_copies_of_q_and_k():
    """RoPE as autograd composed it (upcast, negate, concatenate, two products, sum, downcast, and back) moved 8.8
    of a giga block's 21.7 GB at 32k tokens, 662 KB per token in all; RotateHalf writes each half in two passes."""
    c = count_block(ModelConfig.preset("giga"), 16384)
    assert not {"cat", "_to_copy", "neg"} & {op for op in c.calls if c.bytes[op] > 16384 * 1280}
    assert sum(c.bytes.values()) / 16384 < 500e3
