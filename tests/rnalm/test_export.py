"""python -m rnalm.export: released weights -> the original's .pt and a multimolecule (Hugging Face) directory."""
from __future__ import annotations

import shutil

import pytest
import torch

from rnalm.config import ModelConfig
from rnalm.export import main
from rnalm.io import import_official, load_pretrained, read_state_dict, read_weights, save_pretrained
from rnalm.model import RiNALMo
from rnalm.tokenizer import batch_encode


def released(tmp_path, **overrides) -> RiNALMo:
    torch.manual_seed(0)
    model = RiNALMo(ModelConfig.preset("nano", **overrides)).eval()
    with torch.no_grad():  # no LayerNorm at 1 / bias at 0 left: a swapped or dropped tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_pretrained(model, tmp_path / "model")
    return model


def test_official_export_is_the_state_the_original_code_loads(tmp_path, capsys):
    model = released(tmp_path)
    main([str(tmp_path / "model"), "--to", "official", str(tmp_path / "out" / "rinalmo_nano_pretrained.pt")])
    assert "official weights:" in capsys.readouterr().out
    saved = torch.load(tmp_path / "out" / "rinalmo_nano_pretrained.pt", weights_only=True)
    assert saved.keys() == model.state_dict().keys()  # MLM head included, as in the released *_pretrained.pt
    cfg, state = import_official(tmp_path / "out" / "rinalmo_nano_pretrained.pt")
    assert (cfg.dim, cfg.num_layers) == (model.config.dim, model.config.num_layers)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_multimolecule_export_loads_with_from_pretrained_and_gives_our_outputs(tmp_path):
    reference = pytest.importorskip("tests.rnalm.test_reference_port", reason="multimolecule is not installed")
    model = RiNALMo(ModelConfig.preset("nano")).eval()
    reference.randomise(model)  # its weight scale: the comparison's 1e-5 holds beside its float32 RoPE tables
    save_pretrained(model, tmp_path / "model")
    main([str(tmp_path / "model"), "--to", "multimolecule", str(tmp_path / "hf")])
    theirs = reference.RiNALMoForMaskedLM.from_pretrained(tmp_path / "hf").eval().double()
    reference.assert_same_outputs(load_pretrained(tmp_path / "model").double(), theirs)


def test_multimolecule_export_reads_letters_rinalmo_lacks_as_unk_as_we_do(tmp_path):
    """X . * | ? are <unk> to the original's tokenizer and ours, each a token of its own to multimolecule's: the
    export gave X the mean of A, C, G, U and the others zero rows, other outputs than ours (3.9 apart)."""
    reference = pytest.importorskip("tests.rnalm.test_reference_port", reason="multimolecule is not installed")
    model = RiNALMo(ModelConfig.preset("nano")).eval()
    reference.randomise(model)
    save_pretrained(model, tmp_path / "model")
    main([str(tmp_path / "model"), "--to", "multimolecule", str(tmp_path / "hf")])
    theirs = reference.RiNALMoForMaskedLM.from_pretrained(tmp_path / "hf").eval().double()
    seqs = ["ACGUXCGUAG", "ACGU.CGU*G", "AC|GU?ACGX"]
    enc = reference.TOKENIZER(seqs, return_tensors="pt", padding=True)
    assert {reference.MM_VOCAB[i] for i in enc["input_ids"].flatten().tolist()} >= set("X.*|?")
    with torch.no_grad():
        ours = load_pretrained(tmp_path / "model").double()(torch.as_tensor(batch_encode(seqs)[0]))
        got = theirs(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], output_hidden_states=True)
    torch.testing.assert_close(ours.representation, got.hidden_states[-1], rtol=1e-5, atol=1e-5)


def test_the_multimolecule_config_names_its_vocabularys_size_and_pad_token():
    """Checked without multimolecule installed (the reference test above skips then)."""
    from rnalm.export import multimolecule_config
    from rnalm.io import MULTIMOLECULE_VOCAB_28

    config = multimolecule_config(ModelConfig.preset("nano"))
    assert MULTIMOLECULE_VOCAB_28[config["pad_token_id"]] == "<pad>" and config["vocab_size"] == 28
    assert config["hidden_size"] == ModelConfig.preset("nano").dim and config["model_type"] == "rinalmo"


def test_the_early_multimolecule_layer_norm_eps_is_read_as_rinalmos(tmp_path):
    """Early multimolecule configs say 1e-12 beside RiNALMo's weights (trained at 1e-5, facts 1.6): the import ran
    at 1e-12, and exporting it back to the official layout was then refused."""
    import json

    released(tmp_path)
    main([str(tmp_path / "model"), "--to", "multimolecule", str(tmp_path / "hf")])
    config = tmp_path / "hf" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layer_norm_eps": 1e-12}))
    with pytest.warns(UserWarning, match="layer_norm_eps 1e-12 read as RiNALMo's 1e-5"):
        assert read_weights(tmp_path / "hf")[0].layer_norm_eps == 1e-5


