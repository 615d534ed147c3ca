"""bench/activation_memory.py and what it measures: partial activation checkpointing and SwishGate's saved set."""
from __future__ import annotations

import pytest
import torch

from bench.activation_memory import SavedBytes, block_saved_bytes, blocks_to_checkpoint, main, model_saved_bytes
from rnalm.batch import PackedBatch
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo, SwishGate

TINY = dict(dim=64, num_layers=4, num_heads=4, attn_dropout=0.0)


def batch(n: int = 6, length: int = 32) -> PackedBatch:
    g = torch.Generator().manual_seed(0)
    return PackedBatch.from_sequences([torch.randint(5, 9, (length,), generator=g).tolist() for _ in range(n)])


def test_swish_gate_keeps_only_a_and_gate():
    a, gate = (torch.randn(50, 96, requires_grad=True) for _ in range(2))
    beta = torch.nn.Parameter(torch.ones(1))
    saved = SavedBytes(exclude=[beta])
    with saved.measure("swish"):
        SwishGate.apply(a, gate, beta)
    assert saved.total == 2 * 50 * 96 * 4
    with saved.measure("autograd"):      # what plain autograd keeps for the same expression (a, gate: seen)
        a * torch.sigmoid(beta * a) * gate
    assert saved.by_part["autograd"] == 2 * 50 * 96 * 4   # the sigmoid and a * sigmoid, beyond a and gate


@pytest.mark.parametrize("checkpointed", [1, 2, 3])   # of 4: one that is not keeps the shared cos/sin in view
def test_each_checkpointed_block_frees_its_activations(checkpointed):
    cfg = ModelConfig.preset("nano", **TINY)
    per_block = sum(block_saved_bytes(cfg, tokens=6 * 32, length=32, dtype=torch.float32, device="cpu").values())
    b = batch()

    def saved(n: int) -> int:
        torch.manual_seed(0)
        model = RiNALMo(ModelConfig.preset("nano", **TINY, activation_checkpointing=n)).train()
        return model_saved_bytes(model, lambda m: m.forward_packed(b))

    # A checkpointed block frees its whole saved set but its input (which checkpoint() keeps) and the rotary
    # cos/sin that all blocks share; checkpoint() also keeps the int32 cu_seqlens, once for all blocks.
    tokens = 6 * 32
    kept, rope, cu_seqlens = tokens * cfg.dim * 4, 2 * tokens * cfg.head_dim // 2 * 4, 7 * 4  # cos, sin: Dh / 2
    assert saved(0) - saved(checkpointed) == checkpointed * (per_block - kept - rope) - cu_seqlens


def test_blocks_to_checkpoint_is_the_fewest_that_fit():
    cfg = ModelConfig.preset("nano", **TINY)                 # 4 blocks, dim 64
    full, kept = 1000 * 10, 64 * 2 * 10                        # 1000 B/token/block, 10 tokens, bf16 inputs
    assert blocks_to_checkpoint(1000.0, cfg, 10, 4 * full, 2) == 0
    assert blocks_to_checkpoint(1000.0, cfg, 10, 4 * full - 1, 2) == 1           # 3 full + 1 kept
    assert blocks_to_checkpoint(1000.0, cfg, 10, 2 * full + 2 * kept, 2) == 2
    # 3 or 4 checkpointed: the peak is one block recomputing next to the inputs of the blocks before it
    assert blocks_to_checkpoint(1000.0, cfg, 10, full + 3 * kept, 2) == 3
    assert blocks_to_checkpoint(1000.0, cfg, 10, full + 3 * kept - 1, 2) is None


def test_cli_prints_the_budgets(capsys, tmp_path):
    import sys
    sys.argv = ["activation_memory.py", "--preset", "nano", "--dtype", "fp32", "--tokens", "256", "--length", "64",
                "--budget", "1024", "4096", "--memory-gib", "1", "--reserve-gib", "0.5", "--out", str(tmp_path / "a.json")]
    main()
    out = capsys.readouterr().out
    assert "KB per token per block" in out and "budget 4096" in out
