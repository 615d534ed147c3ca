"""`sbatch deploy/slurm/pretrain.sh` on a real single-node Slurm: 2 CPU ranks of the tiny config run to
COMPLETED with a checkpoint while a real Prometheus finds them through the job's file_sd file; a job signalled
mid-run (USR1 to the batch shell, as Slurm does before the time limit) checkpoints, requeues itself and the
rerun resumes and finishes with exactly the per-step sample stream and losses of the uninterrupted run."""
from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.deploy.daemons import (REPO, SlurmCluster, free_port, read_jsonl, require_tools, start_prometheus,
                                  value, wait_until)

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(300)]

STEPS = 60
TRAIN_ARGS = ("--train.valid_every=0", "--checkpoint.every=20", "--train.log_every=20")


def submit(slurm: SlurmCluster, shards: Path, run: Path, *overrides: str, config="pretrain/configs/tiny_cpu.yaml",
           sbatch_args: tuple[str, ...] = (), sd_dir: Path | None = None, python: str = sys.executable,
           env: dict[str, str] | None = None):
    """CPU mode: no GPUs, 2 tasks of 1 CPU on one node; everything else is the script's defaults. The file_sd
    target file goes to ``sd_dir`` (default run/targets)."""
    run.mkdir(parents=True, exist_ok=True)
    return slurm.sbatch(
        "--gpus-per-node=0", "--ntasks-per-node=2", "--cpus-per-task=1", "--job-name=rnalm-test", *sbatch_args,
        f"--output={run}/slurm-%j.out", str(REPO / "deploy/slurm/pretrain.sh"), config,
        f"--data.shards={shards}", f"--train.out_dir={run / 'out'}", f"--train.max_steps={STEPS}", *TRAIN_ARGS,
        f"--metrics.port_base={free_port(2)}", *overrides,
        env={"RNALM_PROM_SD_DIR": str(sd_dir or run / "targets"), "RNALM_PYTHON": python, **(env or {})}, cwd=REPO)


def steps(log: list[dict]) -> list[dict]:
    return [r for r in log if "event" not in r]


def events(log: list[dict], name: str) -> list[dict]:
    return [r for r in log if r.get("event") == name]


def batch_output(run: Path, job_id: str) -> str:
    return (run / f"slurm-{job_id}.out").read_text(errors="replace")


@dataclass
class Run:
    job_id: str
    dir: Path
    info: dict[str, str]
    up: list[dict] = field(default_factory=list)
    tokens: list[dict] = field(default_factory=list)
    targets_after_end: list[dict] = field(default_factory=list)
    target_files_after_end: list[str] = field(default_factory=list)

    @property
    def log(self) -> list[dict]:
        return read_jsonl(self.dir / "out" / "log.jsonl")


@pytest.fixture(scope="module")
def straight_run(slurm, synthetic_shards, tmp_path_factory) -> Run:
    """The uninterrupted reference job, watched by a real Prometheus through the job's file_sd directory."""
    require_tools("prometheus")
    run = tmp_path_factory.mktemp("straight")
    prom = start_prometheus(run / "prometheus")
    # Left behind by a job that no longer exists (SIGKILL, node crash): the next job removes it.
    (prom.targets_dir / "rnalm-987654.json").write_text('[{"targets": ["127.0.0.1:1"], "labels": {}}]')
    try:
        job_id = submit(slurm, synthetic_shards, run, sd_dir=prom.targets_dir)
        sel = f'slurm_job_id="{job_id}"'
        up = prom.wait_for(f'up{{{sel}}} == 1', timeout=90, what="the job's ranks as Prometheus targets")
        wait_until(lambda: len(prom.query(f'up{{{sel}}} == 1')) == 2, 30, what="both ranks scraped")
        tokens = prom.wait_for(f'rnalm_train_tokens_total{{{sel}}} > 0', timeout=60)
        up = prom.query(f'up{{{sel}}}')
        info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
        # The job removed its target file, so Prometheus drops the targets.
        wait_until(lambda: not prom.active_targets("rnalm_train"), 30, what="targets gone after the job")
        return Run(job_id, run, info, up=up, tokens=tokens, targets_after_end=prom.active_targets("rnalm_train"),
                   target_files_after_end=sorted(p.name for p in prom.targets_dir.iterdir()))
    finally:
        prom.stop()


