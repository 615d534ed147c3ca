"""The GPU benchmark's logic on CPU with a tiny model: agreement is exact in fp32 and the numbers are sane."""
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_model_bench_runs_on_cpu_with_exact_fp32_agreement(ncrna_fasta, tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(REPO / "bench/model_bench.py"), "--preset", "nano", "--dim", "64", "--layers", "2",
                    "--heads", "4", "--budget", "4096", "--padded-batch", "32", "--steps", "2", "--warmup", "1",
                    "--dtype", "fp32", "--corpus", str(ncrna_fasta), "--out", str(out)], check=True, cwd=REPO)
    result = json.loads(out.read_text())
    agreement = result["agreement"]
    assert agreement["packed_backend"] == "sdpa"
    assert agreement["packed_vs_padded_logits"] < 1e-5 and agreement["packed_vs_padded_grads"] < 1e-5
    assert set(result["attention_dropout"]) == {"sdpa"} and result["attention_dropout"]["sdpa"]["std"] > 0.02
    assert 100 < result["corpus_mean_tokens"] < 150   # the ncRNA corpus: mean ~120 tokens
    for key in ("packed", "padded"):
        assert result[key]["real_tokens_per_s"] > 0 and 0 < result[key]["mfu"] < 1


def test_agreement_compares_the_padded_path_with_the_packed_one(monkeypatch):
    """The figure the GPU run reports must come from the two paths: a padded forward that is 1 % off shows."""
    import numpy as np
    import torch

    from bench.model_bench import agreement
    from rnalm.config import ModelConfig
    from rnalm.model import RiNALMo

    torch.manual_seed(0)
    model = RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=2, num_heads=4, attn_dropout=0.0,
                                       residual_dropout=0.0))
    lengths = np.array([5, 9, 17, 30])
    args = (model, lengths, np.random.default_rng(0), torch.device("cpu"), torch.float32)
    exact = agreement(*args)
    assert exact["packed_vs_padded_logits"] < 1e-5 and exact["packed_vs_padded_grads"] < 1e-5
    forward = RiNALMo.forward

    def off_by_one_percent(self, tokens, *a, **kw):
        out = forward(self, tokens, *a, **kw)
        return replace(out, logits=out.logits * 1.01)

    monkeypatch.setattr(RiNALMo, "forward", off_by_one_percent)
    off = agreement(*args)
    assert off["packed_vs_padded_logits"] == pytest.approx(0.01, rel=0.05)
    assert off["padded_vs_fp32_logits"] == pytest.approx(0.01, rel=0.05) and off["packed_vs_fp32_logits"] < 1e-5


def test_agreement_takes_its_fp32_reference_from_a_backend_that_runs_fp32(monkeypatch):
    """On the GPU the packed path's backend (torch varlen, flash-attn) takes only bf16/fp16: the fp32 reference
    must not go through it (the H200 run of 2026-12-04 stopped with 'FlashAttention only support fp16 and bf16')."""
    import numpy as np
    import torch

    from bench.model_bench import agreement
    from rnalm import attention
    from rnalm.config import ModelConfig
    from rnalm.model import RiNALMo

    def half_precision_only(q, *args):
        if q.dtype == torch.float32:
            raise RuntimeError("FlashAttention only support fp16 and bf16 data type")
        return attention._sdpa(q, *args)

    monkeypatch.setitem(attention.BACKENDS, "torch_varlen", half_precision_only)
    monkeypatch.setattr(attention, "available_backends", lambda device: ("torch_varlen", "sdpa"))
    torch.manual_seed(0)
    model = RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=2, num_heads=4, attn_dropout=0.0,
                                       residual_dropout=0.0))
    model.attention_backend = "torch_varlen"
    result = agreement(model, np.array([5, 9, 17, 30]), np.random.default_rng(0), torch.device("cpu"),
                       torch.bfloat16)
    assert result["packed_backend"] == "torch_varlen" and model.attention_backend == "torch_varlen"
    assert 0 < result["packed_vs_fp32_logits"] < 0.02 and result["packed_vs_padded_logits"] < 0.02  # bf16


def test_agreement_compares_every_other_kernel_backend_with_the_packed_one(monkeypatch):
    """On the GPU, torch_flash (auto's choice for training with attention dropout) is checked beside torch_varlen:
    a kernel that is 1 % off shows in its row, an identical one gives 0."""
    import numpy as np
    import torch

    import bench.model_bench as mb
    from rnalm import attention
    from rnalm.config import ModelConfig
    from rnalm.model import RiNALMo

    kernels = ("torch_varlen", "flash_attn", "torch_flash", "sdpa")
    monkeypatch.setattr(attention, "available_backends", lambda device: kernels)
    monkeypatch.setattr(mb, "available_backends", lambda device: kernels)
    monkeypatch.setitem(attention.BACKENDS, "torch_varlen", attention._sdpa)
    monkeypatch.setitem(attention.BACKENDS, "flash_attn", attention._sdpa)
    monkeypatch.setitem(attention.BACKENDS, "torch_flash", lambda *a: attention._sdpa(*a) * 1.01)
    torch.manual_seed(0)
    model = RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=2, num_heads=4, attn_dropout=0.0,
                                       residual_dropout=0.0))
    model.attention_backend = "torch_varlen"
    result = mb.agreement(model, np.array([5, 9, 17, 30]), np.random.default_rng(0), torch.device("cpu"),
                          torch.bfloat16)
    others = result["other_backends"]
    assert set(others) == {"flash_attn", "torch_flash"} and model.attention_backend == "torch_varlen"
    assert others["flash_attn"]["vs_packed_logits"] == 0 and others["flash_attn"]["vs_packed_grads"] == 0
    assert others["torch_flash"]["vs_packed_logits"] > 1e-3 and others["torch_flash"]["vs_packed_grads"] > 1e-3


def test_attention_dropout_check_tells_applied_dropout_from_none(monkeypatch):
    import torch

    from bench.model_bench import attention_dropout
    from rnalm import attention

    applied = attention_dropout("sdpa", torch.device("cpu"))
    assert abs(applied["mean"] - 1) < 0.01 and applied["std"] > 0.02 and applied["mask_replay_rel_err"] < 0.01
    assert applied["same_seed_same_mask"] and applied["other_seed_other_mask"]
    fakes = {"none": lambda q, k, v, cu, m, p: attention._sdpa(q, k, v, cu, m, 0.0),
             # the value from one dropout mask, the gradient through another: the backward drew its own mask
             "redrawn": lambda q, k, v, cu, m, p: (lambda a, b: a.detach() + b - b.detach())(
                 attention._sdpa(q, k, v, cu, m, p), attention._sdpa(q, k, v, cu, m, p))}
    for name, fake in fakes.items():
        monkeypatch.setitem(attention.BACKENDS, name, fake)
    none, redrawn = (attention_dropout(name, torch.device("cpu")) for name in fakes)
    assert none["std"] < 1e-3 and not none["other_seed_other_mask"]
    assert redrawn["std"] > 0.02 and redrawn["same_seed_same_mask"] and redrawn["mask_replay_rel_err"] > 0.3
