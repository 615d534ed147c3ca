import json
import re

import pytest
import torch

from rnalm.config import ModelConfig
from rnalm.io import (MULTIMOLECULE_VOCAB, MULTIMOLECULE_VOCAB_28, WeightsError, export_multimolecule, export_official,
                      import_multimolecule, import_official, load_pretrained, save_pretrained, weights_format,
                      with_weights)
from rnalm.model import RiNALMo
from rnalm.tokenizer import batch_encode

TOKENS = torch.tensor(batch_encode(["ACGUAGCUAGCUAGG", "GGGAAACCCU"])[0])


def random_model(name: str, **overrides) -> RiNALMo:
    torch.manual_seed(0)
    return RiNALMo(ModelConfig.preset(name, **overrides)).eval()


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["nano", "micro", "mega", pytest.param("giga", marks=pytest.mark.slow)])
def test_round_trips_at_every_preset(name, tmp_path):
    model = random_model(name)
    state = model.state_dict()
    with torch.no_grad():
        logits = model(TOKENS).logits
    save_pretrained(model, tmp_path / "m", provenance={"test": name})
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o044 == 0o044  # group/world readable
    loaded = load_pretrained(tmp_path / "m")
    assert loaded.config == model.config
    assert_same_state(loaded.state_dict(), state)
    export_official(state, tmp_path / "official.pt")
    cfg, official = import_official(tmp_path / "official.pt")
    assert cfg.name == name
    assert_same_state(official, state)
    cfg, back = import_multimolecule(export_multimolecule(state))
    assert cfg.name == name
    assert_same_state(back, state)
    if name != "giga":  # the giga forward is covered by the tensors being identical
        with torch.no_grad():
            assert torch.equal(loaded(TOKENS).logits, logits)


def test_multimolecule_layout_has_its_names_vocabulary_and_pad_id():
    state = random_model("nano").state_dict()
    mm = export_multimolecule(state)
    emb = mm["model.embeddings.word_embeddings.weight"]
    assert emb.shape[0] == len(MULTIMOLECULE_VOCAB) == 26
    assert torch.equal(emb[0], state["embedding.weight"][1])          # pad: id 0 there, id 1 here
    assert torch.equal(emb[MULTIMOLECULE_VOCAB.index("U")], state["embedding.weight"][8])
    for letter in "X.*":  # <unk> to RiNALMo's tokenizer and ours
        assert torch.equal(emb[MULTIMOLECULE_VOCAB.index(letter)], state["embedding.weight"][3])
    assert not emb[MULTIMOLECULE_VOCAB.index("<null>")].any()
    q, k, v = (mm[f"model.encoder.layer.0.attention.self.{n}.weight"] for n in ("query", "key", "value"))
    assert torch.equal(torch.cat([q, k, v]), state["transformer.blocks.0.mh_attn.Wqkv.weight"])
    assert mm["model.encoder.layer.3.intermediate.bias"].shape == (1,)   # beta under multimolecule's name


def test_multimolecule_vocabulary_is_told_by_the_row_count_and_a_mismatch_is_an_error():
    state = random_model("nano").state_dict()
    for vocab in (MULTIMOLECULE_VOCAB, MULTIMOLECULE_VOCAB_28):
        _, back = import_multimolecule(export_multimolecule(state, mm_vocab=vocab))
        assert_same_state(back, state)
    mm28 = export_multimolecule(state, mm_vocab=MULTIMOLECULE_VOCAB_28)
    with pytest.raises(WeightsError, match="word_embeddings.weight has 28 rows for a vocabulary of 26 tokens"):
        import_multimolecule(mm28, mm_vocab=MULTIMOLECULE_VOCAB)   # I and - would get other tokens' rows
    mm28["model.embeddings.word_embeddings.weight"] = mm28["model.embeddings.word_embeddings.weight"][:27]
    with pytest.raises(WeightsError, match="27 embedding rows, but the known multimolecule vocabularies have"):
        import_multimolecule(mm28)


