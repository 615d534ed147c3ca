"""Short CPU fine-tunes of a tiny model on slices of the real data: the training loss falls, the best
checkpoint and results are written, and the saved model reloads with identical outputs."""
from __future__ import annotations

import io
import json
import os
import sys

import pytest
import torch

from finetune.backbone import BackboneConfig, load_finetuned
from finetune.postprocess import decode_at_thresholds
from finetune.tasks import mrl, splice, ss
from finetune.tasks.common import length_sorted_batches
from finetune.trainer import TrainConfig
from finetune.unfreeze import UnfreezeConfig


def quick_train(out_dir, **kw) -> TrainConfig:
    return TrainConfig(out_dir=str(out_dir), progress=False, **kw)


def test_ss_bprna_loss_falls_and_checkpoint_reloads(tiny_checkpoint, shared_data, tmp_path):
    cfg = ss.SSConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                      data=ss.SSDataConfig(root=str(shared_data), limit_train=32, limit_valid=12, limit_test=12),
                      train=quick_train(tmp_path, epochs=4, lr=2e-3, batch_size=2),
                      unfreeze=UnfreezeConfig(head_only_epochs=2, every=1, blocks_per_step=1))
    result = ss.train(cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < 0.5 * losses[0], losses
    assert result["history"][0]["trainable_lm_params"] == 0 < result["history"][-1]["trainable_lm_params"]
    assert set(result["rows"]) == {"nano-custom fine-tuned", "RNAfold"}
    assert result["rows"]["RNAfold"]["n"] == 12 and 0 <= result["rows"]["nano-custom fine-tuned"]["f1_shift"] <= 1
    assert (tmp_path / "results.md").read_text().count("|") > 10
    model, meta = load_finetuned(tmp_path)
    assert meta["task"] == "ss" and meta["threshold"] in cfg.eval.thresholds
    # the saved threshold and score are the best model's on the validation records, by tune_on (the +-1 F1)
    valid = ss.load_splits(cfg.data).valid
    per_seq = ss.pair_probabilities(model.eval(), [r.sequence for r in valid], 4, False,
                                    lambda p, s: decode_at_thresholds(p, s, cfg.eval.thresholds))
    shifted = ss.tune_threshold(per_seq, valid, cfg.eval.thresholds, shift=True)
    assert cfg.eval.tune_on == "f1_shift" and shifted != ss.tune_threshold(per_seq, valid, cfg.eval.thresholds, False)
    assert (meta["threshold"], meta["valid"]["f1_shift"]) == pytest.approx(shifted)
    assert len(open(tmp_path / "log.jsonl").read().splitlines()) == 4
    tokens = torch.tensor([[0, 5, 6, 7, 8, 5, 6, 7, 8, 2]])
    again, _ = load_finetuned(tmp_path)
    torch.testing.assert_close(model(tokens)[0], again(tokens)[0])


def test_ss_tune_on_f1_tunes_the_threshold_on_the_exact_f1(tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """eval.tune_on=f1: the threshold is tuned without the +-1 shift (a run that always shifted passed every test
    and stored the shifted score under 'f1')."""
    calls = []
    real = ss.tune_threshold
    monkeypatch.setattr(ss, "tune_threshold", lambda *a, **k: calls.append(a[3] if len(a) > 3 else k["shift"])
                        or real(*a, **k))
    cfg = ss.SSConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                      data=ss.SSDataConfig(root=str(shared_data), limit_train=4, limit_valid=4, limit_test=2),
                      train=quick_train(tmp_path, epochs=1, batch_size=2), eval=ss.SSEvalConfig(tune_on="f1"))
    ss.train(cfg)
    assert calls and not any(calls)
    assert "f1" in load_finetuned(tmp_path)[1]["valid"]


@pytest.mark.slow
def test_ss_archiveii_folds_and_summary(tiny_checkpoint, shared_data, tmp_path):
    cfg = ss.SSConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                      data=ss.SSDataConfig(root=str(shared_data), dataset="archiveii", test_family="tRNA,telomerase",
                                           max_train_len=150, limit_train=16, limit_valid=6, limit_test=4),
                      train=quick_train(tmp_path, epochs=1), eval=ss.SSEvalConfig(rnafold=True))
    summary = ss.train(cfg)
    assert set(summary["rows"]) == {"tRNA", "telomerase", "mean of 2 families"}
    assert summary["removed_near_duplicates"]["tRNA"] >= 1
    fold = json.loads((tmp_path / "tRNA" / "results.json").read_text())
    assert fold["test_set"] == "ArchiveII tRNA (held-out family)"
    assert fold["splits"] == {"train": 16, "valid": 6, "test": 4}
    mean = summary["rows"]["mean of 2 families"]
    assert mean["rnafold_f1_shift"] == pytest.approx(
        (summary["rows"]["tRNA"]["rnafold_f1_shift"] + summary["rows"]["telomerase"]["rnafold_f1_shift"]) / 2)
    with pytest.raises(ValueError, match="unknown"):
        ss.fold_families("tRNA,grp2")

    def evaluate(family, dataset="archiveii"):
        return ss.evaluate(ss.SSConfig(model=BackboneConfig(path=str(tmp_path / "tRNA")),
                                       data=ss.SSDataConfig(root=str(shared_data), dataset=dataset,
                                                            test_family=family, limit_test=4),
                                       train=quick_train(tmp_path / "eval"), eval=ss.SSEvalConfig(rnafold=False)))

    assert evaluate("all")["test_set"] == "ArchiveII tRNA (held-out family)"  # the model's held-out family
    # without --data.dataset=archiveii too: the default, bpRNA TS0, holds copies of its training families
    assert evaluate("all", dataset="bprna")["test_set"] == "ArchiveII tRNA (held-out family)"
    with pytest.raises(ValueError, match="held out; family telomerase was in its training data"):
        evaluate("telomerase")


