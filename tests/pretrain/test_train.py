"""The trainer end to end: real DeepSpeed ZeRO-3, 2 ranks on gloo, tiny model, shards of the real ncRNA corpus."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml

from dataprep.shards import read_manifest
from pretrain.checkpoint import latest_tag, tag_for
from pretrain.config import PretrainConfig
from pretrain.convert import to_pretrained
from rnalm.config import ModelConfig
from rnalm.configfile import load
from rnalm.io import save_pretrained
from rnalm.model import RiNALMo
from tests.deploy.daemons import free_port

from .trainer_runs import (PY, REPO, STRAIGHT_STEPS, events, read_log, run_trainer, signal_tree, start_trainer,
                           step_lines, wait_for)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEP_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "samples", "tokens_per_s", "mfu", "samples_sha1", "epoch",
             "corrupt_shards_skipped", "forward_s", "backward_s", "optimizer_s", "forward_host_s", "backward_host_s",
             "optimizer_host_s"}


def by_step(records: list[dict]) -> dict[int, dict]:
    """Step -> its last log line (a crashed run redoes the steps after its last checkpoint)."""
    return {r["step"]: r for r in step_lines(records)}


def assert_same_steps(run: dict[int, dict], reference: dict[int, dict]) -> None:
    assert sorted(run) == sorted(reference) == list(range(1, STRAIGHT_STEPS + 1))
    for step, ref in reference.items():
        got = run[step]
        assert got["samples_sha1"] == ref["samples_sha1"], f"step {step}: different samples"
        assert (got["loss"], got["lr"], got["grad_norm"], got["tokens"]) == \
               (ref["loss"], ref["lr"], ref["grad_norm"], ref["tokens"]), f"step {step}: {got} != {ref}"


def test_loss_falls_and_every_step_is_logged(straight_run):
    records = read_log(straight_run)
    steps = step_lines(records)
    assert [r["step"] for r in steps] == list(range(1, STRAIGHT_STEPS + 1))
    assert all(STEP_KEYS <= set(r) for r in steps)
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert first > 2.5 and last < first - 0.8, [r["loss"] for r in steps]
    assert steps[-1]["tokens"] == sum(r["step_tokens"] for r in steps)
    for r in steps:  # where a step's time went (PhaseClock): each phase ran, and together they fit in the step
        phases = (r["forward_s"], r["backward_s"], r["optimizer_s"])
        assert min(phases) > 0 and sum(phases) <= r["step_seconds"], r
    assert len({r["samples_sha1"] for r in steps}) == STRAIGHT_STEPS  # fresh samples every step
    start = events(records, "start")[0]
    assert start["world_size"] == 2 and start["resumed_from"] is None
    assert (start["device_name"], start["peak_flops"]) == ("cpu", 1e12)  # tiny_cpu.yaml's nominal peak
    assert (start["attention_backend"], start["attention_dropout"]) == ("sdpa", 0.1)  # what training applies
    valid = events(records, "valid")
    assert [v["step"] for v in valid] == [STRAIGHT_STEPS]
    assert 0 < valid[0]["accuracy"] < 1 and valid[0]["perplexity"] > 1 and valid[0]["masked_tokens"] > 0
    assert events(records, "done") == [{**events(records, "done")[0], "step": STRAIGHT_STEPS}]


def test_resolved_config_is_written_beside_the_checkpoints(straight_run):
    cfg = load(PretrainConfig, straight_run / "config.yaml")
    assert cfg.train.max_steps == STRAIGHT_STEPS and cfg.train.grad_accum == 2
    assert cfg.model.dim == 64 and cfg.data.token_budget == 1024
    raw = yaml.safe_load((straight_run / "config.yaml").read_text())
    assert set(raw) == {"model", "data", "optim", "train", "checkpoint", "metrics"}


def test_sigusr1_stops_at_a_step_boundary_and_resume_equals_the_straight_run(pretrain_shards, straight_run,
                                                                           tmp_path):
    out = tmp_path / "run"
    proc = start_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}",
                         f"--train.valid_every={STRAIGHT_STEPS}")
    try:
        pids = wait_for(lambda: [e["pid"] for e in events(read_log(out), "start")], 120, "start event", proc)
        wait_for(lambda: len(step_lines(read_log(out))) >= 3, 120, "step 3", proc, poll=0.02)
        # As `scancel --signal=USR1 --full` does: every process below torchrun gets it, the DataLoader worker
        # processes included (torchrun itself would die of SIGUSR1).
        workers = signal_tree(proc, signal.SIGUSR1, workers_only=True)
        # 2 ranks, each with a DataLoader worker and multiprocessing's resource tracker
        assert set(pids) <= set(workers) and len(workers) == 6
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            signal_tree(proc, signal.SIGKILL)
    records = read_log(out)
    stopped = events(records, "preempted")
    assert len(stopped) == 1, "the run finished before the signal arrived"
    k = stopped[0]["step"]
    assert 3 <= k < STRAIGHT_STEPS
    assert latest_tag(out / "checkpoints") == tag_for(k)
    assert events(records, "checkpoint")[-1]["step"] == k
    assert not events(records, "done")
    said = f"stopped on a signal at step {k} with checkpoint {tag_for(k)} saved: the same command resumes from it"
    assert (tmp_path / "run.stderr").read_text().count(said) == 1   # rank 0 only

    proc = run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}",
                       f"--train.valid_every={STRAIGHT_STEPS}")
    said = f"done at step {STRAIGHT_STEPS} of {STRAIGHT_STEPS}; newest checkpoint: {tag_for(STRAIGHT_STEPS)} in "
    assert proc.stderr.count(said) == 1
    records = read_log(out)
    assert events(records, "start")[-1]["resumed_from"] == tag_for(k)
    assert [r["step"] for r in step_lines(records)] == list(range(1, STRAIGHT_STEPS + 1))  # nothing redone
    assert_same_steps(by_step(records), by_step(read_log(straight_run)))
    assert events(records, "valid")[-1]["loss"] == events(read_log(straight_run), "valid")[-1]["loss"]


def test_ctrl_c_stops_every_rank_with_one_line_that_says_where_to_resume(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    proc = start_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}")
    try:
        wait_for(lambda: len(step_lines(read_log(out))) >= 5, 120, "step 5", proc, poll=0.05)
        proc.send_signal(signal.SIGINT)  # as a terminal's Ctrl-C: to torchrun, which passes it on to the ranks
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            signal_tree(proc, signal.SIGKILL)
    said = (tmp_path / "run.stderr").read_text()
    line = "python -m pretrain.train: interrupted; the same command resumes from the newest checkpoint (step0000000"
    assert said.count(line) == 2 and "KeyboardInterrupt" not in said, said[-4000:]  # was a traceback per rank


def test_a_wrong_data_shards_is_refused_before_the_start_up_and_says_what_to_give(pretrain_shards, ncrna_fasta,
                                                                                tmp_path):
    """A file (the FASTA, the manifest) or a folder inside the build's output: a traceback ending in
    NotADirectoryError, or exit 4 ('unreadable shard data') after DeepSpeed had started and the model was built."""
    from .trainer_runs import trainer_env

    cases = {ncrna_fasta: f"{ncrna_fasta} is a file, not the output folder of dataprep/build_shards.py",
             pretrain_shards / "manifest.json": f"(the folder that holds manifest.json): give {pretrain_shards}",
             pretrain_shards / "train": f"no manifest; give the build's output folder {pretrain_shards}",
             tmp_path: "no manifest (was build_shards interrupted or never run?)",
             tmp_path / "nothing": f"{tmp_path / 'nothing'}: no such folder (the output folder of dataprep"}
    for shards, said in cases.items():
        proc = subprocess.run([PY, "-m", "pretrain.train", "--config", "pretrain/configs/tiny_cpu.yaml",
                               f"--data.shards={shards}", f"--train.out_dir={tmp_path / 'run'}"], cwd=REPO,
                              env=trainer_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and said in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_split_the_shards_lack_is_a_refused_start_in_one_line(pretrain_shards, tmp_path):
    """A ValueError traceback, exit 1, after the whole start-up."""
    from .trainer_runs import trainer_env

    for split_option, said in (("--train.valid_split=validation", "validation data: "),
                               ("--data.split=training", "training data: ")):
        proc = subprocess.run([PY, "-m", "pretrain.train", "--config", "pretrain/configs/tiny_cpu.yaml",
                               f"--data.shards={pretrain_shards}", f"--train.out_dir={tmp_path / 'run'}",
                               "--metrics.enabled=false", split_option], cwd=REPO, env=trainer_env(),
                              capture_output=True, text=True, timeout=180)
        assert proc.returncode == 2 and said in proc.stderr and "splits present: ['train', 'valid']" in proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_a_resume_may_change_how_the_model_computes_not_which_model_it_is():
    from pretrain.train import model_changes
    from rnalm.config import ModelConfig

    saved = ModelConfig.preset("nano").to_dict()
    same = ModelConfig.preset("nano", attention_backend="sdpa", activation_checkpointing=True, ffn_align=1,
                              attn_dropout=0.0, residual_dropout=0.0)
    assert model_changes(saved, same) == {}
    other = ModelConfig.preset("nano", dim=128, num_heads=8, rope_base=500.0)
    assert model_changes(saved, other) == {"dim": (saved["dim"], 128), "num_heads": (saved["num_heads"], 8),
                                          "rope_base": (10000.0, 500.0)}


def test_a_resume_follows_its_own_config_and_a_refused_start_changes_nothing(pretrain_shards, copy_of_straight_run):
    from pretrain.schedule import warmup_cosine

    out = copy_of_straight_run
    config_before = (out / "config.yaml").read_bytes()
    proc = run_trainer(pretrain_shards, out, "--checkpoint.resume=false", expect_rc=1)  # torchrun: 1 if any failed
    assert "holds checkpoints of an earlier run (newest step00000012) and checkpoint.resume=false" in proc.stderr
    assert "(exitcode: 2)" in proc.stderr and "CheckpointError" not in proc.stderr  # refused: the ranks exit 2
    assert (out / "config.yaml").read_bytes() == config_before  # a refused start leaves the run's config
    # another head count: the same shapes, so the checkpoint loaded and the run went on with other attention
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=14", "--model.num_heads=8", expect_rc=1)
    assert "step00000012 was written by another model than this run's model section (theirs, this run's): " \
        "{'num_heads': (4, 8)}" in proc.stderr and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    # the files DeepSpeed would look for: another ZeRO stage or precision names them otherwise (a bare
    # AssertionError, a FileNotFoundError before)
    for setting, layout in [("train.ds_config=ds_configs/zero2.json", "{'zero_stage': (3, 2)}"),
                            ("train.precision=bf16", "{'bf16': (False, True)}")]:
        proc = run_trainer(pretrain_shards, out, "--train.max_steps=14", f"--{setting}", expect_rc=1)
        assert "step00000012 was written with another ZeRO stage or precision than this run's train.ds_config and " \
            f"train.precision give (theirs, this run's): {layout}" in proc.stderr, proc.stderr[-3000:]
        assert "(exitcode: 2)" in proc.stderr and "FileNotFound" not in proc.stderr \
            and "AssertionError" not in proc.stderr

    # longer, another peak LR, other Adam settings: the run's own, not the checkpoint optimizer's
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=14", "--optim.lr=1e-3", "--optim.betas=[0.9, 0.95]",
                       "--optim.eps=1e-6")
    records = read_log(out)
    changed = events(records, "config_changed")[-1]["changes"]
    assert changed["optim.lr"][1] == 1e-3 and changed["train.max_steps"] == [STRAIGHT_STEPS, 14]
    assert changed["optim.betas"] == [[0.9, 0.999], [0.9, 0.95]] and changed["optim.eps"] == [1e-8, 1e-6]
    assert "settings changed since (then, now): {" in proc.stderr and "'optim.eps': (1e-08, 1e-06)" in proc.stderr
    start = events(records, "start")[-1]
    assert start["betas"] == [[0.9, 0.95]] * 2 and start["eps"] == [1e-6] * 2, start
    cfg = load(PretrainConfig, out / "config.yaml")
    assert cfg.optim.lr == 1e-3 and cfg.train.max_steps == 14
    schedule = warmup_cosine(cfg.optim, 14)
    assert [r["lr"] for r in step_lines(records)[-2:]] == pytest.approx([schedule.lr(12), schedule.lr(13)])

    # validation asked for at the end of a finished run (as after a preemption at its last step) still runs
    assert not [v for v in events(records, "valid") if v["step"] == 14]
    run_trainer(pretrain_shards, out, "--train.max_steps=14", "--optim.lr=1e-3", "--train.valid_every=7")
    assert [v["step"] for v in events(read_log(out), "valid")][-1] == 14


def test_a_checkpoint_of_other_data_settings_is_a_refused_start(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    run_trainer(pretrain_shards, out, "--train.max_steps=4", nproc=1)
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=8", "--data.seed=5", nproc=1, expect_rc=1)
    assert "does not match this loader's settings (saved, now): {'data.seed': (0, 5)}" in proc.stderr
    assert "(exitcode: 2)" in proc.stderr and "ValueError" not in proc.stderr  # refused: one line, exit 2


def test_skipped_corrupt_shards_are_counted_in_the_log(pretrain_shards, straight_run, tmp_path):
    """on_corrupt=skip goes on without the damaged records; the step lines (and the gauge behind the
    RnalmShardsSkipped alert) say how many shards were skipped, not only a warning on the ranks' stderr."""
    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    damaged = [shards / s.path for s in read_manifest(shards).split_shards("train")]
    for path in damaged:  # each keeps its first tenth
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 10])
    out = tmp_path / "run"
    # each rank's first shuffle window is its whole half of the epoch (5 shards of ~5,070 records): both ranks
    # read past the damage of every shard in their halves before the first batch, both of the shard between them
    proc = run_trainer(shards, out, "--train.max_steps=3", "--data.shuffle_buffer=13000")
    skipped = [r["corrupt_shards_skipped"] for r in step_lines(read_log(out))]
    # a shard in both ranks' ranges counts once (summed over ranks, it counted twice); the ranks' workers may
    # have met more in batches not yet trained on
    warned = set(re.findall(r"skipping the rest of corrupt shard (\S+?\.tar):", proc.stderr))
    assert len(skipped) == 3 and 1 <= skipped[-1] <= len(warned) <= len(damaged), (skipped, warned)
    assert {r["corrupt_shards_skipped"] for r in step_lines(read_log(straight_run))} == {0}