def test_a_multimolecule_directory_loads_back_with_the_settings_its_config_records(tmp_path):
    """Its config.json records the head count (and eps, dropouts, token dropout): read_weights once took the
    weights alone, so a 4-head export came back with 20 heads and other outputs, and no error."""
    model = released(tmp_path, num_heads=4, layer_norm_eps=1e-6, token_dropout=False, attn_dropout=0.0)
    main([str(tmp_path / "model"), "--to", "multimolecule", str(tmp_path / "hf")])
    cfg, state = read_weights(tmp_path / "hf")
    assert cfg == model.config and cfg.name == "nano-custom"
    back = RiNALMo(cfg).eval()
    back.load_state_dict(state)
    ids = torch.randint(5, 9, (2, 30))
    with torch.no_grad():
        assert torch.equal(back(ids).logits, model(ids).logits)
    assert read_weights(tmp_path / "hf", heads=20)[0].num_heads == 4          # recorded beats the fallback
    assert read_weights(tmp_path / "hf", num_heads=8)[0].num_heads == 8       # an explicit override beats both
    assert read_weights(tmp_path / "hf" / "model.safetensors", heads=20)[0].num_heads == 4  # read with its config
    (tmp_path / "bare").mkdir()
    shutil.copy(tmp_path / "hf" / "model.safetensors", tmp_path / "bare")
    assert read_weights(tmp_path / "bare" / "model.safetensors", heads=20)[0].num_heads == 20  # a bare file: none
    weights = tmp_path / "hf" / "model.safetensors"          # also where the format is named (finetune's model.format)
    assert read_weights(weights, fmt="multimolecule", heads=20)[0].num_heads == 4
    torch.save(read_state_dict(weights), tmp_path / "hf" / "pytorch_model.bin")
    weights.write_bytes(b"not read: the file named is")
    assert read_weights(tmp_path / "hf" / "pytorch_model.bin", fmt="multimolecule")[1].keys() == state.keys()


@pytest.mark.parametrize("setting", [{"num_heads": 4}, {"token_dropout": False}, {"layer_norm_eps": 1e-6},
                                     {"mask_ratio_train": 0.1}])
def test_a_model_a_pt_file_cannot_express_is_refused(tmp_path, capsys, setting):
    """A .pt records no settings: it would load back with the original's (and compute otherwise), silently."""
    released(tmp_path, **setting)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "model"), "--to", "official", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and f"no setting for {list(setting)}" in err
    # the other layout, where it can hold the model (multimolecule has no mask_ratio_train)
    assert ("; --to multimolecule can describe this model" in err) == ("mask_ratio_train" not in setting)
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("setting", [{"rope_base": 20000.0}, {"vocab_size": 32}])
def test_a_model_multimolecule_cannot_express_is_refused(tmp_path, capsys, setting):
    released(tmp_path, **setting)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "model"), "--to", "multimolecule", str(tmp_path / "hf")])
    assert exit_.value.code == 1 and f"no setting for {list(setting)}" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("to, lost", [("official", "attn_dropout 0.0, residual_dropout 0.3, transition_dropout 0.2"),
                                      ("multimolecule", "transition_dropout 0.2")])
def test_dropouts_a_layout_cannot_carry_are_exported_with_a_warning(tmp_path, capsys, to, lost):
    """From a user review: multimolecule refused a transition dropout and named --to official, which wrote it
    and read all three dropouts back as RiNALMo's without a word. Dropout acts in training only: one rule for
    both, the weights exported exactly and a warning naming what is read back otherwise."""
    model = released(tmp_path, attn_dropout=0.0, residual_dropout=0.3, transition_dropout=0.2)
    out = tmp_path / ("x.pt" if to == "official" else "hf")
    main([str(tmp_path / "model"), "--to", to, str(out)])
    assert f"warning: {to} RiNALMo records no" in (err := capsys.readouterr().err) and lost in err
    cfg, state = read_weights(out)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    kept = {"attn_dropout": 0.0, "residual_dropout": 0.3} if to == "multimolecule" else {}
    assert {k: getattr(cfg, k) for k in kept} == kept