def test_one_archiveii_family_is_one_run_into_out_and_a_random_init_is_named_so(shared_data, tmp_path):
    """One held-out family trains straight into OUT (no OUT/<family>/, no summary of one fold); a backbone of
    random weights (model.random_preset: the no-pretraining baseline) says so in the table."""
    from tests.finetune.conftest import TINY

    cfg = ss.SSConfig(model=BackboneConfig(random_preset="nano", overrides=TINY),
                      data=ss.SSDataConfig(root=str(shared_data), dataset="archiveii", test_family="tRNA",
                                           max_train_len=150, limit_train=4, limit_valid=2, limit_test=2),
                      train=quick_train(tmp_path, epochs=1), eval=ss.SSEvalConfig(rnafold=False))
    result = ss.train(cfg)
    assert result["test_set"] == "ArchiveII tRNA (held-out family)" and not (tmp_path / "tRNA").exists()
    assert list(result["rows"]) == ["nano-custom (random init) fine-tuned"]
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == result["rows"]


def test_splice_loss_falls(tiny_checkpoint, shared_data, tmp_path):
    cfg = splice.SpliceConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                              data=splice.SpliceDataConfig(root=str(shared_data), limit_train=48, limit_valid=16,
                                                           limit_test=16),
                              train=quick_train(tmp_path, epochs=3, batch_size=16, lr=3e-3, optimizer="adamw"))
    result = splice.train(cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    row = result["rows"]["GUE splice test"]
    assert row["n"] == 16 and {"accuracy", "macro_f1", "f1_acceptor", "f1_donor", "f1_non_splice_site"} <= set(row)
    assert "(0.1 of it at random, seed 0, for validation, minus its" in result["note"]


def test_splice_split_drops_test_sequences_from_training(shared_data):
    s = splice.load_splits(splice.SpliceDataConfig(root=str(shared_data)))
    test = {seq for seq, _ in s.test}
    assert len(s.test) == 4562
    assert not test & {seq for seq, _ in s.train + s.valid}
    assert len(s.train) + len(s.valid) < 4562
    # docs/finetune.md: 31 exact copies and ~980 shifted windows of test loci (the shared 50-nt stretch finds 289)
    assert s.removed_near_duplicates == 1013 and len(s.valid) == 318
    # from a user review: no validation split failed after training an epoch ("need at least one array to stack")
    with pytest.raises(ValueError, match=r"empty split: \{'train': 3549, 'valid': 0"):
        splice.load_splits(splice.SpliceDataConfig(root=str(shared_data), valid_fraction=0))


def test_mrl_loss_falls_and_scaler_is_stored(tiny_checkpoint, shared_data, tmp_path):
    cfg = mrl.MRLConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                        data=mrl.MRLDataConfig(root=str(shared_data), limit_train=256, limit_valid=64, limit_test=64),
                        train=quick_train(tmp_path, epochs=4, batch_size=32, lr=3e-3),
                        unfreeze=UnfreezeConfig(head_only_epochs=2, blocks_per_step=2))
    result = mrl.train(cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    assert set(result["rows"]) == {"all", "human", "random"}
    assert "split at random" in result["note"]
    assert f"minus {result['removed_near_duplicates']} train/valid near-duplicates of test records and " \
        f"{result['removed_valid_near_train']} valid near-duplicates of train records" in result["note"]
    assert result["note"] in (tmp_path / "results.md").read_text()  # the markdown said nothing of the split
    meta = json.loads((tmp_path / "finetune.json").read_text())
    assert meta["scaler"]["std"] > 0 and 3 < meta["scaler"]["mean"] < 7


def test_mrl_split_is_disjoint_and_complete(shared_data):
    s = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data)))
    assert [len(s.train) + s.removed_near_duplicates, len(s.valid) + s.removed_valid_near_train, len(s.test)] == \
        [12160, 1520, 1520]
    assert {e.group for e in s.test} == {"random", "human"}