def test_damaged_shards_with_on_corrupt_fail_stop_the_run_with_one_line_and_exit_4(pretrain_shards, tmp_path):
    """It used to be a traceback per rank (with a DataLoader worker, the worker's traceback inside the message)."""
    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    damaged = {str(shards / s.path) for s in read_manifest(shards).split_shards("train")}
    for path in map(Path, damaged):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = run_trainer(shards, tmp_path / "run", "--train.max_steps=3", "--data.shuffle_buffer=6000",
                       "--data.on_corrupt=fail", "--data.num_workers=1", expect_rc=1)
    errors = [line for line in proc.stderr.splitlines() if "pretrain.train: error: unreadable shard data: " in line]
    assert len(errors) == 2 and all(line.split(": ")[3] in damaged for line in errors), errors  # one per rank
    assert "(exitcode: 4)" in proc.stderr and f'File "{REPO / "pretrain"}' not in proc.stderr  # torchrun's traceback only


@pytest.mark.parametrize("zero_init", [False, True])
def test_a_fresh_run_starts_from_init_weights_and_a_resume_from_its_checkpoint(pretrain_shards, straight_run,
                                                                              tmp_path, zero_init):
    """Continued pretraining: a fresh run loads train.init_weights (the straight run, converted). After one step at
    lr ~1e-5 its validation loss is the straight run's last one (a random model's is ~0.8 higher)."""
    weights = to_pretrained(straight_run, tmp_path / "weights")
    out = tmp_path / "run"
    slow_warmup = ("--optim.warmup_steps=1000", "--optim.decay_steps=1000")
    run_trainer(pretrain_shards, out, "--train.max_steps=1", "--train.valid_every=1", *slow_warmup,
                f"--train.init_weights={weights}", f"--train.zero_init={str(zero_init).lower()}")
    start = events(read_log(out), "start")
    assert start[0]["init_weights"] == str(weights)
    trained = events(read_log(straight_run), "valid")[-1]["loss"]
    assert events(read_log(out), "valid")[0]["loss"] == pytest.approx(trained, rel=2e-3)
    if not zero_init:  # the resume takes its checkpoint, not init_weights
        proc = run_trainer(pretrain_shards, out, "--train.max_steps=2", *slow_warmup,
                           f"--train.init_weights={weights}")
        resumed = events(read_log(out), "start")[-1]
        assert resumed["resumed_from"] and resumed["init_weights"] is None
        assert proc.stderr.count("train.init_weights ignored: resuming") == 1  # said once, by rank 0


