"""Helpers for the trainer tests: launch real 2-rank torchrun runs of pretrain.train and read their logs.

Every run is real DeepSpeed ZeRO-3 on gloo with the tiny model of pretrain/configs/tiny_cpu.yaml.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.deploy.daemons import read_jsonl

REPO = Path(__file__).resolve().parents[2]
PY = sys.executable
TORCHRUN = str(Path(PY).with_name("torchrun"))

# The run every trainer test compares against: 12 optimizer steps of 2 micro-batches on each of 2 ranks.
STRAIGHT_STEPS = 12
BASE_OVERRIDES = ("--data.token_budget=1024", "--data.num_workers=1", "--train.grad_accum=2", "--optim.warmup_steps=3",
                  "--optim.decay_steps=20", "--train.valid_every=0", "--train.valid_max_records=150",
                  "--train.log_every=4", "--checkpoint.every=4", "--checkpoint.keep=2")


def trainer_env() -> dict[str, str]:
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def trainer_cmd(shards: Path, out_dir: Path, *overrides: str, nproc: int = 2) -> list[str]:
    return [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", "-m", "pretrain.train",
            "--config", "pretrain/configs/tiny_cpu.yaml", f"--data.shards={shards}", f"--train.out_dir={out_dir}",
            *BASE_OVERRIDES, *overrides]


def run_trainer(shards: Path, out_dir: Path, *overrides: str, nproc: int = 2, timeout: float = 240,
                expect_rc: int | None = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(trainer_cmd(shards, out_dir, *overrides, nproc=nproc), cwd=REPO, env=trainer_env(),
                          capture_output=True, text=True, timeout=timeout)
    if expect_rc is not None and proc.returncode != expect_rc:
        raise AssertionError(f"trainer exit {proc.returncode} (want {expect_rc}):\n{proc.stderr[-6000:]}")
    return proc


def start_trainer(shards: Path, out_dir: Path, *overrides: str, nproc: int = 2) -> subprocess.Popen:
    """In the background, in its own process group (so a test can signal or kill all of it)."""
    log = open(out_dir.parent / f"{out_dir.name}.stderr", "w")
    return subprocess.Popen(trainer_cmd(shards, out_dir, *overrides, nproc=nproc), cwd=REPO, env=trainer_env(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def signal_tree(proc: subprocess.Popen, sig: int, workers_only: bool = False) -> list[int]:
    """Send `sig` to every process below torchrun (ranks, their DataLoader workers; torchrun starts the ranks
    in their own sessions) and, unless workers_only, to torchrun itself; returns their pids."""
    import psutil  # installed with deepspeed

    workers = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    for pid in workers + ([] if workers_only else [proc.pid]):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    return workers


def read_log(out_dir: Path) -> list[dict]:
    path = out_dir / "log.jsonl"
    if not path.exists():
        return []
    return read_jsonl(path)


def step_lines(records: list[dict]) -> list[dict]:
    return [r for r in records if "event" not in r]


def events(records: list[dict], name: str) -> list[dict]:
    return [r for r in records if r.get("event") == name]


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"trainer exited ({proc.returncode}) before: {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