@pytest.mark.parametrize("valid, test", [(0.9, 0.1), (0.5, 0.6), (0.0, 0.1)])
def test_mrl_split_fractions_that_leave_no_part_are_refused(shared_data, valid, test):
    """0.9 + 0.1 fitted the scaler on an empty training set: 'Input contains NaN' after a numpy warning."""
    with pytest.raises(ValueError, match="each above 0 and together below 1"):
        mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data), valid_fraction=valid, test_fraction=test))


def test_bad_step_caps_are_refused_and_bf16_off_cuda_says_it_runs_fp32(tiny_checkpoint, shared_data, tmp_path):
    cfg = mrl.MRLConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                        data=mrl.MRLDataConfig(root=str(shared_data), limit_train=16, limit_valid=8, limit_test=8),
                        train=quick_train(tmp_path, epochs=1, max_steps_per_epoch=0))
    with pytest.raises(ValueError, match="max_steps_per_epoch must be >= 1, got 0"):
        mrl.train(cfg)
    cfg.train = quick_train(tmp_path, epochs=1, max_steps_per_epoch=1, precision="bf16", device="cpu")
    with pytest.warns(UserWarning, match="bf16 autocasts on CUDA only"):
        mrl.train(cfg)


def test_training_autocasts_to_bf16_on_cuda_by_default_as_the_original_did():
    """The original fine-tuned in bf16/16-mixed; fp32 by default ran GPU fine-tuning on fp32 GEMMs and, since the
    CUDA varlen attention kernels take bf16/fp16 only, on the padded SDPA fallback."""
    from finetune.trainer import TrainConfig, autocasts

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert TrainConfig().precision == "auto"
    assert autocasts(cuda, "auto") and autocasts(cuda, "bf16") and not autocasts(cuda, "fp32")
    assert not any(autocasts(cpu, p) for p in ("auto", "bf16", "fp32"))


def test_time_budget_stops_training_at_the_step_past_it_and_still_validates(tiny_checkpoint, shared_data, tmp_path):
    cfg = ss.SSConfig(model=BackboneConfig(path=str(tiny_checkpoint)),
                      data=ss.SSDataConfig(root=str(shared_data), limit_train=4, limit_valid=3, limit_test=3),
                      train=quick_train(tmp_path, epochs=5, max_seconds=0.0), eval=ss.SSEvalConfig(rnafold=False))
    result = ss.train(cfg)
    assert [h["steps"] for h in result["history"]] == [1]   # one step of epoch 0's four, then validation
    assert (tmp_path / "finetuned.safetensors").exists()