def test_a_validation_that_reads_nothing_is_skipped_not_scored(pretrain_shards, tmp_path):
    """Every held-out shard missing, on_corrupt=skip: the run goes on and logs valid_skipped, not a loss of 0."""
    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    for s in read_manifest(shards).split_shards("valid"):
        (shards / s.path).unlink()
    out = tmp_path / "run"
    run_trainer(shards, out, "--train.max_steps=3", "--train.valid_every=2")  # step 3: the validation at the end
    records = read_log(out)
    assert [e["step"] for e in events(records, "valid_skipped")] == [2, 3] and not events(records, "valid")
    assert len(step_lines(records)) == 3


def test_a_validation_over_a_partly_readable_shard_says_how_much_it_scored(pretrain_shards, straight_run, tmp_path):
    """A truncated held-out shard: the records before the damage are scored, and the valid event says how many
    and that a shard was skipped (it used to give a loss over fewer records with a warning on stderr only)."""
    shards = tmp_path / "shards"
    shutil.copytree(pretrain_shards, shards)
    held_out = read_manifest(shards).split_shards("valid")
    damaged = shards / held_out[0].path
    damaged.write_bytes(damaged.read_bytes()[: damaged.stat().st_size // 2])
    out = tmp_path / "run"
    proc = run_trainer(shards, out, "--train.max_steps=1", "--train.valid_every=1", "--train.valid_max_records=0")
    valid = events(read_log(out), "valid")[0]
    assert valid["corrupt_shards_skipped"] == 1
    assert 0 < valid["records"] < sum(s.records for s in held_out)
    assert "1 unreadable held-out shard(s) skipped" in proc.stderr
    assert {e["corrupt_shards_skipped"] for e in events(read_log(straight_run), "valid")} == {0}


def test_init_weights_of_another_model_are_a_refused_start(pretrain_shards, tmp_path):
    weights = save_pretrained(RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=2, num_heads=4)),
                              tmp_path / "weights")
    proc = run_trainer(pretrain_shards, tmp_path / "run", "--train.max_steps=1", f"--train.init_weights={weights}",
                       expect_rc=1)
    assert proc.stderr.count("pretrain.train: error: train.init_weights:") == 2  # each rank refuses, one line
    assert "does not match model" in proc.stderr and "(exitcode: 2)" in proc.stderr
    assert "WeightsError" not in proc.stderr and "CheckpointError" not in proc.stderr  # no traceback


