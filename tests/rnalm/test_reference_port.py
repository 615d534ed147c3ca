"""Our RiNALMo against an independent implementation: multimolecule's port (the one the published HF weights
run on), whose authors checked it against the original's intermediate representations.

Same random weights, same sequences (with <mask> tokens, ambiguity codes and padding), in float64: logits and
representations agree. This pins what our own tests cannot: the architecture details (residual quirk of the block,
RoPE layout, token-dropout rescaling, SwiGLU's beta, head) and the weight layouts, through multimolecule's own
converter of the official checkpoints; and finetune's secondary-structure head, on a checkpoint in the original's
fine-tuned layout. multimolecule is a test-only reference (AGPL-3.0; never imported by the
packages); its private `_convert_checkpoint` is why the version is pinned in pyproject's dev extra.
"""
import pytest
import torch

mm_models = pytest.importorskip("multimolecule", reason="multimolecule (the reference port) is not installed: "
                                                        "pip install -e '.[dev]'")
from multimolecule import RiNALMoConfig, RiNALMoForMaskedLM, RnaTokenizer  # noqa: E402
from multimolecule.models.rinalmo.convert_checkpoint import _convert_checkpoint, original_vocab_list  # noqa: E402

from rnalm.config import ModelConfig  # noqa: E402
from rnalm.io import MULTIMOLECULE_VOCAB_28, export_multimolecule, export_official, import_multimolecule  # noqa: E402
from rnalm.model import RiNALMo  # noqa: E402
from rnalm.tokenizer import MASK_ID, VOCAB, batch_encode  # noqa: E402

SEQS = ["ACGUACGUNNRYKMSW", "GGGAAACCCUUUAGCUAGCUAGCUAGCUGAUCGAUCGAUCGAUGCUAGCUAGCUGACUGAUCG", "ACGU-IUACBDHV",
        "UUUU"]
MASKED = [(0, 3), (1, 10), (1, 11), (1, 30), (2, 2)]          # (sequence, token position incl. CLS)
TOKENIZER = RnaTokenizer()
MM_VOCAB = tuple(sorted(TOKENIZER.get_vocab(), key=TOKENIZER.get_vocab().get))
OUR_ROWS = [MM_VOCAB.index("U" if t == "T" else t) for t in VOCAB]   # their logit column of each of our ids


def test_the_installed_tokeniser_has_the_vocabulary_rnalm_knows():
    assert MM_VOCAB == MULTIMOLECULE_VOCAB_28


def mm_model(cfg: ModelConfig) -> RiNALMoForMaskedLM:
    mm_cfg = RiNALMoConfig(vocab_size=len(MM_VOCAB), hidden_size=cfg.dim, num_hidden_layers=cfg.num_layers,
                           num_attention_heads=cfg.num_heads, intermediate_size=cfg.dim * 4,
                           layer_norm_eps=cfg.layer_norm_eps)
    return RiNALMoForMaskedLM(mm_cfg).eval().double()


def randomise(model: torch.nn.Module) -> None:
    """Weights far from any initialiser's symmetries: LayerNorm scales around 1, every bias and beta non-zero."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) * 0.5 / p.shape[-1] ** 0.5)
            else:
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm.weight" in name else 0.0))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(our padded ids, their ids, their attention mask), <mask> at the same places."""
    ours = torch.as_tensor(batch_encode(SEQS)[0])
    enc = TOKENIZER(SEQS, return_tensors="pt", padding=True)
    theirs = enc["input_ids"]
    for b, i in MASKED:
        ours[b, i], theirs[b, i] = MASK_ID, TOKENIZER.mask_token_id
    return ours, theirs, enc["attention_mask"]


