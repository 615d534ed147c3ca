"""model.compile and model.ffn_align (issue 7): budget padding keeps real sequences' results, and compiled,
FFN-aligned training equals eager."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pretrain.data.packing import pad_to_tokens
from rnalm.batch import IGNORE_INDEX, PackedBatch
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo
from rnalm.tokenizer import MASK_ID, PAD_ID

from .trainer_runs import events, read_log, run_trainer, step_lines

# torch.compile on CPU generates C++ (inductor): it needs a compiler
needs_cxx = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                               reason="torch.compile's CPU backend needs a C++ compiler (g++)")


def masked_batch(lengths, seed=0) -> PackedBatch:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(5, 9, size=n) for n in lengths]
    targets = []
    for s in seqs:
        t = np.full(len(s), IGNORE_INDEX)
        pick = rng.random(len(s)) < 0.3
        t[pick], s[pick] = s[pick], MASK_ID
        targets.append(t)
    return PackedBatch.from_sequences(seqs, targets=targets, ids=[f"r{i}" for i in range(len(seqs))])


def tiny_model(activation_checkpointing: bool = False) -> RiNALMo:
    torch.manual_seed(0)
    return RiNALMo(ModelConfig.preset("nano", dim=64, num_layers=2, num_heads=4, attn_dropout=0.0,
                                      residual_dropout=0.0, attention_backend="sdpa",
                                      activation_checkpointing=activation_checkpointing)).train()


def loss_and_grads(model: RiNALMo, batch: PackedBatch):
    model.zero_grad(set_to_none=True)
    index = (batch.targets != IGNORE_INDEX).nonzero().squeeze(1)
    logits = model.forward_packed(batch, logits_index=index).logits
    loss = F.cross_entropy(logits, batch.targets[index])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_pad_to_tokens_appends_pad_only_chunks_without_loss():
    batch = masked_batch([30, 50, 20])
    padded = pad_to_tokens(batch, 256, chunk=64)
    assert padded.num_tokens == 256 and padded.ids == batch.ids
    assert padded.cu_seqlens.dtype == torch.int32
    assert padded.cu_seqlens.tolist() == [0, 30, 80, 100, 164, 228, 256]   # 156 pad tokens: 64 + 64 + 28
    assert padded.max_seqlen == 64
    assert torch.equal(padded.tokens[:100], batch.tokens) and (padded.tokens[100:] == PAD_ID).all()
    assert torch.equal(padded.targets[:100], batch.targets) and (padded.targets[100:] == IGNORE_INDEX).all()
    assert padded.positions[100:].tolist() == [*range(64), *range(64), *range(28)]
    even = pad_to_tokens(batch, 228, chunk=64)  # 128 pad tokens: two whole chunks, no empty third
    assert even.cu_seqlens.tolist() == [0, 30, 80, 100, 164, 228] and even.num_tokens == 228
    assert pad_to_tokens(batch, 100, chunk=64) is batch
    with pytest.raises(ValueError, match="exceeds the padded size 99"):
        pad_to_tokens(batch, 99, chunk=64)


def test_budget_padding_leaves_loss_and_gradients_unchanged():
    model, batch = tiny_model(), masked_batch([40, 7, 120, 33], seed=1)
    loss, grads = loss_and_grads(model, batch)
    padded_loss, padded_grads = loss_and_grads(model, pad_to_tokens(batch, 512, chunk=128))
    torch.testing.assert_close(padded_loss, loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == padded_grads.keys()
    for name in grads:
        torch.testing.assert_close(padded_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
@needs_cxx
@pytest.mark.parametrize("activation_checkpointing", [False, True])
def test_compiled_blocks_match_eager_and_keep_parameter_names(activation_checkpointing):
    eager = tiny_model()
    compiled = tiny_model(activation_checkpointing).compile_blocks(dynamic=False)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    for seed, lengths in enumerate(([40, 7, 120, 33], [200, 100])):   # two batches, one padded shape
        batch = pad_to_tokens(masked_batch(lengths, seed=seed), 320, chunk=128)
        loss, grads = loss_and_grads(eager, batch)
        c_loss, c_grads = loss_and_grads(compiled, batch)
        torch.testing.assert_close(c_loss, loss, rtol=1e-5, atol=1e-6)
        for name in grads:
            torch.testing.assert_close(c_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
@needs_cxx
@pytest.mark.timeout(400)
def test_trainer_with_compile_and_ffn_align_matches_eager_under_zero3(pretrain_shards, tmp_path):
    """The real trainer (2 ranks, ZeRO-3 on gloo, blocks as ZeRO-3 leaves) with model.compile and model.ffn_align
    (issue 7's candidate default) and with neither, dropout off: same sample stream, same losses; the compiled run
    pads every micro-batch to the budget."""
    common = ("--train.max_steps=4", "--checkpoint.every=0", "--checkpoint.save_at_end=false",
              "--model.attn_dropout=0", "--model.residual_dropout=0", "--train.valid_every=2")
    run_trainer(pretrain_shards, tmp_path / "eager", *common, "--model.ffn_align=1")
    proc = run_trainer(pretrain_shards, tmp_path / "compiled", *common, "--model.compile=true",
                       "--model.ffn_align=64", timeout=360)
    eager, compiled = step_lines(read_log(tmp_path / "eager")), step_lines(read_log(tmp_path / "compiled"))
    assert [r["samples_sha1"] for r in compiled] == [r["samples_sha1"] for r in eager] and len(eager) == 4
    assert [r["step_tokens"] for r in compiled] == [r["step_tokens"] for r in eager]   # real tokens only
    np.testing.assert_allclose([r["loss"] for r in compiled], [r["loss"] for r in eager], rtol=1e-4)
    stats = events(read_log(tmp_path / "compiled"), "compile_stats")
    assert [s["step"] for s in stats] == [1, 4] and stats[0]["static_tokens"] == 1024
    # pre/post attention graphs, forward for training only (backward graphs are not counted): compiled once
    # for all blocks and steps, whatever each batch's sequence count; no graph break from ZeRO-3's hooks
    assert stats[0]["graph_breaks"] == stats[1]["graph_breaks"] == 0
    # (the validation at step 2 adds the parts' eval/no_grad graphs, and no false recompilation warning)
    assert (stats[0]["unique_graphs"], stats[1]["unique_graphs"]) == (2, 4) and "warning:" not in proc.stderr
    assert not events(read_log(tmp_path / "eager"), "compile_stats")
