"""finetune.backbone on tiny random models (fast): the task model's forward, saving and loading a fine-tuned
directory, importing the original's SS checkpoint, the backbone files recorded with results."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch
from safetensors import safe_open

from finetune.backbone import (BackboneConfig, TaskModel, backbone_files, import_original_ss, load_backbone,
                               load_finetuned, save_finetuned)
from finetune.heads import HeadConfig, SecondaryStructureHead
from finetune.tasks.common import tokens_for
from rnalm.config import ModelConfig
from rnalm.io import WeightsError, export_official
from rnalm.model import RiNALMo

TOKENS = tokens_for(["GGGGAAACCCC", "ACGUACGU"], "cpu")


def ss_model(blocks: int = 2) -> TaskModel:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", dim=16, num_layers=2, num_heads=4)
    return TaskModel(RiNALMo(cfg), SecondaryStructureHead(16, HeadConfig(ss_conv_dim=8, ss_num_blocks=blocks)))


def test_a_trainable_lm_gets_gradients_and_a_frozen_one_none():
    model = ss_model()
    model.lm.requires_grad_(False)
    model(TOKENS)[0].sum().backward()
    assert all(p.grad is None for p in model.lm.parameters())
    model.lm.requires_grad_(True)
    model(TOKENS)[0].sum().backward()
    assert model.lm.transformer.blocks[0].mh_attn.Wqkv.weight.grad.abs().sum() > 0


def test_a_bf16_backbone_feeds_the_fp32_head_and_is_saved_as_fp32(tmp_path):
    model = ss_model()
    model.lm.to(torch.bfloat16)
    assert model(TOKENS)[0].dtype == torch.float32
    save_finetuned(model, tmp_path, {"task": "ss", "head": {"ss_conv_dim": 8, "ss_num_blocks": 2}, "threshold": 0.3})
    loaded, meta = load_finetuned(tmp_path)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32} and meta["threshold"] == 0.3
    with safe_open(str(tmp_path / "finetuned.safetensors"), "pt") as f:   # the file too: fp32 whatever trained
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_a_model_of_another_task_or_from_two_saves_is_refused(tmp_path):
    save_finetuned(ss_model(), tmp_path, {"task": "ss", "head": {"ss_conv_dim": 8}, "threshold": 0.3})
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path} is a fine-tuned 'ss' model, not 'splice'")):
        load_finetuned(tmp_path, task="splice")
    meta = json.loads((tmp_path / "finetune.json").read_text())
    (tmp_path / "finetune.json").write_text(json.dumps({**meta, "save_id": "another"}))
    with pytest.raises(WeightsError, match="come from different saves"):
        load_finetuned(tmp_path)


def test_the_originals_ss_checkpoint_needs_a_threshold_and_a_head_that_fits(tmp_path):
    model = ss_model(blocks=3)
    export_official(model.lm.state_dict(), tmp_path / "lm.pt")
    lm = {f"lm.{k}": v for k, v in torch.load(tmp_path / "lm.pt", weights_only=True).items()}
    head = {f"pred_head.{k}": v for k, v in model.pred_head.state_dict().items()}
    torch.save({**lm, **head, "threshold": torch.tensor(0.2)}, tmp_path / "ss_ft.pt")
    imported, meta = load_finetuned(import_original_ss(tmp_path / "ss_ft.pt", tmp_path / "ok", num_heads=4))
    assert meta["head"]["ss_num_blocks"] == 3 and meta["threshold"] == pytest.approx(0.2)
    with torch.no_grad():
        torch.testing.assert_close(imported(TOKENS)[1], model.eval()(TOKENS)[1])
    torch.save({**lm, **head}, tmp_path / "no_threshold.pt")
    with pytest.raises(WeightsError, match="not an original secondary-structure checkpoint"):
        import_original_ss(tmp_path / "no_threshold.pt", tmp_path / "x", num_heads=4)
    bad = {**head, "pred_head.conv_out.weight": torch.zeros(1, 8, 5, 5)}
    torch.save({**lm, **bad, "threshold": torch.tensor(0.2)}, tmp_path / "bad_head.pt")
    with pytest.raises(WeightsError, match="secondary-structure head does not fit"):
        import_original_ss(tmp_path / "bad_head.pt", tmp_path / "y", num_heads=4)


@pytest.mark.parametrize(("asked", "family"), [("NONE", None), ("Srp", "srp"), ("rnasep", "RNaseP")])
def test_a_held_out_family_is_read_whatever_its_case(tmp_path, asked, family):
    model = ss_model()
    export_official(model.lm.state_dict(), tmp_path / "lm.pt")
    state = {f"lm.{k}": v for k, v in torch.load(tmp_path / "lm.pt", weights_only=True).items()}
    state |= {f"pred_head.{k}": v for k, v in model.pred_head.state_dict().items()} | {"threshold": torch.tensor(.2)}
    torch.save(state, tmp_path / "ss_ft.pt")
    out = import_original_ss(tmp_path / "ss_ft.pt", tmp_path / "out", held_out_family=asked, num_heads=4)
    assert load_finetuned(out)[1].get("data", {}).get("test") == family
    with pytest.raises(ValueError, match="--held_out_family=bogus: use auto, none or one of 5s"):
        import_original_ss(tmp_path / "ss_ft.pt", tmp_path / "other", held_out_family="bogus", num_heads=4)


def test_a_pt_of_another_head_count_says_how_to_give_it(tmp_path):
    export_official(ss_model().lm.state_dict(), tmp_path / "lm.pt")   # dim 16: not 20 heads, which a .pt implies
    with pytest.raises(ValueError, match=re.escape("--model.overrides='{num_heads: 4}'")):
        load_backbone(BackboneConfig(path=str(tmp_path / "lm.pt")))
    assert load_backbone(BackboneConfig(path=str(tmp_path / "lm.pt"), overrides={"num_heads": 4})).config.num_heads == 4
    with pytest.raises(ValueError, match="not divisible by num_heads 3$"):   # given, and wrong: no hint to give it
        load_backbone(BackboneConfig(path=str(tmp_path / "lm.pt"), overrides={"num_heads": 3}))


def test_a_directory_of_no_model_and_a_backbone_read_as_fine_tuned_say_what_they_lack(tiny_checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors\+config.json .*\(nor finetune.json\)"):
        load_backbone(BackboneConfig(path=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="It holds a pretrained backbone: fine-tune it first"):
        load_finetuned(tiny_checkpoint)


def test_backbone_files_are_the_files_of_its_directory_or_the_file_itself(tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    (tmp_path / "m" / "b.json").write_text("{}")
    (tmp_path / "m" / "a.safetensors").write_bytes(b"12345")
    listed = backbone_files(BackboneConfig(path=str(tmp_path / "m")))
    assert [(name, size) for name, size, _ in listed] == [("a.safetensors", 5), ("b.json", 2)]
    os.utime(tmp_path / "m" / "b.json", ns=(7, 7))   # rewritten at the same size: told apart by its mtime
    assert backbone_files(BackboneConfig(path=str(tmp_path / "m" / "b.json"))) == [["b.json", 2, 7]]
    assert backbone_files(BackboneConfig(path=str(tmp_path / "gone"))) == []
    assert backbone_files(BackboneConfig(random_preset="nano")) == []