def test_hard_kill_and_a_crash_mid_save_resume_from_the_last_good_checkpoint(pretrain_shards, straight_run,
                                                                              tmp_path):
    out = tmp_path / "run"
    proc = start_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}",
                         f"--train.valid_every={STRAIGHT_STEPS}")
    try:
        wait_for(lambda: any(r.get("step", 0) >= 6 for r in step_lines(read_log(out))), 120, "step 6", proc,
                 poll=0.02)
    finally:
        signal_tree(proc, signal.SIGKILL)
        proc.wait()
    ckpt = out / "checkpoints"
    good = latest_tag(ckpt)
    assert good is not None and int(good[4:]) >= 4
    # What a crash in the middle of the next save leaves behind: a temp dir with part of the files.
    partial = ckpt / f".tmp-{tag_for(int(good[4:]) + 4)}"
    shutil.rmtree(partial, ignore_errors=True)  # the kill may have landed in that save itself
    shutil.copytree(ckpt / good, partial)
    (partial / "trainer_state.json").unlink()
    (partial / "zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"truncated")
    pointer_before = (ckpt / "latest").read_text()

    proc = run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}",
                       f"--train.valid_every={STRAIGHT_STEPS}")
    records = read_log(out)
    assert pointer_before == good
    assert events(records, "removed_partial_checkpoints")[-1]["dirs"] == [partial.name]
    assert f"removed unfinished checkpoints (a save or a pruning cut short): {partial.name}" in proc.stderr
    assert not partial.exists()
    assert events(records, "start")[-1]["resumed_from"] == good
    assert_same_steps(by_step(records), by_step(read_log(straight_run)))