def test_official_finetuned_wrapper_and_rope_buffer_are_handled(tmp_path):
    state = random_model("nano").state_dict()
    wrapped = {f"lm.{k}": v for k, v in state.items()}
    wrapped["pred_head.linear.weight"] = torch.zeros(2, 2)
    wrapped["lm.transformer.blocks.0.mh_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    torch.save(wrapped, tmp_path / "ss_ft.pt")
    _, imported = import_official(tmp_path / "ss_ft.pt")
    assert_same_state(imported, state)


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any class outside torch's weights_only allow-list stands for arbitrary code
    torch.save({"embedding.weight": torch.zeros(22, 320), "obj": argparse.Namespace()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        import_official(tmp_path / "evil.pt")


def test_mismatched_files_name_the_offending_tensors(tmp_path):
    state = random_model("nano").state_dict()
    broken = dict(state)
    del broken["transformer.blocks.2.out_layer_norm.bias"]
    broken["transformer.blocks.1.extra.weight"] = torch.zeros(3)
    broken["lm_mask_head.linear1.weight"] = torch.zeros(320, 319)
    with pytest.raises(WeightsError) as err:
        import_official(broken)
    msg = str(err.value)
    assert "missing (1): transformer.blocks.2.out_layer_norm.bias" in msg
    assert "unexpected (1): transformer.blocks.1.extra.weight" in msg
    assert "lm_mask_head.linear1.weight: (320, 319) != expected (320, 320)" in msg
    save_pretrained(random_model("nano"), tmp_path / "m")
    meta = (tmp_path / "m" / "config.json").read_text().replace('"num_layers": 6', '"num_layers": 5')
    (tmp_path / "m" / "config.json").write_text(meta)
    with pytest.raises(WeightsError, match="unexpected \\(13\\): transformer.blocks.5"):
        load_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        load_pretrained(tmp_path / "nowhere")


def test_saved_config_leaves_out_how_the_training_machine_ran_it(tmp_path):
    torch.manual_seed(0)
    trained = ModelConfig.preset("nano", dim=32, num_layers=2, num_heads=4, attention_backend="torch_varlen",
                                 activation_checkpointing=True, ffn_align=8)  # a GPU run's settings
    state = RiNALMo(trained).state_dict()
    save_pretrained(state, tmp_path / "m", config=trained)
    loaded = load_pretrained(tmp_path / "m")  # on this CPU, where torch_varlen has no kernel
    assert loaded.config == trained.released() != trained
    assert (loaded.config.attention_backend, loaded.config.activation_checkpointing, loaded.config.ffn_align) == (
        "auto", False, 64)
    with torch.no_grad():
        assert loaded(TOKENS).logits.isfinite().all()


def test_a_file_that_recorded_the_original_ffn_width_loads_with_aligned_ffn_matmuls(tmp_path):
    """Files saved before ffn_align defaulted to 64 record ffn_align 1 (the original width, 3413 for giga: GEMM rows
    off 16-byte alignment, 1.73x slower training on an H200). A machine choice, so loading takes the default; the
    logits are those of the original width."""
    torch.manual_seed(0)
    cfg = ModelConfig.preset("nano", dim=32, num_layers=2, num_heads=4, ffn_align=1)
    original = RiNALMo(cfg).eval()
    save_pretrained(original.state_dict(), tmp_path / "m", config=cfg)
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    meta["model"]["ffn_align"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
    loaded = load_pretrained(tmp_path / "m").eval()
    assert (loaded.config.ffn_align, loaded.config.ffn_width, cfg.ffn_width) == (64, 128, 85)
    assert load_pretrained(tmp_path / "m", ffn_align=1).config.ffn_width == 85  # an explicit choice still wins
    with torch.no_grad():
        torch.testing.assert_close(loaded(TOKENS).logits, original(TOKENS).logits, rtol=1e-5, atol=1e-5)


def test_loading_weights_skips_the_random_initialisation_and_leaves_the_random_stream_alone(tmp_path):
    """The weights replace a fresh model's random values, so drawing them is wasted (giga: 2-5 s of a 7 s load on
    a CPU) and shifts the user's random stream: a seeded script would change its dropout masks by loading."""
    model = random_model("nano", dim=32, num_layers=2, num_heads=4)
    save_pretrained(model, tmp_path / "m")
    before = torch.random.get_rng_state()
    loaded = load_pretrained(tmp_path / "m")
    assert torch.equal(torch.random.get_rng_state(), before)
    assert_same_state(loaded.state_dict(), model.state_dict())
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())


def test_a_module_with_a_buffer_no_state_dict_holds_is_refused_not_left_uninitialised():
    class WithTable(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("table", torch.arange(4.0), persistent=False)

    with pytest.raises(TypeError, match=r"WithTable has buffers no state dict holds \(table\)"):
        with_weights(WithTable, WithTable().state_dict())


def test_unreadable_pt_files_and_saved_configs_name_the_file(tmp_path):
    """A truncated or foreign .pt gave torch.load's bare '[Errno 22] Invalid argument' / UnpicklingError, and a
    config.json without a usable 'model' entry a KeyError or an error that named no file."""
    export_official(random_model("nano", dim=32, num_layers=2, num_heads=4).state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "hello.pt").write_bytes(b"hello world\n")      # the unpickler's KeyError: a traceback
    (tmp_path / "notes.pt").write_bytes(b"a text file\n")      # its IndexError
    for name in ("cut.pt", "text.pt", "hello.pt", "notes.pt"):
        with pytest.raises(WeightsError, match=f"{tmp_path / name}: torch.load\\(weights_only=True\\) cannot read"):
            import_official(tmp_path / name)
    save_pretrained(random_model("nano", dim=32, num_layers=2, num_heads=4), tmp_path / "m")
    config = tmp_path / "m" / "config.json"
    meta = json.loads(config.read_text())
    for model_entry, reason in ((None, "KeyError"), ({**meta["model"], "newer_field": 1}, "newer_field")):
        config.write_text(json.dumps({**meta, "model": model_entry} if model_entry else
                                     {k: v for k, v in meta.items() if k != "model"}))
        with pytest.raises(WeightsError, match=f"{config}: no usable 'model' entry .*{reason}"):
            load_pretrained(tmp_path / "m")
    # another tool's config.json (multimolecule's, a BERT's) was 'no usable model entry', and a tokenizer entry
    # that is no mapping an AttributeError; a file given as the directory was 'x.pt/config.json not found'
    for content, said in (({"hidden_size": 32, "num_attention_heads": 4}, "is not this tool's (no format_version"),
                          ({**meta, "tokenizer": "x"}, "tokenizer vocabulary differs from RiNALMo's")):
        config.write_text(json.dumps(content))
        with pytest.raises(WeightsError, match=re.escape(f"{config}") + ".*" + re.escape(said)):
            load_pretrained(tmp_path / "m")
    with pytest.raises(WeightsError, match=re.escape(f"{tmp_path / 'good.pt'} is a file: a model directory holds")):
        load_pretrained(tmp_path / "good.pt")
    config.write_text(json.dumps({"hidden_size": 32}))   # was: 'but no config.json beside it', beside one
    with pytest.raises(FileNotFoundError, match="in this tool's layout but another tool's config.json beside it"):
        weights_format(tmp_path / "m")


@pytest.mark.parametrize("layout", ["run", "checkpoints", "step"])
def test_a_training_run_given_as_weights_says_to_convert_it(layout, tmp_path):
    """train.init_weights / finetune's model.path pointed at a run's out_dir (or its checkpoints/, or one step*
    folder) said only 'no model.safetensors+config.json or multimolecule weights'."""
    step = tmp_path / "run" / "checkpoints" / "step00000004"
    step.mkdir(parents=True)
    (step / "trainer_state.json").write_text("{}")
    (step.parent / "latest").write_text("step00000004")
    path = {"run": tmp_path / "run", "checkpoints": step.parent, "step": step}[layout]
    with pytest.raises(FileNotFoundError, match=f"{path}: a training run or checkpoint.*python -m pretrain.convert"):
        weights_format(path)
    with pytest.raises(FileNotFoundError, match="no model.safetensors\\+config.json or multimolecule weights"):
        weights_format(tmp_path)  # an empty folder keeps the old message


def test_a_file_of_another_head_count_names_itself_and_the_setting_to_pass(tmp_path):
    """Was a bare 'dim 32 is not divisible by num_heads 20', naming no file."""
    model = random_model("nano", dim=32, num_layers=2, num_heads=4)
    export_official(model.state_dict(), tmp_path / "h4.pt")
    with pytest.raises(WeightsError, match=f"{tmp_path / 'h4.pt'}: .*num_heads 20; the file records no head count "
                                           r".*import_official\(path, num_heads=4\)"):
        import_official(tmp_path / "h4.pt")
    cfg, _ = import_official(tmp_path / "h4.pt", num_heads=4)
    assert cfg.num_heads == 4


def test_an_interrupted_save_keeps_the_earlier_pair_or_is_refused_and_leaves_no_temp_file(tmp_path, monkeypatch):
    """A conversion stopped between the weights' rename and config.json's left new weights beside the old config:
    refused when the shapes differ, silently wrong when they match (e.g. another head count); a save killed while
    writing the weights left a hidden temp file (giga: 2.6 GB) that no later save removed. Then (a crash-safety
    review) config.json was written only after the weights' rename, so a save stopped while writing it had
    already replaced the earlier weights: no loadable model was left. Both files are now written before either
    rename."""
    import os

    import rnalm.files as files
    from tests.conftest import killed_after_one_rename

    first = random_model("nano")
    save_pretrained(first, tmp_path)
    (tmp_path / ".model.safetensors.dead.tmp").write_bytes(b"x" * 100)   # as atomic_write names its temp files
    synced = files.fsync_path

    def stopped_syncing_the_config(path):
        if os.path.basename(path).startswith(".config.json."):
            raise KeyboardInterrupt
        synced(path)

    with monkeypatch.context() as m:
        m.setattr(files, "fsync_path", stopped_syncing_the_config)
        with pytest.raises(KeyboardInterrupt):
            save_pretrained(random_model("nano", num_heads=8), tmp_path)   # same shapes: would load silently wrong
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]  # no temp file
    loaded = load_pretrained(tmp_path)
    assert loaded.config.num_heads == first.config.num_heads
    assert all(torch.equal(v, first.state_dict()[k]) for k, v in loaded.state_dict().items())
    with killed_after_one_rename():
        save_pretrained(random_model("nano", num_heads=8), tmp_path)
    with pytest.raises(WeightsError, match="model.safetensors and config.json come from different saves"):
        load_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    save_pretrained(random_model("nano", num_heads=8), tmp_path)
    assert load_pretrained(tmp_path).config.num_heads == 8


def test_a_multimolecule_config_names_each_dropout_its_own_way(tmp_path):
    """hidden_dropout is the residual dropout, attention_dropout the attention's: the export writes the same map,
    so a round trip cannot tell a swap; a multimolecule config.json written by hand (theirs) can."""
    from rnalm.io import multimolecule_settings

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_hidden_layers": 2,
                                                      "num_attention_heads": 4, "hidden_dropout": 0.2,
                                                      "attention_dropout": 0.05, "token_dropout": True}))
    assert multimolecule_settings(tmp_path) == {"dim": 64, "num_layers": 2, "num_heads": 4, "residual_dropout": 0.2,
                                                "attn_dropout": 0.05, "token_dropout": True}