def test_mrl_evaluate_uses_the_trained_split_and_a_rerun_that_saves_nothing_fails(tiny_checkpoint, shared_data,
                                                                                  tmp_path):
    def run_cfg(model, out, **data):
        return mrl.MRLConfig(model=BackboneConfig(path=str(model)),
                             data=mrl.MRLDataConfig(root=str(shared_data), **data),
                             train=quick_train(out, epochs=1, batch_size=32), unfreeze=UnfreezeConfig(head_only_epochs=1))

    mrl.train(run_cfg(tiny_checkpoint, tmp_path, seed=1, limit_train=64, limit_valid=32, limit_test=16))
    result = mrl.evaluate(run_cfg(tmp_path, tmp_path / "eval", limit_test=16))  # seed left at its default 0
    assert result["split_seed"] == 1
    assert "(seed 1)" in result["note"] and result["note"] in (tmp_path / "eval" / "eval_results.md").read_text()
    test_seed1 = mrl.load_splits(mrl.MRLDataConfig(root=str(shared_data), seed=1, limit_test=16)).test
    model, meta = load_finetuned(tmp_path)
    assert result["rows"] == mrl.evaluate_examples(model, test_seed1, mrl.Scaler(**meta["scaler"]), 64, False)
    with pytest.raises(ValueError, match="trained on the split .* 'seed': 1.* records it was trained on"):
        mrl.evaluate(run_cfg(tmp_path, tmp_path / "eval", seed=2))

    # a save stopped between its two renames (weights renamed, metadata not): refused, not loaded with the other
    # save's scaler
    import finetune.backbone as backbone
    from tests.conftest import killed_after_one_rename

    with killed_after_one_rename():
        backbone.save_finetuned(model, tmp_path, meta)
    with pytest.raises(backbone.rio.WeightsError, match="come from different saves"):
        load_finetuned(tmp_path)

    with pytest.raises(ValueError, match=r"no model saved .* r2 was never a number \(\[None\]\)"):
        mrl.train(run_cfg(tiny_checkpoint, tmp_path, seed=1, limit_train=32, limit_valid=1))  # R^2 of 1 record
    # nothing of the earlier run is left for evaluate/predict to take for this one's
    assert not (tmp_path / "finetuned.safetensors").exists() and not (tmp_path / "results.json").exists()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1  # this run's epoch only


def test_a_diverged_epoch_is_neither_validated_nor_saved_and_ends_training(tiny_checkpoint, tmp_path):
    """Non-finite weights are not a model: splice and SS validation scored them as a number (every window
    'acceptor', F1 0), so a NaN model was kept as the best epoch and tested; MRL's R^2 raised from sklearn."""
    from finetune.backbone import TaskModel, load_backbone
    from finetune.heads import SpliceSiteHead
    from finetune.tasks.common import tokens_for
    from finetune.trainer import fit

    lm = load_backbone(BackboneConfig(path=str(tiny_checkpoint)))
    model = TaskModel(lm, SpliceSiteHead(lm.config.dim, 3))
    tokens = tokens_for(["ACGUACGUAC"] * 4, "cpu")

    def loss_fn(m, epoch):  # each epoch's one batch is its index; epoch 1 blows up
        loss = m(tokens).logsumexp(-1).mean()
        return loss * float("nan") if epoch == 1 else loss

    validated, saved = [], []

    def validate(m):
        validated.append(len(validated))
        return {"score": float(len(validated))}  # would improve every epoch

    history = fit(model, quick_train(tmp_path, epochs=4), UnfreezeConfig(head_only_epochs=0), lambda e: [e],
                  loss_fn, validate, lambda m, v: saved.append(v["score"]), "score")
    assert saved == [1.0] and validated == [0]
    assert [h["best"] for h in history] == [True, False] and history[1]["diverged"] and not history[0]["diverged"]
    # NaN is not JSON: the diverged epoch's loss and score were written as NaN into log.jsonl and results.json
    assert history[1]["train_loss"] is None and history[1]["valid_score"] is None
    logged = [json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in log.jsonl"))
              for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["valid_score"] for r in logged] == [1.0, None]


def test_seeds_shuffle_apart_and_an_unfreezing_of_no_block_keeps_the_lm_frozen():
    """Batches were shuffled with seed + epoch: seed 1's epoch 0 was seed 0's epoch 1 (seed replicates shared
    their orders). max_blocks=0 froze everything after head-only epochs but unfroze the final LayerNorm without
    them, and dropped train_embedding."""
    from finetune.tasks.common import minibatches
    from finetune.unfreeze import schedule

    orders = {(seed, epoch): [b[0] for b in minibatches(list(range(40)), 1, seed, epoch)]
              for seed in (0, 1) for epoch in (0, 1)}
    assert orders[0, 1] != orders[1, 0] and len(set(map(tuple, orders.values()))) == 4
    assert [b[0] for b in minibatches(list(range(5)), 1, None, 3)] == [0, 1, 2, 3, 4]
    assert schedule(UnfreezeConfig(head_only_epochs=0, max_blocks=0), 4) == {}
    assert schedule(UnfreezeConfig(head_only_epochs=3, max_blocks=0), 4) == {}
    assert schedule(UnfreezeConfig(head_only_epochs=3, max_blocks=0, train_embedding=True), 4) == {3: ["embedding."]}


