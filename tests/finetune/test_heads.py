"""Heads: shapes, symmetry, the factorised outer concatenation, and independence from padding."""
from __future__ import annotations

import re

import pytest
import torch

from finetune.heads import (HeadConfig, RibosomeLoadHead, SecondaryStructureHead, SpliceSiteHead,
                            masked_instance_norm, upper_triangle_bce)
from finetune.unfreeze import Unfreezer, UnfreezeConfig, schedule
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo
from rnalm.tokenizer import batch_encode


def test_ss_head_matches_explicit_outer_concatenation_and_is_symmetric():
    torch.manual_seed(0)
    head = SecondaryStructureHead(8).eval()
    x = torch.randn(7, 8)
    concat = torch.cat([x[:, None, :].expand(7, 7, 8), x[None, :, :].expand(7, 7, 8)], dim=-1)
    grid = head.linear_in(concat).permute(2, 0, 1)[None]
    ref = torch.triu(head.conv_out(head.resnet(grid))[0, 0], 1)
    logits = head.pair_logits(x)
    torch.testing.assert_close(logits, ref + ref.T)
    assert torch.all(logits.diagonal() == 0)
    assert sorted(k.split(".")[0] for k in head.state_dict()) == sorted(
        ["linear_in"] * 2 + ["resnet"] * 6 + ["conv_out"] * 2)


def test_ss_head_per_sequence_output_ignores_padding():
    torch.manual_seed(0)
    head = SecondaryStructureHead(8).eval()
    tokens = torch.tensor(batch_encode(["ACGUACGUAC", "GGGAAACC"])[0])
    rep = torch.randn(2, tokens.shape[1], 8)
    both = head(rep, tokens)
    assert [t.shape for t in both] == [(10, 10), (8, 8)]
    alone = head(rep[1:, :10], tokens[1:, :10])[0]
    torch.testing.assert_close(both[1], alone)
    tokens = torch.tensor(batch_encode(["A", "GC"])[0])  # a lone nucleotide has no InstanceNorm statistics
    one, two = head(torch.randn(2, tokens.shape[1], 8), tokens)
    assert one.tolist() == [[0.0]] and two.shape == (2, 2) and two[0, 1] == two[1, 0]


def test_mrl_head_ignores_padding_and_splice_head_uses_cls():
    torch.manual_seed(0)
    head = RibosomeLoadHead(8, HeadConfig(mrl_num_blocks=2)).eval()
    tokens = torch.tensor(batch_encode(["ACGUACGUACGUACGU", "GGGAAACC"])[0])
    rep = torch.randn(2, tokens.shape[1], 8)
    short_alone = head(rep[1:, :10], tokens[1:, :10])
    rep_noisy = rep.clone()
    rep_noisy[1, 10:] = 100.0  # garbage at pad positions
    torch.testing.assert_close(head(rep_noisy, tokens)[1:], short_alone)
    splice = SpliceSiteHead(8, 3).eval()
    rep2 = rep.clone()
    rep2[:, 1:] = 0
    torch.testing.assert_close(splice(rep, tokens), splice(rep2, tokens))


def test_head_defaults_are_the_originals_and_sizes_below_one_are_refused():
    assert HeadConfig() == HeadConfig(ss_conv_dim=64, ss_num_blocks=2, splice_hidden=128, mrl_embed_dim=32,
                                      mrl_num_blocks=6, mrl_dropout=0.2)
    for bad, said in (({"ss_conv_dim": 0}, "ss_conv_dim must be >= 1, got 0"),
                      ({"mrl_num_blocks": 0}, "mrl_num_blocks must be >= 1, got 0"),
                      ({"mrl_dropout": 1.0}, "mrl_dropout must be in [0, 1), got 1.0"),
                      ({"mrl_dropout": -0.1}, "mrl_dropout must be in [0, 1), got -0.1")):
        with pytest.raises(ValueError, match=re.escape(said)):
            HeadConfig(**bad)


def test_splice_and_mrl_heads_compute_the_originals_on_an_unpadded_sequence():
    """Splice: CLS -> Linear -> GELU -> Linear. MRL: Linear, then blocks of [Conv1d, InstanceNorm1d, ELU] x 2 plus
    the input, the mean over every token (CLS and EOS too), dropout, Linear; written here with torch's own
    InstanceNorm1d, which the original uses."""
    torch.manual_seed(0)
    rep = torch.randn(1, 12, 8)
    tokens = torch.tensor(batch_encode(["ACGUACGUAC"])[0])
    splice = SpliceSiteHead(8, 3).eval()
    torch.testing.assert_close(splice(rep, tokens),
                               splice.linear_out(torch.nn.functional.gelu(splice.linear_in(rep[:, 0]))))
    mrl = RibosomeLoadHead(8, HeadConfig(mrl_num_blocks=2)).eval()
    norm, elu = torch.nn.InstanceNorm1d(32), torch.nn.functional.elu
    x = mrl.linear_in(rep).transpose(1, 2)
    for block in mrl.blocks:
        x = x + elu(norm(block.conv2(elu(norm(block.conv1(x))))))
    torch.testing.assert_close(mrl(rep, tokens), mrl.linear_out(x.mean(dim=-1)).squeeze(-1))
    mrl.train()   # the original's dropout before the output layer
    assert mrl(rep, tokens) != mrl(rep, tokens)


def test_masked_instance_norm_of_a_row_without_valid_positions_is_zero_not_nan():
    x = torch.randn(2, 4, 6)
    mask = torch.tensor([[[1.0] * 6], [[0.0] * 6]])
    out = masked_instance_norm(x, mask)
    assert torch.equal(out[1], torch.zeros(4, 6)) and out[0].std() > 0.5


