"""pretrain.convert: ZeRO-3 checkpoint -> model.safetensors + config.json that reproduce the engine's numbers."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch

from dataprep.shards import shard_set_digest
from pretrain.checkpoint import TMP_PREFIX, read_trainer_state
from pretrain.config import PretrainConfig
from rnalm.runlock import RunLock
from pretrain.evaluate import validation
from rnalm.configfile import load
from rnalm.io import load_pretrained

from .trainer_runs import PY, REPO, STRAIGHT_STEPS, events, read_log

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def converted(straight_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "model"
    proc = subprocess.run([PY, "-m", "pretrain.convert", str(straight_run), str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"released weights: {out}\n"  # DeepSpeed's lines go to stderr: a script reads the path
    assert "Reconstructed Trainable fp32 state dict" in proc.stderr
    return out


def test_converted_model_reproduces_the_engines_validation_loss(straight_run, converted):
    cfg = load(PretrainConfig, straight_run / "config.yaml")
    engine_valid = events(read_log(straight_run), "valid")[-1]
    assert engine_valid["step"] == STRAIGHT_STEPS  # validated with the weights of the last checkpoint
    model = load_pretrained(converted)
    assert not model.training
    replay = validation(model, cfg)  # the 2-rank trainer's validation on one process: the same records
    assert (replay["masked_tokens"], replay["records"]) == (engine_valid["masked_tokens"], engine_valid["records"])
    assert replay["records"] == cfg.train.valid_max_records  # the cap is what limited it (the split is larger)
    assert replay["loss"] == pytest.approx(engine_valid["loss"], rel=1e-5, abs=1e-6)
    assert replay["accuracy"] == pytest.approx(engine_valid["accuracy"], rel=1e-5)


def test_evaluate_command_scores_any_weights_format_with_the_runs_crops_and_masks(straight_run, converted, tmp_path):
    """`python -m pretrain.evaluate`: the converted directory and the same weights as the original's .pt give
    the engine's logged validation (of a 2-rank run, on one process); a training run in place of weights is
    refused."""
    from rnalm.io import export_official, read_pretrained

    engine_valid = events(read_log(straight_run), "valid")[-1]
    export_official(read_pretrained(converted)[1], tmp_path / "as_original.pt")

    def evaluate(weights, *extra):
        return subprocess.run([PY, "-m", "pretrain.evaluate", str(weights), "--config",
                               str(straight_run / "config.yaml"), *extra], cwd=REPO, capture_output=True, text=True,
                              timeout=120)

    for weights in (converted, tmp_path / "as_original.pt"):
        proc = evaluate(weights)
        assert proc.returncode == 0, proc.stderr[-2000:]
        got = json.loads(proc.stdout.splitlines()[-1])
        assert got["masked_tokens"] == engine_valid["masked_tokens"]
        assert got["loss"] == pytest.approx(engine_valid["loss"], rel=1e-5, abs=1e-6)
        assert f"loss {got['loss']:.4f}" in proc.stderr
    whole = json.loads(evaluate(converted, "--train.valid_max_records=0").stdout.splitlines()[-1])
    first = json.loads(evaluate(converted, "--train.valid_max_records=7").stdout.splitlines()[-1])
    assert whole["records"] > engine_valid["records"] > first["records"] == 7 and whole["valid_max_records"] == 0
    refused = evaluate(straight_run)
    assert refused.returncode == 2 and "convert it first" in refused.stderr
    # from a user review: training's own checks refused the evaluation of a run whose init_weights had moved
    moved = evaluate(converted, f"--train.init_weights={tmp_path / 'moved'}", f"--train.ds_config={tmp_path / 'no'}")
    assert moved.returncode == 0, moved.stderr[-2000:]
    no_shards = evaluate(converted, "--data.shards=/nonexistent")
    assert no_shards.returncode == 2 and no_shards.stderr.startswith("error:") and "Traceback" not in no_shards.stderr
    no_config = subprocess.run([PY, "-m", "pretrain.evaluate", str(converted)], cwd=REPO, capture_output=True,
                               text=True, timeout=60)
    assert no_config.returncode == 2 and "--config is required" in no_config.stderr
    if not torch.cuda.is_available():
        no_gpu = evaluate(converted, "--device", "cuda")
        assert no_gpu.returncode == 2 and no_gpu.stderr.startswith("error:")
    # found by a review: a relative data.shards was looked for from wherever the command ran ("no such folder"),
    # and weights holding a NaN printed 'loss nan' and a JSON line with NaN (not JSON) with exit 0
    # found by a user test: a preset config (pinned batches) crashed on a machine without a GPU, and one without
    # --data.shards was called "a relative path"
    shards = load(PretrainConfig, straight_run / "config.yaml").data.shards
    preset = subprocess.run([PY, "-m", "pretrain.evaluate", str(converted), "--config", "pretrain/configs/nano.yaml",
                             f"--data.shards={shards}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert preset.returncode == 0, preset.stderr[-2000:]
    unset = subprocess.run([PY, "-m", "pretrain.evaluate", str(converted), "--config", "pretrain/configs/nano.yaml"],
                           cwd=REPO, capture_output=True, text=True, timeout=60)
    assert unset.returncode == 2 and "data.shards is not set" in unset.stderr
    # found by a user test: shards rebuilt in the run's folder (another --valid-fraction) were scored without a word
    rebuilt = tmp_path / "rebuilt"
    shutil.copytree(shards, rebuilt)
    (rebuilt / "manifest.json").write_text((rebuilt / "manifest.json").read_text() + "\n")
    other = evaluate(converted, f"--data.shards={rebuilt}")
    assert other.returncode == 0 and "is not the shard set this model's run trained on" in other.stderr
    assert "not the shard set" not in preset.stderr  # the run's own shards
    relative = evaluate(converted, "--data.shards=shards_of_the_run")
    assert relative.returncode == 2 and "a relative path, as the config records it) is not found from" in \
        relative.stderr and "--data.shards=PATH" in relative.stderr
    state = read_pretrained(converted)[1]
    state["transformer.blocks.0.mh_attn.Wqkv.weight"][0, 0] = float("nan")
    export_official(state, tmp_path / "nan.pt")
    nan = evaluate(tmp_path / "nan.pt")
    assert nan.returncode == 2 and "the loss is nan (weights with NaN or infinite values?)" in nan.stderr
    assert nan.stdout == ""


def test_only_weights_trained_on_another_shard_set_get_the_note(tmp_path):
    """The note compares the manifest digest a converted model records with the shard set scored; weights that
    record none (a .pt, a save without provenance) get no note, not an error."""
    from pretrain.evaluate import other_shards_note
    from rnalm.config import ModelConfig
    from rnalm.io import export_official, save_pretrained
    from rnalm.model import RiNALMo

    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "manifest.json").write_text("{}")
    cfg = ModelConfig.preset("nano")
    state = RiNALMo(cfg).state_dict()
    save_pretrained(state, tmp_path / "plain", config=cfg)
    save_pretrained(state, tmp_path / "same", config=cfg, provenance={"shards_manifest": shard_set_digest(shards)})
    save_pretrained(state, tmp_path / "other", config=cfg, provenance={"shards_manifest": "ab" * 32})
    export_official(state, tmp_path / "w.pt")
    for weights in ("plain", "same", "w.pt"):
        assert other_shards_note(str(tmp_path / weights), str(shards)) is None, weights
    note = other_shards_note(str(tmp_path / "other"), str(shards))
    assert note.startswith(f"warning: {shards} is not the shard set this model's run trained on") and "abababab" in note


def test_validation_skips_a_corrupt_held_out_shard_and_counts_it_and_runs_in_the_dtype_asked(tmp_path):
    """pretrain.evaluate's validation, in process, on a random nano model: a damaged held-out shard is skipped and
    counted (the rest still scored), a split with nothing readable is an error naming the shards; bfloat16 weights
    give a close but not equal loss."""
    from dataprep.synth import SynthConfig, write_fasta
    from pretrain.evaluate import load_weights
    from rnalm.io import save_pretrained
    from rnalm.model import RiNALMo

    write_fasta(SynthConfig(1500, seed=1), tmp_path / "in.fa")
    shards = tmp_path / "shards"
    subprocess.run([PY, "dataprep/build_shards.py", "--input", str(tmp_path / "in.fa"), "--out", str(shards),
                    "--no-cluster", "--valid-fraction", "0.2", "--shard-records", "100", "--block-records", "32",
                    "--no-report", "--quiet"], cwd=REPO, check=True, timeout=120)
    cfg = load(PretrainConfig, REPO / "pretrain/configs/tiny_cpu.yaml",
               [f"data.shards={shards}", "train.valid_max_records=0", "data.num_workers=0"])
    torch.manual_seed(0)
    save_pretrained(RiNALMo(cfg.model.build()).state_dict(), tmp_path / "model", config=cfg.model.build())
    model = load_weights(str(tmp_path / "model"), cfg, torch.device("cpu"), torch.float32)
    whole = validation(model, cfg)
    bf16 = validation(load_weights(str(tmp_path / "model"), cfg, torch.device("cpu"), torch.bfloat16), cfg)
    assert bf16["masked_tokens"] == whole["masked_tokens"] and bf16["loss"] != whole["loss"]
    assert bf16["loss"] == pytest.approx(whole["loss"], rel=0.02)
    valid = sorted((shards / "valid").iterdir())
    assert len(valid) == 3 and whole["corrupt_shards_skipped"] == 0
    damaged = bytearray(valid[1].read_bytes())
    damaged[len(damaged) // 2: len(damaged) // 2 + 200] = bytes(200)
    valid[1].write_bytes(damaged)
    rest = validation(model, cfg)
    assert rest["corrupt_shards_skipped"] == 1 and 0 < rest["records"] < whole["records"]
    for shard in valid:
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"{shards}: no masked token in the 'valid' split"):
        validation(model, cfg)


def test_config_json_holds_model_tokenizer_and_provenance(straight_run, converted):
    meta = json.loads((converted / "config.json").read_text())
    assert meta["model"]["dim"] == 64 and meta["model"]["num_layers"] == 2
    assert meta["tokenizer"]["vocab"][:5] == ["<cls>", "<pad>", "<eos>", "<unk>", "<mask>"]
    prov = meta["provenance"]
    assert prov["step"] == STRAIGHT_STEPS and prov["tag"] == f"step{STRAIGHT_STEPS:08d}"
    trained = read_trainer_state(straight_run / "checkpoints", prov["tag"])
    assert (prov["tokens"], prov["samples"]) == (trained["tokens"], trained["samples"])
    assert prov["tokens"] > prov["samples"] > 0
    assert prov["world_size"] == 2 and prov["train_config"]["train"]["grad_accum"] == 2
    shards = prov["train_config"]["data"]["shards"]
    assert prov["shards_manifest"] == shard_set_digest(shards) == trained["shards_manifest"]
    assert events(read_log(straight_run), "start")[0]["shards_manifest"] == prov["shards_manifest"]
    from safetensors import safe_open
    with safe_open(converted / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"embedding.weight", "transformer.blocks.0.mh_attn.Wqkv.weight", "lm_mask_head.linear2.weight"} <= names


def assert_same_weights(a, b):
    from safetensors.torch import load_file

    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_older_tag_and_clear_errors(straight_run, converted, tmp_path):
    from pretrain.convert import to_pretrained
    older = to_pretrained(straight_run, tmp_path / "older", tag="step00000008")
    assert json.loads((older / "config.json").read_text())["provenance"]["step"] == 8
    proc = subprocess.run([PY, "-m", "pretrain.convert", str(tmp_path), str(tmp_path / "x")], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no complete checkpoint" in proc.stderr
    proc = subprocess.run([PY, "-m", "pretrain.convert", str(straight_run), str(tmp_path / "y"), "--tag",
                           "step00000004"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "no checkpoint step00000004; complete ones: step00000008, step00000012" in \
        proc.stderr  # pruned (keep=2): the message said "not a complete checkpoint"
    step_dir = straight_run / "checkpoints" / "step00000008"
    same = to_pretrained(step_dir, tmp_path / "from_step_dir")  # one checkpoint folder named directly
    assert_same_weights(same, older)
    (tmp_path / "a_file").write_text("")
    for args, message in (([str(step_dir), str(tmp_path / "z"), "--tag", "step00000012"], "not --tag step00000012"),
                          ([str(straight_run), str(tmp_path / "a_file")], "a_file is a file, not a directory"),
                          ([str(straight_run), str(tmp_path / "a_file" / "sub")], "a_file is a file, not a directory"),
                          ([str(tmp_path / "a_file"), str(tmp_path / "w")], "a file, not a training run's folder"),
                          ([str(tmp_path / "none"), str(tmp_path / "w")], "none: no such folder"),
                          ([str(converted), str(tmp_path / "w")], "holds released weights (model.safetensors)"),
                          ([str(straight_run), str(tmp_path / "t"), "--tag", "../checkpoints/step00000008"],
                           "a checkpoint's name in")):
        proc = subprocess.run([PY, "-m", "pretrain.convert", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-2000:]


def test_universal_conversion_ahead_of_a_resume(copy_of_straight_run):
    """What the trainer does by itself at another world size, run by hand (e.g. on a CPU node beforehand)."""
    ckpts = copy_of_straight_run / "checkpoints"
    proc = subprocess.run([PY, "-m", "pretrain.convert", "--universal", str(ckpts / "step00000008")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    universal = ckpts / "step00000008_universal"
    assert proc.stdout == f"universal checkpoint: {universal}\n"
    assert (ckpts / "latest_universal").read_text() == universal.name
    ours = {p.name for p in universal.iterdir() if p.is_file()}
    assert {"trainer_state.json", "rng_rank0.pt", "rng_rank1.pt"} <= ours
    assert (universal / "zero").is_dir()  # DeepSpeed's per-parameter folders
    assert not [p for p in ckpts.iterdir() if p.name.startswith(TMP_PREFIX)]


def test_a_universal_conversion_flushes_each_file_before_its_folder_and_all_before_the_name(copy_of_straight_run,
                                                                                            monkeypatch):
    """ds_to_universal fsyncs nothing: a node crash after the rename could leave the final name on truncated files."""
    import pretrain.convert as convert

    ckpts, flushed = copy_of_straight_run / "checkpoints", []
    monkeypatch.setattr(convert, "fsync_path", flushed.append)
    final = convert.to_universal(ckpts, "step00000008")
    tmp = ckpts / (TMP_PREFIX + final.name)
    written = [tmp / p.relative_to(final) for p in final.rglob("*")]
    assert len(written) > 3 and sorted(flushed[:-2]) == sorted(written) and flushed[-2:] == [tmp, ckpts]
    assert all(flushed.index(p) < flushed.index(p.parent) for p in written if p.parent != tmp)


def test_a_universal_conversion_by_hand_waits_for_no_running_trainer(copy_of_straight_run):
    """A trainer starting in the run deletes every temp dir in checkpoints/, a conversion's too: the two exclude
    each other through the run's lock (here held by this test, as a live trainer would)."""
    ckpts = copy_of_straight_run / "checkpoints"
    lock = RunLock(copy_of_straight_run)
    lock.acquire()
    try:
        proc = subprocess.run([PY, "-m", "pretrain.convert", "--universal", str(ckpts)], cwd=REPO,
                              capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"no universal checkpoint written: {copy_of_straight_run} is in use by another run" in proc.stderr
    assert not [p for p in ckpts.iterdir() if p.name.startswith(TMP_PREFIX) or p.name.endswith("_universal")]
    assert not (copy_of_straight_run / "run.lock").exists()


def test_damaged_universal_or_vanishing_checkpoints_fail_with_the_file_named(copy_of_straight_run, tmp_path,
                                                                            monkeypatch):
    """Found by an audit: a truncated shard, a universal checkpoint, or one a running training pruned mid-read came
    out as DeepSpeed tracebacks (a truncated shard's did not name the file); none may leave weights behind."""
    import shutil

    import deepspeed.utils.zero_to_fp32 as z2f

    from pretrain.checkpoint import CheckpointError
    from pretrain.convert import to_pretrained

    ckpts = copy_of_straight_run / "checkpoints"
    shutil.copytree(copy_of_straight_run, tmp_path / "run2")  # undamaged, for the last cases
    shard = ckpts / "step00000012" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # a save cut short, a copy that broke off
    proc = subprocess.run([PY, "-m", "pretrain.convert", str(copy_of_straight_run), str(tmp_path / "a")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"{shard}: damaged checkpoint file" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "a").exists()

    proc = subprocess.run([PY, "-m", "pretrain.convert", "--universal", str(ckpts / "step00000008")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([PY, "-m", "pretrain.convert", str(ckpts / "step00000008_universal"), str(tmp_path / "b")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is a universal checkpoint" in proc.stderr, proc.stderr[-2000:]
    assert f"convert {ckpts / 'step00000008'} instead" in proc.stderr and not (tmp_path / "b").exists()

    real = z2f.get_fp32_state_dict_from_zero_checkpoint

    def pruned_meanwhile(root, tag, **kw):  # what a training run with checkpoint.keep does to the oldest one
        shutil.rmtree(f"{root}/{tag}")
        return real(root, tag, **kw)

    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint", pruned_meanwhile)
    with pytest.raises(CheckpointError, match="step00000008 was removed while it was being converted"):
        to_pretrained(copy_of_straight_run, tmp_path / "c", tag="step00000008")
    assert not (tmp_path / "c").exists()

    import pretrain.convert as convert

    def pruned_while_checked(ckpt, *args):  # being pruned (its shards gone, not yet its state) while read
        for f in ckpt.glob("*_states.pt"):
            f.unlink()
        raise CheckpointError(f"{ckpt / 'mp_rank_00_model_states.pt'}: cannot read (No such file or directory)")

    monkeypatch.setattr(convert, "check_archives", pruned_while_checked)
    with pytest.raises(CheckpointError, match="step00000008 was removed while it was being converted"):
        to_pretrained(tmp_path / "run2", tmp_path / "d", tag="step00000008")
    state = ckpts / "step00000012" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "world_size": 0}))
    with pytest.raises(CheckpointError, match=r"no usable world_size \(0\): a damaged trainer state"):
        to_pretrained(copy_of_straight_run, tmp_path / "e", tag="step00000012")


def test_damaged_contents_or_non_finite_weights_are_refused(copy_of_straight_run, tmp_path, monkeypatch):
    """Found by a review: bytes damaged inside a shard (the file whole, its CRCs wrong) converted with exit 0 and
    released NaN weights, which load_pretrained and pretrain.evaluate took; ds_to_universal, given a missing rank
    file, printed a DeepSpeed traceback blaming a 'tp_degree or dp_degree mismatch'."""
    import deepspeed.utils.zero_to_fp32 as z2f

    from pretrain.checkpoint import CheckpointError
    from pretrain.convert import to_pretrained

    ckpts = copy_of_straight_run / "checkpoints"
    real = z2f.get_fp32_state_dict_from_zero_checkpoint

    def diverged(root, tag, **kw):
        weights = real(root, tag, **kw)
        weights["transformer.blocks.0.mh_attn.Wqkv.weight"][0, 0] = float("nan")
        weights["transformer.blocks.1.mh_attn.Wqkv.weight"][0, 0] = float("-inf")
        return weights

    with monkeypatch.context() as mp:
        mp.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint", diverged)
        with pytest.raises(CheckpointError, match=r"weights with NaN or infinite values \(transformer.blocks.0.mh_attn."
                                                  r"Wqkv.weight, transformer.blocks.1.mh_attn.Wqkv.weight\)"):
            to_pretrained(copy_of_straight_run, tmp_path / "nan", tag="step00000008")
    assert not (tmp_path / "nan").exists()

    shard = ckpts / "step00000012" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 4] = b"\xff\xff\xff\xff"  # inside a tensor: a NaN, the zip intact
    shard.write_bytes(bytes(data))
    proc = subprocess.run([PY, "-m", "pretrain.convert", str(copy_of_straight_run), str(tmp_path / "a")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"{shard}: damaged checkpoint file (its member" in proc.stderr, proc.stderr
    assert "fails its CRC check" in proc.stderr and not (tmp_path / "a").exists()

    (ckpts / "step00000008" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    proc = subprocess.run([PY, "-m", "pretrain.convert", "--universal", str(ckpts / "step00000008")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "zero_pp_rank_1_mp_rank_00_optim_states.pt: missing" in proc.stderr
    assert "Traceback" not in proc.stderr and not list(ckpts.glob("*universal*")), proc.stderr[-2000:]


def test_out_dir_in_the_run_or_its_checkpoints_and_interrupts_are_refused_cleanly(copy_of_straight_run, tmp_path,
                                                                                  monkeypatch, capsys):
    """Weights converted into a step folder were deleted by the trainer's next prune, and made that folder (or the
    run, converted into itself) unconvertible for good; Ctrl-C was a traceback and left an empty OUT_DIR;
    --universal ignored an OUT_DIR it was given."""
    import pretrain.convert as convert

    run, ckpts = copy_of_straight_run, copy_of_straight_run / "checkpoints"
    for out in (run, ckpts, ckpts / "step00000012", ckpts / "released"):
        proc = subprocess.run([PY, "-m", "pretrain.convert", str(run), str(out)], cwd=REPO, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 1 and "is the training run" in proc.stderr and "write the weights elsewhere" in \
            proc.stderr, proc.stderr[-2000:]
    assert not (run / "model.safetensors").exists() and not (ckpts / "released").exists()
    assert not (ckpts / "step00000012" / "model.safetensors").exists()

    def interrupted(*args):
        (tmp_path / "new").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(convert, "to_pretrained", interrupted)
    with pytest.raises(SystemExit) as e:
        convert.main([str(run), str(tmp_path / "new")])
    assert e.value.code == 130 and "python -m pretrain.convert: interrupted" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    with pytest.raises(SystemExit) as e:
        convert.main(["--universal", str(run), str(tmp_path / "x")])
    assert e.value.code == 2 and "--universal writes <checkpoints>/<tag>_universal beside" in capsys.readouterr().err


@pytest.mark.parametrize(("args", "said"), [
    (["run"], "OUT_DIR is required (or --universal)"),
    (["run", "out", "--universal"], "--universal writes <checkpoints>/<tag>_universal beside the checkpoint: no OUT_DIR"),
])
def test_an_out_dir_is_required_for_released_weights_and_refused_for_a_universal_checkpoint(args, said, tmp_path,
                                                                                           capsys):
    from pretrain.convert import main

    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / a) if a in ("run", "out") else a for a in args])
    assert exit_.value.code == 2 and said in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