def test_sbatch_pretrain_completes_with_checkpoint(straight_run):
    r = straight_run
    out = batch_output(r.dir, r.job_id)
    assert r.info["JobState"] == "COMPLETED" and r.info["ExitCode"] == "0:0", (r.info, out[-3000:])
    log = r.log
    assert events(log, "start")[0]["world_size"] == 2
    assert events(log, "done") == [events(log, "done")[0]] and events(log, "done")[0]["step"] == STEPS
    assert [s["step"] for s in steps(log)] == list(range(1, STEPS + 1))
    ckpts = r.dir / "out" / "checkpoints"
    latest = (ckpts / "latest").read_text().strip()
    assert latest == events(log, "checkpoint")[-1]["tag"] and events(log, "checkpoint")[-1]["step"] == STEPS
    assert any((ckpts / latest).iterdir())
    assert "2 ranks" in out and "CPU mode" in out and "exit code 0" in out
    assert r.target_files_after_end == [], "target file left behind (or the stale one not removed)"


def test_prometheus_finds_the_job_through_file_sd(straight_run):
    r = straight_run
    ranks = sorted((s["metric"]["rank"], s["metric"]["local_rank"]) for s in r.up)
    assert ranks == [("0", "0"), ("1", "1")]
    assert len({s["metric"]["node"] for s in r.up}) == 1 and r.up[0]["metric"]["node"] in ("node1", "node2")
    assert all(s["metric"]["slurm_job_name"] == "rnalm-test" for s in r.up)
    assert r.tokens and all(value(s) > 0 for s in r.tokens)
    assert r.targets_after_end == []


def test_preempted_job_requeues_and_resumes_the_same_stream(slurm, synthetic_shards, straight_run, tmp_path):
    job_id = submit(slurm, synthetic_shards, tmp_path)
    log_path = tmp_path / "out" / "log.jsonl"

    def past_step_15():
        return log_path.exists() and any(s["step"] >= 15 for s in steps(read_jsonl(log_path)))

    wait_until(past_step_15, 120, interval=0.2, what="step 15 of the job")
    slurm.cmd("scancel", "--batch", "--signal=USR1", job_id)   # what --signal=B:USR1@300 delivers
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
    out = batch_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-3000:])
    assert info["Restarts"] == "1", info
    assert "requeueing job" in out and "restart 1" in out

    log = read_jsonl(log_path)
    (preempted,) = events(log, "preempted")
    starts = events(log, "start")
    assert len(starts) == 2 and starts[1]["step"] == preempted["step"] >= 15
    assert starts[1]["resumed_from"] == next(e["tag"] for e in events(log, "checkpoint")
                                             if e["step"] == preempted["step"])
    assert events(log, "done")[0]["step"] == STEPS
    got, want = steps(log), steps(straight_run.log)
    assert [s["step"] for s in got] == list(range(1, STEPS + 1))
    assert [s["samples_sha1"] for s in got] == [s["samples_sha1"] for s in want]
    assert [s["loss"] for s in got] == [s["loss"] for s in want]
    assert not list((tmp_path / "targets").glob("*.json"))


def test_two_node_job_matches_the_single_node_run(slurm, synthetic_shards, straight_run, tmp_path):
    """`sbatch --nodes=2` without edits: one rank on each of two slurmd nodes, rendezvous at the first node's
    address; same world size, so the same sample stream and losses as 2 ranks on one node. (Metrics are off:
    both "nodes" are this machine, so local rank 0 of each would want the same port.)"""
    job_id = submit(slurm, synthetic_shards, tmp_path, "--metrics.enabled", "False",   # the "--key value" form
                    sbatch_args=("--nodes=2", "--ntasks-per-node=1"))
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
    out = batch_output(tmp_path, job_id)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out[-3000:])
    assert "2 node(s) [node1 node2], 2 ranks" in out and "master 127.0.0.1:" in out
    assert "no Prometheus targets (metrics.enabled=false" in out
    log = read_jsonl(tmp_path / "out" / "log.jsonl")
    assert events(log, "start")[0]["world_size"] == 2 and events(log, "done")[0]["step"] == STEPS
    got, want = steps(log), steps(straight_run.log)
    assert [s["samples_sha1"] for s in got] == [s["samples_sha1"] for s in want]
    assert [s["loss"] for s in got] == [s["loss"] for s in want]


