"""bench/zero3_comm.py: the on-paper ZeRO communication and H100-hours calculator against hand-computed values."""
from __future__ import annotations

import pytest
import torch

from bench.zero3_comm import (ORIGINAL_SEQUENCES, Link, Setup, collectives, estimate, gpu_hours, main,
                              parameter_numels, zero3_gathers)
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo

# A made-up model: P = 2,001,050 parameters; with threshold 1000, "a" and "b" (1,050) stay resident.
NUMELS = {"a": 1000, "b": 50, "c": 2_000_000}
SLOW = Link("slow", gbytes_per_s=10.0, efficiency=0.5)      # 5e9 B/s
FAST = Link("fast", gbytes_per_s=100.0, efficiency=1.0)     # 1e11 B/s


@pytest.mark.parametrize("preset", ["nano", "giga"])
def test_parameter_numels_match_the_model(preset):
    cfg = ModelConfig.preset(preset)
    with torch.device("meta"):
        model = RiNALMo(cfg)
    assert parameter_numels(cfg) == {n: p.numel() for n, p in model.named_parameters()}


def test_zero3_without_persistence_is_two_bf16_gathers_and_an_fp32_reduce_scatter_over_the_ring():
    colls = collectives(NUMELS, Setup(3, 4, SLOW, persistence_threshold=0, max_reuse_distance=0))
    est = estimate(colls, tokens_per_micro=1000, grad_accum=1, tokens_per_s=1e6)
    assert est.bytes_per_gpu == pytest.approx(12_006_300.0)         # (2 + 2 + 4) B x 2,001,050 x 3/4
    assert est.comm_s == pytest.approx(2.40126e-3)                   # / 5e9 B/s
    assert est.compute_s == pytest.approx(1e-3)
    assert est.efficiency_serial == pytest.approx(1 / 3.40126)
    assert est.efficiency_overlapped == pytest.approx(1 / 2.40126)
    assert est.break_even_tokens == pytest.approx(2401.26)
    ga3 = estimate(colls, tokens_per_micro=1000, grad_accum=3, tokens_per_s=1e6)
    assert ga3.bytes_per_gpu == pytest.approx(36_018_900.0)          # every micro-step again
    assert ga3.efficiency_serial == pytest.approx(est.efficiency_serial)
    bf16 = Setup(3, 4, SLOW, persistence_threshold=0, max_reuse_distance=0, grad_bytes=2)
    assert estimate(collectives(NUMELS, bf16), 1000, 1, 1e6).bytes_per_gpu == pytest.approx(9_004_725.0)  # 3 x 2 B


def test_persistent_params_are_gathered_once_per_step_and_not_overlapped():
    colls = collectives(NUMELS, Setup(3, 4, SLOW, persistence_threshold=1000, max_reuse_distance=0))
    est = estimate(colls, tokens_per_micro=1000, grad_accum=2, tokens_per_s=1e6)
    # per micro-step: 2 gathers of 2,000,000 x 2 B + reduce-scatter of 2,001,050 x 4 B, x 3/4; per step: 1,050 x 2 B x 3/4
    assert est.bytes_per_gpu == pytest.approx(2 * 12_003_150.0 + 1575.0)
    assert est.efficiency_overlapped == pytest.approx(2e-3 / (2 * 2.40063e-3 + 315e-9))


@pytest.mark.parametrize(("reuse", "regathered_layers", "recomputed_layers"),
                         [(0, 8, 8), (1_500_000, 5, 6), (1_000_000_000, 0, 0)])