def test_saving_refuses_what_it_could_not_read_back(tmp_path):
    state = random_model("nano").state_dict()
    with pytest.raises(ValueError, match="save_pretrained needs a config when given a state dict"):
        save_pretrained(state, tmp_path / "m")
    del state["embedding.weight"]
    with pytest.raises(WeightsError, match="state dict to save does not match model nano .*missing \\(1\\): embedding"):
        save_pretrained(state, tmp_path / "m", config=ModelConfig.preset("nano"))
    assert not (tmp_path / "m").exists()


def test_a_long_list_of_mismatches_is_cut_at_eight_names():
    state = random_model("nano").state_dict()
    broken = {k: v for k, v in state.items() if not k.startswith("transformer.blocks.0.")}
    with pytest.raises(WeightsError, match=r"missing \(13\): (transformer\.blocks\.0\.[^,]+, ){7}[^,;]+ \.\.\.$"):
        import_official(broken)


def test_json_that_is_not_an_object_or_not_utf8_names_the_file(tmp_path):
    from rnalm.io import read_json

    for content, said in ((b"[1, 2]", "expected a JSON object, found list"), (b'{"a": "\xff"}', "unreadable JSON")):
        (tmp_path / "c.json").write_bytes(content)
        with pytest.raises(WeightsError, match=f"{tmp_path / 'c.json'}: {said}"):
            read_json(tmp_path / "c.json")