def test_failing_ranks_fail_the_job_without_requeue(slurm, synthetic_shards, tmp_path):
    """A run that stops on its own error (here: the trainer's non-finite-loss stop, exit code 3, via its fault
    injection) is not requeued: the job FAILS with the trainer's exit code and its target file stays, so that
    RnalmRankDown pages (removed, a crashed or aborted job ended without a sound)."""
    job_id = submit(slurm, synthetic_shards, tmp_path, "--train.inject_nonfinite_at=[5]",
                    "--train.max_nonfinite_in_row=1", "--metrics.final_scrape_s=2")
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
    out = batch_output(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "3:0", (info, out[-3000:])
    assert info["Restarts"] == "0" and "requeueing" not in out
    assert "training step ended with exit code 3" in out
    assert events(read_jsonl(tmp_path / "out" / "log.jsonl"), "stopped_nonfinite")
    assert [p.name for p in (tmp_path / "targets").glob("*.json")] == [f"rnalm-{job_id}.json"]
    assert "RnalmRankDown pages" in out


def test_missing_config_fails_the_job_with_a_clear_message(slurm, synthetic_shards, tmp_path):
    job_id = submit(slurm, synthetic_shards, tmp_path, config="pretrain/configs/no_such.yaml")
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert info["JobState"] == "FAILED"
    assert "config file pretrain/configs/no_such.yaml not found" in batch_output(tmp_path, job_id)


@pytest.mark.timeout(420)
def test_time_limit_signal_from_slurm_requeues_and_resumes(slurm, synthetic_shards, tmp_path):
    """Slurm itself sends USR1 before the time limit (--signal=B:USR1@30 with --time=2); the job checkpoints,
    requeues and the rerun resumes. Slurm may send the signal up to 60 s early (its event resolution; with
    --time=1 and @40 it once came 2 s after the start, before the trainer ran), so the limit leaves >= 30 s
    for the first run to start. The rerun would be signalled again, so the test cancels it once it has resumed.
    RNALM_MIN_RUN_S=30: a 2-minute limit is one that requeues (by default a run needs 10 min before the signal)."""
    job_id = submit(slurm, synthetic_shards, tmp_path, "--train.max_steps=100000", "--checkpoint.every=0",
                    sbatch_args=("--time=2", "--signal=B:USR1@30"), env={"RNALM_MIN_RUN_S": "30"})
    log_path = tmp_path / "out" / "log.jsonl"

    def resumed():
        return log_path.exists() and len(events(read_jsonl(log_path), "start")) == 2

    try:
        wait_until(resumed, 240, interval=1, what="the requeued run to start")
    finally:
        slurm.cmd("scancel", job_id)
        wait_until(lambda: not slurm.cmd("squeue", "-h", "-j", job_id, check=False).strip(), 60,
                   what=f"cancelled job {job_id} to leave the queue")
    log = read_jsonl(log_path)
    (preempted,) = events(log, "preempted")[:1]
    assert preempted["step"] > 0
    assert events(log, "start")[1]["resumed_from"] == events(log, "checkpoint")[0]["tag"]
    assert events(log, "start")[1]["step"] == preempted["step"]
    assert slurm.job(job_id)["Restarts"] == "1"


@pytest.mark.timeout(360)
def test_a_time_limit_within_the_signal_lead_ends_the_job_instead_of_requeueing_it(slurm, synthetic_shards,
                                                                                   tmp_path):
    """An operator review on a local Slurm: with --time within the --signal lead (plus a start-up), each run was
    signalled soon after its start, saved and requeued (7 restarts before it was cancelled). Now the first run
    saves on the signal and the job ends, saying why."""
    job_id = submit(slurm, synthetic_shards, tmp_path, "--train.max_steps=100000", "--checkpoint.every=0",
                    sbatch_args=("--time=2", "--signal=B:USR1@30"))
    info = slurm.wait_state(job_id, {"FAILED", "COMPLETED", "CANCELLED", "TIMEOUT"}, timeout=300)
    out = batch_output(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "0", out[-3000:]
    assert "not requeued: the time limit's signal came" in out
    assert events(read_jsonl(tmp_path / "out" / "log.jsonl"), "preempted")  # the run's progress is saved


def _cancelled_stand_in_job(slurm, tmp_path, on_term: str, targets_seen: list | None = None) -> tuple[dict, str]:
    """Submit pretrain.sh with stand-in ranks that run `on_term` on SIGTERM, scancel it once both are up (the
    target files then in `targets_seen`, as job id and file names); returns the job's final state and output."""
    python = tmp_path / "python"
    python.write_text("#!/bin/bash\n"
                      "if [ \"$1 $2\" = '-m pretrain.train' ]; then\n"
                      f"  trap {shlex.quote(on_term)} TERM\n"
                      "  echo \"rank $RANK up\"; for _ in $(seq 120); do sleep 1; done; exit 1\n"
                      f"fi\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    job_id = submit(slurm, tmp_path / "shards", tmp_path, python=str(python))
    out = tmp_path / f"slurm-{job_id}.out"
    wait_until(lambda: out.exists() and "rank 1 up" in out.read_text(), 60, what="both stand-in ranks")
    if targets_seen is not None:
        targets_seen += [job_id, *(p.name for p in (tmp_path / "targets").iterdir())]
    slurm.cmd("scancel", job_id)
    info = slurm.wait_state(job_id, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=60)
    wait_until(lambda: not slurm.cmd("squeue", "-h", "-j", job_id, check=False).strip(), 60,
               what=f"job {job_id} to leave the queue")
    return info, out.read_text()


def test_a_plain_scancel_leaves_the_ranks_killwait_to_save(slurm, tmp_path):
    """srun gets scancel's SIGTERM too and says 'forcing job termination' (its source forwards SIGKILL), but the
    ranks keep the KillWait (10 s here) to finish their save, as docs/cluster.md says; and the job is not
    requeued. The ranks are a stand-in whose save on SIGTERM takes 4 s."""
    info, text = _cancelled_stand_in_job(slurm, tmp_path, 'sleep 4; echo "rank $RANK saved"; exit 0')
    assert info["JobState"] == "CANCELLED" and "rank 0 saved" in text and "rank 1 saved" in text, text[-2000:]
    assert "requeueing" not in text and info.get("Restarts", "0") == "0"


def test_cancelled_job_whose_save_outlasts_killwait_leaves_no_targets(slurm, tmp_path):
    """scancel (like preemption or the time limit) sends SIGTERM, and SIGKILL after KillWait (10 s here), to the
    batch shell too: when the ranks' save outlasts KillWait the shell never reaches its EXIT trap, and its target
    file must be gone anyway, or Prometheus keeps scraping the dead ranks (RnalmRankDown pages for a job that is
    gone) until another job happens to clean up. The ranks are a stand-in that ignores SIGTERM, as a rank still
    writing its last checkpoint does."""
    seen: list[str] = []
    info, text = _cancelled_stand_in_job(slurm, tmp_path, "", targets_seen=seen)
    assert seen[1:] == [f"rnalm-{seen[0]}.json"] and info["JobState"] == "CANCELLED", info
    assert "SIGTERM" in text
    assert not list((tmp_path / "targets").glob("*.json")), text[-2000:]


def test_target_rank_labels_follow_the_jobs_cyclic_distribution(slurm, tmp_path):
    """Under `sbatch --distribution=cyclic` srun deals the ranks out round the nodes (4 ranks on 2 nodes: node1
    gets ranks 0 and 2), and each target's rank label must be the rank that really serves there, or an alert
    names the wrong rank. Stand-in ranks report where srun put them and wait until the targets are read."""
    go = tmp_path / "go"
    python = tmp_path / "python"
    python.write_text("#!/bin/bash\n"
                      "if [ \"$1 $2\" = '-m pretrain.train' ]; then\n"
                      "  echo \"placed $RANK $LOCAL_RANK $SLURMD_NODENAME\"\n"
                      f"  for _ in $(seq 60); do [ -e {go} ] && exit 0; sleep 0.5; done; exit 1\n"
                      f"fi\nexec {sys.executable} \"$@\"\n")
    python.chmod(0o755)
    job_id = submit(slurm, tmp_path / "shards", tmp_path, python=str(python),
                    sbatch_args=("--nodes=2", "--distribution=cyclic"))
    out = tmp_path / f"slurm-{job_id}.out"
    try:
        wait_until(lambda: out.exists() and out.read_text().count("placed ") == 4, 60, what="4 stand-in ranks")
        placed = {int(r): (node, int(local)) for line in out.read_text().splitlines() if "placed " in line
                  for r, local, node in [line.split("placed ", 1)[1].split()]}
        groups = json.loads((tmp_path / "targets" / f"rnalm-{job_id}.json").read_text())
    finally:
        go.touch()
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    labelled = {int(g["labels"]["rank"]): (g["labels"]["node"], int(g["labels"]["local_rank"])) for g in groups}
    assert placed[2] == ("node1", 1), placed   # cyclic, not block (which puts rank 2 on node2)
    assert labelled == placed and info["JobState"] == "COMPLETED", (labelled, placed, info)
    ports = {int(g["labels"]["rank"]): int(g["targets"][0].rsplit(":", 1)[1]) for g in groups}
    assert ports[2] - ports[0] == 1 == ports[3] - ports[1] and ports[1] == ports[0], ports   # port_base + local rank


def test_an_ntasks_below_the_allocations_task_slots_is_refused_before_srun(slurm, tmp_path):
    """`--nodes=2 --ntasks-per-node=2 --ntasks=3`: Slurm 22.05 gives the job SLURM_TASKS_PER_NODE=2(x2) with
    SLURM_NTASKS=3, and srun lays the 3 ranks out by its own rules: the targets named a rank 3 that never ran."""
    job_id = submit(slurm, tmp_path / "shards", tmp_path, sbatch_args=("--nodes=2", "--ntasks=3"))
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    text = batch_output(tmp_path, job_id)
    assert info["JobState"] == "FAILED" and "the job has 3 tasks but tasks per node 2(x2) (4 task slots)" in text, text
    assert not (tmp_path / "out" / "log.jsonl").exists() and not list((tmp_path / "targets").glob("*.json"))