def test_upper_triangle_bce_ignores_lower_triangle_and_diagonal():
    # (all-zero logits, as this test had, give log 2 whatever the targets and whichever cells are counted)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 5, generator=g) * 3
    target = torch.zeros(5, 5)
    target[0, 3] = target[1, 4] = 1.0
    expected = torch.stack([-torch.nn.functional.logsigmoid(logits[i, j] if target[i, j] else -logits[i, j])
                            for i in range(5) for j in range(i + 1, 5)]).mean()   # the 10 cells with i < j
    assert torch.isclose(upper_triangle_bce(logits, target), expected)
    below = torch.tril(torch.ones(5, 5, dtype=torch.bool))          # lower triangle and diagonal
    other_logits, other_target = logits.clone(), target.clone()
    other_logits[below] = torch.randn(int(below.sum()), generator=g) * 10
    other_target[below] = 1.0
    assert torch.equal(upper_triangle_bce(other_logits, other_target), upper_triangle_bce(logits, target))


def test_ss_loss_of_a_batch_is_the_mean_of_its_records_losses():
    """Each record's loss is a mean over its own upper triangle, and the batch's their mean: a long record counts
    as much as a short one, and the loss does not grow with the batch size."""
    from finetune.backbone import TaskModel
    from finetune.structure import StructureRecord, parse_dot_bracket
    from finetune.tasks.ss import ss_loss
    from tests.finetune.conftest import TINY

    torch.manual_seed(0)
    lm = RiNALMo(ModelConfig.preset("nano", **TINY))
    model = TaskModel(lm, SecondaryStructureHead(TINY["dim"], HeadConfig())).eval()
    records = [StructureRecord("a", "GGGAAACCC", parse_dot_bracket("(((...)))")),
               StructureRecord("b", "ACGUACGUACGUAAGG", parse_dot_bracket("((((......)))).."))]
    alone = [ss_loss(model, [r]).item() for r in records]
    assert ss_loss(model, records).item() == pytest.approx(sum(alone) / 2, rel=1e-5)


def test_unfreeze_schedules_of_the_paper_are_the_tasks_defaults():
    from finetune.tasks.mrl import MRLConfig
    from finetune.tasks.splice import SpliceConfig
    from finetune.tasks.ss import SSConfig

    ss = schedule(SSConfig().unfreeze, 33)
    assert sorted(ss) == [3, 6, 9, 12, 15, 18, 21, 24]
    assert ss[3] == ["transformer.final_layer_norm.", "transformer.blocks.30.", "transformer.blocks.31.",
                     "transformer.blocks.32."]
    assert ss[24] == [f"transformer.blocks.{i}." for i in (9, 10, 11)]
    mrl = schedule(MRLConfig().unfreeze, 33)
    assert list(mrl) == [3] and mrl[3][1] == "transformer.blocks.6." and len(mrl[3]) == 28
    at_once = schedule(SpliceConfig().unfreeze, 4)
    assert list(at_once) == [0] and len(at_once[0]) == 5
    assert schedule(UnfreezeConfig(head_only_epochs=0, max_blocks=10), 4) == at_once   # no more blocks than there are


def test_the_embedding_joins_the_last_unfreeze_step():
    assert schedule(UnfreezeConfig(head_only_epochs=1, every=2, blocks_per_step=2, train_embedding=True), 4) == {
        1: ["transformer.final_layer_norm.", "transformer.blocks.2.", "transformer.blocks.3."],
        3: ["transformer.blocks.0.", "transformer.blocks.1.", "embedding."]}


@pytest.mark.parametrize(("setting", "said"), [({"blocks_per_step": 0}, "blocks_per_step must be >= 1, got 0"),
                                               ({"every": 0}, "every must be >= 1, got 0"),
                                               ({"every": -3}, "every must be >= 1, got -3"),
                                               ({"max_blocks": -1}, "max_blocks must be >= 0"),
                                               ({"lr_divisor": 0.0}, "lr_divisor must be > 0"),
                                               ({"head_only_epochs": -1}, "head_only_epochs must be >= 0, got -1")])
def test_unfreeze_settings_that_cannot_make_a_schedule_are_refused(setting, said):
    """blocks_per_step=0 never finished building the schedule; every=0 put every step on one epoch, where the
    last overwrote the others (giga SS: blocks 9-11 only, no final LayerNorm); every<0 unfroze at epoch 0."""
    with pytest.raises(ValueError, match=said):
        UnfreezeConfig(**setting)


def test_unfreezer_on_a_model():
    lm = RiNALMo(ModelConfig.preset("nano", dim=16, num_layers=3, num_heads=2))
    u = Unfreezer(lm, UnfreezeConfig(head_only_epochs=1, every=1, blocks_per_step=2), 3)
    assert not any(p.requires_grad for p in lm.parameters())
    assert u.step(0) == []
    first = u.step(1)
    assert u.step(1) == []      # nothing twice into the optimizer
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert len(first) == len(trainable)
    assert all(n.startswith(("transformer.blocks.1.", "transformer.blocks.2.", "transformer.final_layer_norm."))
               for n in trainable)
    u.step(2)
    assert lm.transformer.blocks[0].mh_attn.Wqkv.weight.requires_grad
    assert not lm.embedding.weight.requires_grad and not lm.lm_mask_head.linear1.weight.requires_grad
    assert u.lr_scale(0) == 1.0 and u.lr_scale(2) == 0.1