def test_a_damaged_newest_checkpoint_is_a_refused_start_that_names_the_file_and_the_way_back(
        pretrain_shards, straight_run, copy_of_straight_run):
    out, ckpt = copy_of_straight_run, copy_of_straight_run / "checkpoints"
    newest = ckpt / tag_for(STRAIGHT_STEPS)
    rng = (newest / "rng_rank1.pt").read_bytes()
    (newest / "rng_rank1.pt").unlink()  # resumed before, with rank 1 reseeded: other samples and losses
    proc = run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}", expect_rc=1)
    assert f"{newest / 'rng_rank1.pt'}: missing (the checkpoint was written by 2 ranks)" in proc.stderr
    (newest / "rng_rank1.pt").write_bytes(rng)
    optim = newest / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    whole = optim.read_bytes()
    middle = len(whole) // 2  # damaged after it was written, its zip directory intact: before, resumed from it
    optim.write_bytes(whole[:middle] + bytes(4096) + whole[middle + 4096:])
    proc = run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}", expect_rc=1)
    assert f"{optim}: damaged checkpoint file (its member" in proc.stderr and "fails its CRC check" in proc.stderr
    assert "(exitcode: 2)" in proc.stderr and "move it aside" in proc.stderr, proc.stderr[-3000:]
    optim.write_bytes(whole[:5000])  # torn: before, an OSError traceback naming no file
    proc = run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}", expect_rc=1)
    assert f"{optim}: damaged checkpoint file" in proc.stderr and "(exitcode: 2)" in proc.stderr, proc.stderr[-3000:]
    way_back = proc.stderr.split("move it aside: ")[1].split()[:3]
    assert "the run cannot resume from step00000012. To resume from the checkpoint before it (step00000008)" \
        in proc.stderr
    assert way_back == ["mv", str(newest), str(ckpt / "damaged-step00000012")]
    subprocess.run(way_back, check=True)
    run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}", f"--train.valid_every={STRAIGHT_STEPS}")
    records = read_log(out)
    assert events(records, "start")[-1]["resumed_from"] == tag_for(8)
    assert_same_steps(by_step(records), by_step(read_log(straight_run)))  # steps 9-12 again, the same


def test_a_missing_validation_split_stops_the_run_before_its_first_step(pretrain_shards, tmp_path):
    proc = run_trainer(pretrain_shards, tmp_path / "run", "--train.valid_every=4", "--train.valid_split=heldout",
                       nproc=1, expect_rc=1)
    assert "validation data:" in proc.stderr and "no records in split 'heldout'" in proc.stderr
    assert "--train.valid_every=0" in proc.stderr
    assert not [r for r in read_log(tmp_path / "run") if "step" in r and "event" not in r]


def test_nonfinite_steps_are_skipped_and_k_in_a_row_stop_the_run(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    # One micro-batch per step: a poisoned attempt takes no step. Attempt 3 is poisoned on rank 1 only (both
    # ranks must skip it), then attempts 5 and 6: two in a row.
    proc = run_trainer(pretrain_shards, out, "--train.grad_accum=1", "--train.max_steps=20",
                       "--train.inject_nonfinite_at=[3, 5, 6]", "--train.max_nonfinite_in_row=2",
                       "--checkpoint.every=0", expect_rc=None)
    assert proc.returncode != 0 and "exitcode  : 3" in proc.stderr  # every worker exits 3 (EXIT_NONFINITE)
    records = read_log(out)
    bad = events(records, "nonfinite")
    assert [(e["step"], e["stepped"], e["in_row"]) for e in bad] == [(3, False, 1), (4, False, 1), (4, False, 2)]
    assert [r["step"] for r in step_lines(records)] == [1, 2, 3]  # attempt 3 took no step; attempt 4 was step 3
    stop = events(records, "stopped_nonfinite")[0]
    assert stop["step"] == 3 and "2 steps in a row had a NaN/inf loss" in stop["message"]
    assert "2 steps in a row had a NaN/inf loss" in proc.stderr
    assert all(r["loss"] == r["loss"] for r in step_lines(records))  # no NaN reached the weights


def test_a_nonfinite_stop_keeps_the_metrics_up_for_a_final_scrape(pretrain_shards, tmp_path):
    """The job's Prometheus targets go with it: a run that stops within a scrape interval of its first NaN would
    leave RnalmLossNotFinite nothing to see. Its final count stays served for metrics.final_scrape_s."""
    port = free_port()
    proc = start_trainer(pretrain_shards, tmp_path / "run", "--train.grad_accum=1", "--train.max_steps=20",
                         "--train.inject_nonfinite_at=[2, 3]", "--train.max_nonfinite_in_row=2",
                         "--checkpoint.every=0", f"--metrics.port_base={port}", "--metrics.final_scrape_s=10",
                         nproc=1)
    final = []  # when the stopped run's count was scraped
    try:
        deadline = time.monotonic() + 180
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
            except requests.RequestException:  # not served yet or gone; or slow to answer on a loaded machine
                text = ""
            if "\nrnalm_train_nonfinite_steps_total 2.0\n" in text:
                final.append(time.monotonic())
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            signal_tree(proc, signal.SIGKILL)
        proc.wait()
    assert events(read_log(tmp_path / "run"), "stopped_nonfinite")
    assert final and final[-1] - final[0] >= 3, f"final count served {final[-1] - final[0] if final else 0:.1f} s"


def test_a_nonfinite_micro_batch_is_dropped_and_the_step_uses_the_rest(pretrain_shards, straight_run, tmp_path):
    """The step's last micro-batch is dropped, so the accumulation boundary has no backward of its own: ZeRO-1/2
    reduce the accumulated gradients in that backward (without it, their optimizer step failed), ZeRO-3 does not.
    Every stage must take the same step on the kept micro-batch."""
    reference, runs = by_step(read_log(straight_run)), {}
    for name, setting in (("zero3", []), ("zero2", ["--train.ds_config=ds_configs/zero2.json"]),
                          ("zero1", ["--train.ds_config=ds_configs/zero2.json",
                                     "--train.ds_overrides={zero_optimization: {stage: 1}}"])):
        out = tmp_path / name
        run_trainer(pretrain_shards, out, "--train.max_steps=5", "--train.inject_nonfinite_at=[3]",
                    "--checkpoint.every=0", *setting)
        records = read_log(out)
        assert [(e["step"], e["micro_batches"], e["stepped"]) for e in events(records, "nonfinite")] == [(3, 1, True)]
        got = runs[name] = by_step(records)
        assert sorted(got) == [1, 2, 3, 4, 5]
        assert [got[s]["loss"] for s in (1, 2)] == pytest.approx([reference[s]["loss"] for s in (1, 2)], rel=1e-5)
        assert got[3]["samples_sha1"] == reference[3]["samples_sha1"]         # same data consumed ...
        assert got[3]["masked_tokens"] < reference[3]["masked_tokens"]         # ... but one micro-batch not trained on
        for counted in ("step_tokens", "step_flops"):                           # and not counted as trained on
            assert got[3][counted] < reference[3][counted] and got[2][counted] == reference[2][counted]
        assert got[4]["loss"] != pytest.approx(reference[4]["loss"], rel=1e-5)  # step 3 trained on less
    for name in ("zero2", "zero1"):
        for step in (3, 4, 5):
            assert runs[name][step]["loss"] == pytest.approx(runs["zero3"][step]["loss"], rel=1e-5)
            assert runs[name][step]["grad_norm"] == pytest.approx(runs["zero3"][step]["grad_norm"], rel=1e-4)
    assert got[4]["loss"] != reference[4]["loss"]                          # so the weights differ afterwards
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in got.values())