def assert_same_outputs(ours: RiNALMo, theirs: RiNALMoForMaskedLM) -> None:
    ids, mm_ids, attention_mask = inputs()
    real = attention_mask.bool()
    assert torch.equal(real, ids != 1), "the two tokenisers disagree on the sequence lengths"
    with torch.no_grad():
        a = ours(ids)
        b = theirs(input_ids=mm_ids, attention_mask=attention_mask, output_hidden_states=True)
    # their RoPE tables and token-dropout ratio are computed in float32 whatever the model's dtype
    torch.testing.assert_close(a.representation[real], b.hidden_states[-1][real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.logits[real], b.logits[..., OUR_ROWS][real], rtol=1e-5, atol=1e-5)
    assert a.logits[real].std() > 0.1     # not a degenerate agreement


@pytest.mark.parametrize("dims", [dict(), dict(dim=160, num_layers=3, num_heads=4)], ids=["nano", "small-heads"])
def test_multimolecule_weights_give_the_reference_outputs(dims):
    cfg = ModelConfig.preset("nano", **dims)
    theirs = mm_model(cfg)
    randomise(theirs)
    imported_cfg, state = import_multimolecule({k: v.float() for k, v in theirs.state_dict().items()},
                                               num_heads=cfg.num_heads)    # its vocabulary told by the row count
    assert (imported_cfg.dim, imported_cfg.num_layers) == (cfg.dim, cfg.num_layers)
    ours = RiNALMo(imported_cfg).eval().double()
    ours.load_state_dict({k: v.double() for k, v in state.items()})
    assert_same_outputs(ours, theirs)


def test_official_layout_converts_like_the_released_weights(tmp_path):
    """Our export to the original's layout, through multimolecule's converter of the released checkpoints."""
    cfg = ModelConfig.preset("nano")
    ours = RiNALMo(cfg).eval().double()
    randomise(ours)
    export_official(ours.state_dict(), tmp_path / "official.pt")
    official = torch.load(tmp_path / "official.pt", weights_only=True)
    theirs = mm_model(cfg)
    converted = _convert_checkpoint(theirs.config, official, list(MM_VOCAB), original_vocab_list)
    missing, unexpected = theirs.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k], (missing, unexpected)
    assert_same_outputs(ours, theirs)


def test_our_multimolecule_export_loads_strictly_into_their_model():
    cfg = ModelConfig.preset("nano")
    ours = RiNALMo(cfg).eval().double()
    randomise(ours)
    theirs = mm_model(cfg)
    exported = export_multimolecule(ours.state_dict(), mm_vocab=MM_VOCAB)
    missing, unexpected = theirs.load_state_dict(exported, strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k], (missing, unexpected)
    assert_same_outputs(ours, theirs)


def test_original_ss_checkpoint_predicts_as_in_the_reference(tmp_path):
    """A secondary-structure checkpoint in the original's fine-tuned layout (`lm.*`, `pred_head.*`, threshold),
    read by our importer and by multimolecule's converter of the released `ss_*_ft.pt`: same pair logits."""
    from multimolecule import RiNALMoForSecondaryStructurePrediction

    from finetune.backbone import TaskModel, import_original_ss, load_finetuned
    from finetune.heads import HeadConfig, SecondaryStructureHead

    cfg = ModelConfig.preset("nano")
    ours = TaskModel(RiNALMo(cfg), SecondaryStructureHead(cfg.dim, HeadConfig())).eval().double()
    randomise(ours)
    export_official(ours.lm.state_dict(), tmp_path / "lm.pt")
    original = {**{f"lm.{k}": v for k, v in torch.load(tmp_path / "lm.pt", weights_only=True).items()},
                **{f"pred_head.{k}": v for k, v in ours.pred_head.state_dict().items()}, "threshold": torch.tensor(0.1)}
    torch.save(original, tmp_path / "ss_test_ft.pt")
    imported, meta = load_finetuned(import_original_ss(tmp_path / "ss_test_ft.pt", tmp_path / "imported"))
    imported = imported.double()
    assert meta["threshold"] == pytest.approx(0.1)

    theirs_cfg = mm_model(cfg).config
    theirs_cfg.head = {"num_channels": 64, "num_layers": 2}
    theirs = RiNALMoForSecondaryStructurePrediction(theirs_cfg).eval().double()
    converted = _convert_checkpoint(theirs_cfg, original, list(MM_VOCAB), original_vocab_list, task="ss")
    missing, unexpected = theirs.load_state_dict(converted, strict=False)
    assert not unexpected and not [k for k in missing if "inv_freq" not in k], (missing, unexpected)
    for seq in SEQS[:2]:                       # one at a time: the head's InstanceNorm sees one L x L grid
        ids = torch.as_tensor(batch_encode([seq])[0])
        enc = TOKENIZER([seq], return_tensors="pt")
        with torch.no_grad():
            a = imported.pred_head(imported.lm(ids).representation, ids)[0]   # TaskModel's own runs the head in fp32
            b = theirs(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits[0, ..., 0]
        assert a.shape == b.shape == (len(seq), len(seq))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert a.std() > 0.1