def test_validation_runs_outside_the_training_autocast(tiny_checkpoint, tmp_path, monkeypatch):
    """With train.precision=bf16 on CUDA the epoch and the SS threshold were chosen on bf16 validation scores,
    while the test pass and `evaluate` run in fp32: valid scores in finetune.json were not reproducible."""
    import contextlib

    import finetune.trainer as trainer
    from finetune.backbone import TaskModel, load_backbone
    from finetune.heads import SpliceSiteHead
    from finetune.tasks.common import tokens_for

    inside = []

    @contextlib.contextmanager
    def recording_autocast(device, precision):
        inside.append(True)
        try:
            yield
        finally:
            inside.pop()

    monkeypatch.setattr(trainer, "autocast", recording_autocast)
    lm = load_backbone(BackboneConfig(path=str(tiny_checkpoint)))
    model = TaskModel(lm, SpliceSiteHead(lm.config.dim, 3))
    tokens = tokens_for(["ACGUACGUAC"] * 4, "cpu")
    trained, validated = [], []

    def loss_fn(m, batch):
        trained.append(bool(inside))
        return m(tokens).logsumexp(-1).mean()

    def validate(m):
        validated.append(bool(inside))
        return {"score": 1.0}

    trainer.fit(model, quick_train(tmp_path, epochs=2), UnfreezeConfig(head_only_epochs=0), lambda e: [e], loss_fn,
                validate, lambda m, v: None, "score")
    assert trained == [True, True] and validated == [False, False]


@pytest.mark.parametrize("task", ["splice", "mrl"])
def test_a_run_that_diverges_from_the_start_saves_and_tests_nothing(tiny_checkpoint, shared_data, tmp_path, task):
    module, cfg_cls, data_cls = {"splice": (splice, splice.SpliceConfig, splice.SpliceDataConfig),
                                 "mrl": (mrl, mrl.MRLConfig, mrl.MRLDataConfig)}[task]
    cfg = cfg_cls(model=BackboneConfig(path=str(tiny_checkpoint)),
                  data=data_cls(root=str(shared_data), limit_train=32, limit_valid=16, limit_test=16),
                  train=quick_train(tmp_path, epochs=2, batch_size=8, lr=1e4), unfreeze=UnfreezeConfig(head_only_epochs=0))
    with pytest.raises(ValueError, match="no model saved .* non-finite weights after epoch 0"):
        module.train(cfg)
    assert not (tmp_path / "finetuned.safetensors").exists() and not (tmp_path / "results.json").exists()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_go_to_a_terminal_and_stay_out_of_a_log_file(terminal, monkeypatch):
    err = _Terminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    seqs = ["ACGU" * n for n in (3, 1, 2, 5, 4)]
    batches = list(length_sorted_batches(seqs, 2, desc="predict", progress=True))
    assert batches == [[1, 2], [0, 4], [3]]
    assert ("predict" in err.getvalue()) == terminal
    err.truncate(0)
    assert list(length_sorted_batches(seqs, 2, progress=False)) == batches and err.getvalue() == ""