def test_a_nonfinite_first_micro_batch_is_dropped_and_the_optimizer_steps_with_the_step(pretrain_shards, straight_run,
                                                                                         tmp_path):
    """The step's first micro-batch dropped: its micro-step is made up before the next backward, so DeepSpeed's
    accumulation boundary stays the step's last micro-batch; the optimizer (and the LR schedule with it) steps
    once a step, as in the straight run, not one micro-batch late from then on."""
    reference, out = by_step(read_log(straight_run)), tmp_path / "run"
    run_trainer(pretrain_shards, out, "--train.max_steps=5", "--train.inject_nonfinite_at=[3]",
                "--train.inject_nonfinite_micro=0", "--checkpoint.every=0")
    records = read_log(out)
    assert [(e["step"], e["micro_batches"], e["stepped"]) for e in events(records, "nonfinite")] == [(3, 1, True)]
    got = by_step(records)
    assert sorted(got) == [1, 2, 3, 4, 5]
    assert [got[s]["lr"] for s in got] == pytest.approx([reference[s]["lr"] for s in got], rel=1e-6)
    assert got[3]["samples_sha1"] == reference[3]["samples_sha1"]
    assert 0 < got[3]["masked_tokens"] < reference[3]["masked_tokens"]
    assert got[4]["loss"] != pytest.approx(reference[4]["loss"], rel=1e-5)
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in got.values())