def test_an_export_never_writes_over_the_model_it_reads_or_another_of_ours(tmp_path, capsys):
    """From a user review: --to official into the model directory replaced its model.safetensors by a pickle
    (unreadable since), and --to multimolecule into another model directory of ours replaced its config.json."""
    released(tmp_path)
    shutil.copytree(tmp_path / "model", tmp_path / "other")
    before = {d: {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("model", "other")}
    for to, out, message in (("official", tmp_path / "model" / "model.safetensors", "is in the model directory"),
                             ("official", tmp_path / "model" / "x.pt", "is in the model directory"),
                             ("multimolecule", tmp_path / "other", "holds a model of this tool")):
        with pytest.raises(SystemExit) as exit_:
            main([str(tmp_path / "model"), "--to", to, str(out)])
        assert exit_.value.code == 1 and message in capsys.readouterr().err, out
    assert {d: {p.name: p.read_bytes() for p in (tmp_path / d).iterdir()} for d in ("model", "other")} == before


@pytest.mark.parametrize("to", ["official", "multimolecule"])
def test_an_output_of_the_other_kind_is_named(tmp_path, capsys, to):
    """--to official onto a directory said '[Errno 21] Is a directory: <its temp file> -> OUT', --to multimolecule
    onto a file '[Errno 17] File exists'."""
    released(tmp_path)
    out = tmp_path / "out"
    out.mkdir() if to == "official" else out.write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "model"), "--to", to, str(out)])
    kind, writes = ("directory", "one .pt file") if to == "official" else ("file", "a directory")
    assert exit_.value.code == 1 and f"{out} is a {kind}: --to {to} writes {writes}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]


@pytest.mark.parametrize("setting", [{"rope_base": 20000.0}, {"num_heads": 10}])
def test_settings_a_pt_file_cannot_carry_are_refused_for_the_original_layout(tmp_path, capsys, setting):
    """A .pt records no settings: the original's code runs RoPE base 10000, and every reader (the original's
    sizes, import_official, train.init_weights, finetune) takes 20 heads, so a model of another base or head
    count was written without a word and then ran as another model."""
    released(tmp_path, **setting)
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "model"), "--to", "official", str(tmp_path / "x.pt")])
    (key, value), = setting.items()
    assert exit_.value.code == 1 and f"{key} {value}" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_a_multimolecule_file_that_is_not_what_its_config_says_is_refused(tmp_path):
    """An unknown tensor was dropped without a word (the model then computed something else than the file), and a
    directory whose tensors lack a layer its config.json declares, or of another width, loaded as the smaller model."""
    import json

    from safetensors.torch import load_file, save_file

    from rnalm.io import WeightsError

    released(tmp_path, num_layers=2, dim=32, num_heads=4)
    main([str(tmp_path / "model"), "--to", "multimolecule", str(tmp_path / "hf")])
    weights, config = tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"
    state, meta = load_file(weights), json.loads(config.read_text())

    def variant(name, tensors, settings):
        d = tmp_path / name
        d.mkdir()
        save_file(tensors, d / "model.safetensors")
        (d / "config.json").write_text(json.dumps(settings))
        return d

    extra = variant("extra", {**state, "model.encoder.layer.1.attention.self.query.bias": torch.zeros(32)}, meta)
    with pytest.raises(WeightsError, match=r"extra: multimolecule tensors this import does not know: "
                                           r"model\.encoder\.layer\.1\.attention\.self\.query\.bias"):
        read_weights(extra)
    one_layer = variant("one_layer", {k: v for k, v in state.items() if ".layer.1." not in k}, meta)
    with pytest.raises(WeightsError, match="transformer.blocks.1"):
        read_weights(one_layer)
    wider = variant("wider", state, {**meta, "hidden_size": 64})
    with pytest.raises(WeightsError, match="wider"):
        read_weights(wider)
    head = variant("with_ss_head", {**state, "ss_head.prediction.weight": torch.zeros(1, 8)}, meta)
    assert read_weights(head)[0] == read_weights(tmp_path / "hf")[0]   # another head: not the backbone's


def test_the_model_directory_itself_an_empty_out_or_a_path_under_a_file_are_refused(tmp_path, capsys):
    """--to multimolecule into the model directory replaced its files (provenance gone, and no longer readable as
    ours); an empty OUT wrote into the current directory; OUT under a file said '[Errno 17] File exists'."""
    released(tmp_path)
    model = tmp_path / "model"
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    (tmp_path / "a_file").write_text("")
    for to, out, message in (("multimolecule", str(model), f"{model} is the model directory itself"),
                             ("multimolecule", "", "OUT is required"),
                             ("official", "", "OUT is required"),
                             ("official", str(tmp_path / "a_file" / "x.pt"), "a_file is a file, not a directory"),
                             ("multimolecule", str(tmp_path / "a_file" / "d"), "a_file is a file, not a directory")):
        with pytest.raises(SystemExit) as exit_:
            main([str(model), "--to", to, out])
        assert exit_.value.code == 1 and message in capsys.readouterr().err, (to, out)
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