def test_the_backward_regathers_only_what_the_reuse_distance_released(reuse, regathered_layers, recomputed_layers):
    """DeepSpeed 0.19.8, 2 gloo ranks, 8 bias-free Linear(512, 512) layers, persistence 0: all-gathered elements per
    step after the first, counted at torch.distributed (ad-hoc run): the forward gathers all 8 layers every time,
    the backward 8 / 5 / 0 of them at stage3_max_reuse_distance 0 / 1.5M / 1e9. With checkpointing (not measured),
    a layer's next use after its forward is its recompute, 3 passes over the later layers away, and its backward
    follows at once (re-gathered too only at reuse distance 0)."""
    numels = {f"transformer.blocks.{i}.w": 262_144 for i in range(8)}
    gathered = zero3_gathers(numels, Setup(3, 2, SLOW, persistence_threshold=0, max_reuse_distance=reuse))
    assert gathered == {"fwd": 8 * 262_144, "bwd": regathered_layers * 262_144, "recompute": 0}
    checkpointed = Setup(3, 2, SLOW, persistence_threshold=0, max_reuse_distance=reuse, ac_regather=True)
    assert zero3_gathers(numels, checkpointed) == {"fwd": 8 * 262_144, "bwd": 8 * 262_144 if reuse == 0 else 0,
                                                   "recompute": recomputed_layers * 262_144}


def test_hpz_moves_the_backward_gather_to_the_node():
    colls = collectives(NUMELS, Setup(3, 8, SLOW, node_link=FAST, gpus_per_node=2, persistence_threshold=0,
                                          max_reuse_distance=0))
    bwd = next(c for c in colls if c.name.startswith("bwd"))
    assert (bwd.group, bwd.link, bwd.bytes_per_gpu) == (2, FAST, pytest.approx(2_001_050.0))  # 2 B x P x 1/2
    slow_bytes = (2 + 4) * 2_001_050 * 7 / 8                 # forward gather (bf16), gradients (fp32)
    assert estimate(colls, 1000, 1, 1e6).comm_s == pytest.approx(slow_bytes / 5e9 + 2_001_050.0 / 1e11)


def test_zero1_communicates_once_per_step_whatever_the_accumulation():
    colls = collectives(NUMELS, Setup(1, 4, SLOW))
    one, four = (estimate(colls, 1000, g, 1e6) for g in (1, 4))
    assert one.bytes_per_gpu == four.bytes_per_gpu == pytest.approx(9_004_725.0)   # (4 + 2) B x P x 3/4
    assert four.efficiency_serial == pytest.approx(4e-3 / (4e-3 + 1.800945e-3))
    assert collectives(NUMELS, Setup(2, 4, SLOW))[0].per_micro_step      # ZeRO-2 reduce-scatters every micro-step


def test_gpu_hours():
    assert ORIGINAL_SEQUENCES == 102e6
    assert gpu_hours(102e6, 120.22, 41_000) == pytest.approx(83.079, rel=1e-4)  # 1.226244e10 tokens / 41k / 3600
    assert gpu_hours(1e6, 100, 1000, efficiency=0.5) == pytest.approx(1e8 / 500 / 3600)


def test_cli_giga(capsys):
    r = main(["--json", "--tokens-per-s", "100000", "--mean-tokens", "300"])
    capsys.readouterr()
    assert r["params"] == 650_901_793
    resident = r["persistent_params"]
    zero3_64 = next(w for w in r["scaling"] if (w["zero"], w["gpus"], w["link"], w["hpz"]) == (3, 64, "IB", False))
    # backward re-gather (reuse distance 1e9): blocks 0-6 and block 7's Wqkv, out_proj and FFN-in weights
    regathered = 7 * 19_659_520 + 4_915_200 + 1_638_400 + 4_368_640
    per_dir = (2 * (650_901_793 - resident + regathered) + 4 * 650_901_793) * 63 / 64 + 2 * resident * 63 / 64
    assert zero3_64["by_speed"]["measured"]["bytes_per_gpu"] == pytest.approx(per_dir)
    assert zero3_64["by_speed"]["measured"]["compute_s"] == pytest.approx(32768 / 1e5)
    measured = next(h for h in r["gpu_hours"] if h["speed"] == "measured")
    assert measured["given"] == pytest.approx(102e6 * 300 / 1e5 / 3600)