def test_a_run_on_another_world_size_converts_the_checkpoint_to_universal_and_resumes(pretrain_shards,
                                                                                      copy_of_straight_run):
    import psutil

    out = copy_of_straight_run
    proc = start_trainer(pretrain_shards, out, "--train.max_steps=14", nproc=1)

    def converters():
        found = []
        for c in psutil.Process(proc.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                if "ds_to_universal" in " ".join(c.cmdline()):
                    found.append(c)
        return found

    try:  # pretrain.sh's USR1s (every 20 s) reach the conversion too: it used to die of them, a refused start
        for c in wait_for(converters, 120, "the universal conversion", proc, poll=0.02):
            os.kill(c.pid, signal.SIGUSR1)
        assert proc.wait(timeout=240) == 0, (out.parent / f"{out.name}.stderr").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            signal_tree(proc, signal.SIGKILL)
    stderr = (out.parent / f"{out.name}.stderr").read_text()
    assert "was written by 2 ranks, this run has 1: converting" in stderr
    universal = tag_for(STRAIGHT_STEPS) + "_universal"
    assert (out / "checkpoints" / universal / "trainer_state.json").exists()
    assert (out / "checkpoints" / "latest_universal").read_text() == universal
    records = read_log(out)
    [conversion] = events(records, "universal_conversion")
    assert (conversion["tag"], conversion["saved_world_size"], conversion["world_size"]) == \
        (tag_for(STRAIGHT_STEPS), 2, 1)
    start = events(records, "start")[-1]
    assert start["resumed_from"] == universal and start["world_size"] == 1
    assert events(records, "config_changed")[-1]["changes"]["world_size"] == [2, 1]  # (tokens per step halved)
    assert "settings changed since (then, now): {" in stderr and "'world_size': (2, 1)" in stderr
    resumed = [r for r in step_lines(records) if r["step"] > STRAIGHT_STEPS]
    assert [r["step"] for r in resumed] == [13, 14]
    before = by_step(records)[STRAIGHT_STEPS]
    assert resumed[0]["tokens"] > before["tokens"] and resumed[0]["samples"] > before["samples"]
    assert resumed[0]["lr"] < before["lr"]  # the cosine schedule went on from step 12
    assert all(r["loss"] < 3.0 for r in resumed)  # trained weights, not a fresh model
    assert latest_tag(out / "checkpoints") == tag_for(14)

    # and back to 2 ranks: rank 1 waits for rank 0's conversion of the 1-rank checkpoint, which was converted by
    # hand before and damaged since (a node crash soon after, say): converted again
    subprocess.run([PY, "-m", "pretrain.convert", "--universal", str(out)], cwd=REPO, check=True,
                   capture_output=True)
    damaged = sorted((out / "checkpoints" / (tag_for(14) + "_universal")).rglob("fp32.pt"))[0]
    damaged.write_bytes(damaged.read_bytes()[:100])
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=15")
    assert f"{damaged}: damaged checkpoint file" in proc.stderr and f"converting {tag_for(14)} again" in proc.stderr
    records = read_log(out)
    assert events(records, "universal_conversion")[-1]["saved_world_size"] == 1
    assert events(records, "start")[-1]["resumed_from"] == tag_for(14) + "_universal"
    assert [r["step"] for r in step_lines(records) if r["step"] > 14] == [15]
    # no decay on biases, norms and beta after either resume (DeepSpeed's universal load gave them the matrices')
    assert [s["weight_decay"] for s in events(records, "start")] == [[0.01, 0.0]] * 3


def test_a_zero2_run_resumes_on_another_world_size_too(pretrain_shards, tmp_path):
    """DeepSpeed's universal conversion refused ZeRO-1/2 checkpoints ('Required universal_checkpoint_info state is
    missing'), so a zero2.json run could never change its number of ranks: the trainer now gives the engine that
    state to save."""
    out, zero2 = tmp_path / "run", "--train.ds_config=ds_configs/zero2.json"
    run_trainer(pretrain_shards, out, zero2, "--train.max_steps=4", "--checkpoint.every=4", "--train.valid_every=0")
    proc = run_trainer(pretrain_shards, out, zero2, "--train.max_steps=6", "--checkpoint.every=4",
                       "--train.valid_every=0", nproc=1)
    assert "was written by 2 ranks, this run has 1: converting" in proc.stderr
    records = read_log(out)
    start = events(records, "start")[-1]
    assert start["resumed_from"] == tag_for(4) + "_universal" and start["world_size"] == 1
    assert start["weight_decay"] == [0.01, 0.0]
    steps = by_step(records)
    assert [s for s in steps if s > 4] == [5, 6] and steps[5]["loss"] < steps[1]["loss"]  # trained weights


def test_loss_and_gradient_are_normalised_by_all_masked_tokens_of_the_step(pretrain_shards, tmp_path):
    """The engine's first step (2 ranks x 2 micro-batches, no dropout) against one process computing
    sum(CE over every masked token of the 4 micro-batches) / their count on the same initial weights."""
    import torch

    from pretrain.data import PretrainLoader
    from pretrain.train import masked_index, mlm_sums
    from rnalm.model import RiNALMo

    out = tmp_path / "run"
    run_trainer(pretrain_shards, out, "--train.max_steps=1", "--model.attn_dropout=0", "--model.residual_dropout=0",
                "--checkpoint.every=0", "--checkpoint.save_at_end=false")
    engine_step = step_lines(read_log(out))[0]
    cfg = load(PretrainConfig, out / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    model = RiNALMo(cfg.model.build()).train()
    micro = [b for rank in range(2) for b, _ in zip(PretrainLoader(cfg.data, rank=rank, world_size=2), range(2))]
    ce_sum, masked = 0.0, 0
    for b in micro:
        index = masked_index(b)
        ce, _ = mlm_sums(model.forward_packed(b, logits_index=index).logits, b.targets[index])
        ce_sum = ce_sum + ce
        masked += index.numel()
    loss = ce_sum / masked
    loss.backward()
    grad_norm = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).norm().item()
    assert masked == engine_step["masked_tokens"]
    assert engine_step["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert engine_step["grad_norm"] == pytest.approx(grad_norm, rel=1e-4)


@pytest.mark.parametrize("setting", ["train.ds_config=ds_configs/zero2.json",
                                     "train.ds_config=ds_configs/zero3_offload.json",
                                     "optim.adamw=deepspeed"])  # DeepSpeed's FusedAdam: its first use builds it
def test_other_deepspeed_configs_and_optimizers_train_the_same_steps(pretrain_shards, straight_run, tmp_path,
                                                                      setting):
    out = tmp_path / "run"
    run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}", "--train.stop_after=4",
                f"--{setting}", "--checkpoint.every=0", "--checkpoint.save_at_end=false")  # stop_after saves still
    records = read_log(out)
    assert events(records, "done")[0]["step"] == 4 and latest_tag(out / "checkpoints") == tag_for(4)  # stop_after
    reference = by_step(read_log(straight_run))
    assert sorted(by_step(records)) == [1, 2, 3, 4]
    for step, got in by_step(records).items():
        assert got["samples_sha1"] == reference[step]["samples_sha1"]
        assert got["loss"] == pytest.approx(reference[step]["loss"], rel=1e-5)
        assert got["grad_norm"] == pytest.approx(reference[step]["grad_norm"], rel=1e-4)


def test_bf16_with_activation_checkpointing_tracks_fp32(pretrain_shards, straight_run, tmp_path):
    out = tmp_path / "run"
    run_trainer(pretrain_shards, out, "--train.max_steps=6", "--train.precision=bf16",
                "--model.activation_checkpointing=true", "--checkpoint.every=0")
    assert events(read_log(out), "start")[0]["precision"] == "bf16"
    reference = by_step(read_log(straight_run))
    got = by_step(read_log(out))
    assert sorted(got) == list(range(1, 7))
    for step in got:
        assert got[step]["samples_sha1"] == reference[step]["samples_sha1"]
        assert got[step]["loss"] == pytest.approx(reference[step]["loss"], abs=0.05)
    assert got[6]["loss"] < got[1]["loss"] - 0.5