@pytest.mark.slow
def test_archiveii_folds_are_shared_out_between_processes_and_reused(tiny_checkpoint, shared_data, tmp_path, capsys):
    """A fold another process holds is left to it (no summary until every fold is finished, and the process that
    finds them all finished writes it); a fold finished with the same settings is reused (its paths written
    otherwise too: they retrained every family), one of other settings (or other backbone weights) is trained
    again, saying what differed."""
    from rnalm.runlock import RunLock

    def cfg(seed=0, path=str(tiny_checkpoint)):
        return ss.SSConfig(model=BackboneConfig(path=path),
                           data=ss.SSDataConfig(root=str(shared_data), dataset="archiveii", test_family="tRNA,srp",
                                                max_train_len=150, limit_train=8, limit_valid=4, limit_test=4),
                           train=quick_train(tmp_path, epochs=1, seed=seed), eval=ss.SSEvalConfig(rnafold=False))

    def weights(fam):
        return (tmp_path / fam / "finetuned.safetensors").read_bytes()

    with RunLock(tmp_path / "tRNA"):                       # another process trains tRNA now
        pending = ss.train(cfg())["pending"]
    assert list(pending) == ["tRNA"] and f"in use by another run: pid {os.getpid()}" in pending["tRNA"]
    assert "tRNA: not claimed: " in capsys.readouterr().err  # with the holder and its heartbeat
    assert (tmp_path / "srp" / "results.json").exists() and not (tmp_path / "tRNA").joinpath("results.json").exists()
    assert not (tmp_path / "results.json").exists()
    srp = weights("srp")

    summary = ss.train(cfg(path=f"{tiny_checkpoint}/"))    # that process stopped: the next run trains tRNA only
    err = capsys.readouterr().err
    assert "tRNA: training" in err and "srp: finished earlier with the same settings, reused" in err
    assert weights("srp") == srp and set(summary["rows"]) == {"tRNA", "srp", "mean of 2 families"}
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == summary["rows"]
    assert not list(tmp_path.rglob("run.lock"))

    ss.train(cfg(seed=1))                                  # other settings: both trained again
    err = capsys.readouterr().err
    assert err.count(": training") == 2 and weights("srp") != srp
    assert "its earlier results, of other settings, go (train.seed: 0 -> 1)" in err
    with pytest.raises(ValueError, match="data.test_family: srp given twice"):
        ss.fold_families("srp,tRNA,srp")


def test_an_out_dir_in_use_by_another_kind_of_run_or_other_settings_is_refused(tiny_checkpoint, shared_data, tmp_path,
                                                                               monkeypatch, capsys):
    """A several-family run and a single run into one OUT removed each other's model and summary; two several-family
    runs of other settings shared out the families between them, and neither wrote a summary."""
    from finetune import outlock
    from finetune.cli import run
    from rnalm.runlock import RunLock

    monkeypatch.setattr(outlock, "MOMENT_WAIT_S", 0.5)
    args = [f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}", "--data.dataset=archiveii",
            "--data.max_train_len=150", "--data.limit_train=8", "--data.limit_valid=4", "--data.limit_test=4",
            "--train.epochs=1", "--eval.rnafold=false", "--train.progress=false", f"--train.out_dir={tmp_path}"]
    with RunLock(tmp_path):                                   # a single train run holds OUT
        assert run(["ss", "train", *args, "--data.test_family=tRNA,srp"]) == 2
        assert f"{tmp_path} is in use by another run: pid {os.getpid()}" in capsys.readouterr().err
    assert not (tmp_path / outlock.FOLDS_FILE).exists()

    outlock.claim_out(tmp_path, {"train": {"seed": 7}})       # a several-family run of other settings ...
    with RunLock(tmp_path / "srp"):                           # ... trains srp now
        assert run(["ss", "train", *args, "--data.test_family=tRNA,srp"]) == 2
        err = capsys.readouterr().err
        assert "holds an ArchiveII run of other settings (" in err and "train.seed: 7 -> 0" in err
        assert "whose families srp are in training" in err
        assert run(["ss", "train", *args, "--data.test_family=5s"]) == 2     # a single run, too
        assert "in use by an ArchiveII run over several families (families srp in training)" in \
            capsys.readouterr().err
    assert not (tmp_path / "train_config.yaml").exists() and not (tmp_path / "tRNA").exists()
    assert run(["ss", "train", *args, "--data.test_family=tRNA,srp"]) == 0  # that run stopped: OUT is this one's
    assert json.loads((tmp_path / outlock.FOLDS_FILE).read_text())["train"]["seed"] == 0


def test_a_new_run_into_out_removes_the_evaluation_of_the_model_it_replaces(tmp_path):
    """eval_results.json of an evaluation into OUT stayed beside the retrained model, with the old model's scores
    under OUT's name."""
    from finetune.backbone import FT_META, FT_WEIGHTS, remove_finetuned

    names = [FT_WEIGHTS, FT_META, "results.json", "results.md", "eval_results.json", "eval_results.md",
             "evaluate_config.yaml", "train_config.yaml", "log.jsonl", "mine.txt"]
    for name in names:
        (tmp_path / name).write_text("x")
    remove_finetuned(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "mine.txt", "train_config.yaml"]