def test_a_device_is_checked_before_any_file_is_blamed(tmp_path):
    from rnalm.io import check_device, read_safetensors

    with pytest.raises(ValueError, match="1.5 is not a device"):
        check_device(1.5)
    assert check_device("cpu") == torch.device("cpu")
    save_pretrained(random_model("nano"), tmp_path)
    if not torch.cuda.is_available():
        for call in (lambda: check_device("cuda"), lambda: read_safetensors(tmp_path / "model.safetensors", "cuda")):
            with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA device"):
                call()


def test_weights_saved_before_save_ids_still_load(tmp_path):
    """Files of an older version, without the save id in the weights' metadata, pass check_same_save."""
    from safetensors.torch import load_file, save_file

    model = random_model("nano")
    save_pretrained(model, tmp_path)
    save_file(load_file(tmp_path / "model.safetensors"), tmp_path / "model.safetensors", metadata={"format": "pt"})
    loaded = load_pretrained(tmp_path)
    torch.testing.assert_close(loaded(TOKENS).logits, model(TOKENS).logits)


def test_state_dicts_that_are_not_rinalmos_name_the_problem(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pt")
    with pytest.raises(WeightsError, match=f"{tmp_path / 'list.pt'}: expected a state dict, found list"):
        import_official(tmp_path / "list.pt")
    from fractions import Fraction

    torch.save({"w": Fraction(1, 2)}, tmp_path / "obj.pt")
    with pytest.raises(WeightsError) as err:
        import_official(tmp_path / "obj.pt")
    reason = str(err.value).split("pickled objects besides tensors): ")[1]
    assert reason.startswith("Unsupported global: GLOBAL fractions.Fraction") and "Please use" not in reason
    with pytest.raises(WeightsError, match="official state dict: no embedding.weight; is this a RiNALMo state dict"):
        import_official({"encoder.weight": torch.zeros(2)})


def test_block_count_reads_the_prefix_at_the_start_of_a_name_only():
    from rnalm.io import block_count

    assert block_count({"transformer.blocks.1.w": 0, "head.transformer.blocks.7.w": 0}, "transformer.blocks.") == 2
    assert block_count({"embedding.weight": 0}, "transformer.blocks.") == 0


def test_an_explicit_name_is_kept_for_weights_of_another_head_count():
    from rnalm.io import infer_config

    state = random_model("nano", num_heads=4).state_dict()
    assert infer_config(state, "w", num_heads=4).name == "nano-custom"
    assert infer_config(state, "w", num_heads=4, name="mine").name == "mine"


def test_multimolecule_files_without_a_config_or_with_a_damaged_one(tmp_path):
    from safetensors.torch import save_file

    from rnalm.io import read_weights

    state = random_model("nano").state_dict()
    save_file(export_multimolecule(state), tmp_path / "model.safetensors")
    cfg, back = read_weights(tmp_path, heads=ModelConfig.preset("nano").num_heads)   # no config.json: no settings
    assert cfg.dim == ModelConfig.preset("nano").dim
    assert_same_state(back, state)
    (tmp_path / "config.json").write_bytes(b'{"hidden_size": "\xff"}')
    for fmt in ("auto", "multimolecule"):
        with pytest.raises(WeightsError, match=f"{tmp_path / 'config.json'}: unreadable JSON"):
            read_weights(tmp_path, fmt)


def test_multimolecule_imports_name_what_they_lack_or_do_not_know():
    state = random_model("nano").state_dict()
    mm = export_multimolecule(state)
    no_a = tuple("Z" if t == "A" else t for t in MULTIMOLECULE_VOCAB)
    with pytest.raises(WeightsError, match=r"multimolecule vocabulary lacks tokens \['A'\]"):
        import_multimolecule(mm, mm_vocab=no_a)
    no_bias = {k: v for k, v in mm.items() if k not in ("lm_head.bias", "lm_head.decoder.bias")}
    with pytest.raises(WeightsError, match="missing multimolecule tensor lm_head.bias"):
        import_multimolecule(no_bias)
    extra = {**mm, **{f"model.adapter.{i}.weight": torch.zeros(1) for i in range(8)}}
    with pytest.raises(WeightsError, match=r"import does not know: model.adapter.0.weight, .* \(\+2 more\)"):
        import_multimolecule(extra)


def test_a_newer_format_version_and_an_unknown_format_name_are_refused(tmp_path):
    """From a user review: format_version 2 loaded as 1 without a word; read_weights(fmt="bogus") fell through to
    the multimolecule reader (IsADirectoryError)."""
    import json

    from rnalm.io import read_weights

    save_pretrained(random_model("nano"), tmp_path)
    config = tmp_path / "config.json"
    with pytest.raises(ValueError, match="fmt 'bogus': one of auto, rnalm, official, multimolecule"):
        read_weights(tmp_path, fmt="bogus")
    config.write_text(json.dumps({**json.loads(config.read_text()), "format_version": 2}))
    with pytest.raises(WeightsError, match=f"{config}: format_version 2, this version reads up to 1"):
        load_pretrained(tmp_path)