STOPPABLE = """
import json, os, sys
import psutil

def stoppable(pid):  # signals that neither are blocked nor ignored, from /proc
    with open(f"/proc/{pid}/status") as fh:
        fields = dict(line.split(":", 1) for line in fh)
    stopped = int(fields["SigBlk"], 16) | int(fields["SigIgn"], 16)
    return [sig for sig in range(1, 65) if not stopped >> (sig - 1) & 1]

def report(started):
    print(json.dumps({"rank": stoppable(os.getpid()),
                      "started": {f"{p.pid} {' '.join(p.cmdline())}": stoppable(p.pid) for p in started}}))
    sys.stdout.flush()
"""

MASKS_AFTER_FIRST_BATCH = STOPPABLE + """
from pretrain.data import DataConfig, PretrainLoader
from pretrain.train import _next_batch

batches = iter(PretrainLoader(DataConfig(shards=sys.argv[1], token_budget=1024, num_workers=2)))
_next_batch(batches)
report([p for p in psutil.Process().children() if "multiprocessing" in " ".join(p.cmdline())])
batches.close()
os._exit(0)
"""

MASKS_AFTER_COMPILE_WORKERS = STOPPABLE + """
import torch._inductor.async_compile as ac
from pretrain.train import _start_compile_workers

ac.has_triton_package = lambda: True  # inductor starts this pool for Triton kernels; this CPU has no Triton
_start_compile_workers()
ac.AsyncCompile.wait_pool_ready()
report(psutil.Process().children(recursive=True))
os._exit(0)
"""

MASKS_AFTER_ENGINE_START = STOPPABLE + """
import subprocess
import pretrain.train as train
from pretrain.config import PretrainConfig
from rnalm.configfile import from_cli

real_adamw, builds = train._adamw, []
def adamw_that_builds(*args):  # as FusedAdam's first use does: ninja, nvcc and g++ as child processes
    builds.append(subprocess.Popen(["sleep", "60"]))
    return real_adamw(*args)
train._adamw = adamw_that_builds
cfg = from_cli(PretrainConfig, ["--config", "pretrain/configs/tiny_cpu.yaml", f"--data.shards={sys.argv[1]}",
                                f"--train.out_dir={sys.argv[2]}", "--metrics.enabled=false"])
train.Trainer(cfg)
report([psutil.Process(p.pid) for p in builds])
os._exit(0)
"""

STOP = {int(signal.SIGTERM), int(signal.SIGUSR1)}


def _masks(script: str, *args: str, env: dict | None = None) -> dict:
    """Run `script` in a fresh interpreter: which signals can stop the rank and each process it started."""
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert STOP <= set(got["rank"])
    for cmd, stoppable in got["started"].items():
        assert not STOP & set(stoppable), cmd
    return got


def test_workers_start_immune_to_the_stop_signals_and_the_rank_keeps_them(pretrain_shards):
    """Slurm sends SIGTERM/SIGUSR1 to every process of a job: a worker killed by one would crash the rank before
    it saves (torch's SIGCHLD handler raises in the rank). The workers (and multiprocessing's resource tracker)
    that the trainer's first next() starts have them blocked or ignored; the rank itself keeps receiving them.
    A fresh interpreter: the tracker must be started by _next_batch, not by an earlier test."""
    got = _masks(MASKS_AFTER_FIRST_BATCH, str(pretrain_shards))
    assert len(got["started"]) >= 3, got            # 2 workers, the resource tracker
    assert sum("resource_tracker" in cmd for cmd in got["started"]) == 1, got


def test_processes_of_the_engine_start_are_immune_to_the_stop_signals(pretrain_shards, tmp_path):
    """optim.adamw=deepspeed builds FusedAdam's op at its first use in ninja/nvcc/g++ processes, after the trainer
    has installed its USR1 handler (reset to the default action in a child that execs): a USR1 forwarded by
    pretrain.sh during the build killed it, and the rank exited 1, not requeued. The optimizer and
    deepspeed.initialize now run with the stop signals blocked; the rank keeps receiving them."""
    got = _masks(MASKS_AFTER_ENGINE_START, str(pretrain_shards), str(tmp_path / "run"))
    assert len(got["started"]) == 1 and "sleep 60" in next(iter(got["started"])), got


def test_compile_workers_start_immune_to_the_stop_signals():
    """With model.compile on a GPU, inductor compiles Triton kernels in a sidecar process and its worker pool;
    a forwarded USR1 used to kill them (default action), and the next compile (e.g. the first validation's) hung.
    The trainer starts them up front with the stop signals blocked; the rank keeps receiving them."""
    env = {**os.environ, "TORCHINDUCTOR_COMPILE_THREADS": "2"}
    got = _masks(MASKS_AFTER_COMPILE_WORKERS, env=env)
    assert len(got["started"]) == 3, got             # the sidecar and its 2 workers (forked: same command)
    assert all("compile_worker" in cmd for cmd in got["started"]), got


def test_an_attention_dropout_the_kernel_cannot_apply_is_said_at_start():
    """On GPUs without flash-attn, torch's varlen kernel trains without the recipe's attention dropout 0.1: said only
    in the start event of log.jsonl, which nobody reads before the run has gone on for days."""
    from pretrain.train import attention_dropout_note

    note = attention_dropout_note("torch_varlen", 0.1)
    assert note.startswith("warning: model.attn_dropout=0.1 is not applied: the torch_varlen attention kernel")
    assert "--model.attn_dropout=0" in note
    assert attention_dropout_note("torch_varlen", 0.0) is None
    assert not any(attention_dropout_note(backend, 0.1) for backend in ("flash_attn", "torch_flash", "sdpa"))
