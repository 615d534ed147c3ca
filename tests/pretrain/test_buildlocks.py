"""Stale torch-extension build locks: removed at start-up instead of hanging the trainer forever."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pretrain.buildlocks import StaleBuildLockWatch, extensions_root, remove_stale

from .trainer_runs import run_trainer


def plant(root: Path, op: str, age_s: float) -> Path:
    lock = root / op / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    then = time.time() - age_s
    os.utime(lock, (then, then))
    return lock


def test_only_locks_of_the_trainers_ops_older_than_any_build_are_removed(tmp_path, capsys):
    stale, building = plant(tmp_path, "deepspeed_shm_comm", 3600), plant(tmp_path, "fused_adam", 30)
    other = plant(tmp_path, "someone_elses_cuda_op", 3600)         # another project's build may take that long
    assert remove_stale(tmp_path, stale_s=600) == [stale]
    assert not stale.exists() and building.exists() and other.exists()
    assert (tmp_path / "deepspeed_shm_comm").is_dir()
    assert f"removed {stale}: a torch extension build lock 3600 s old" in capsys.readouterr().err


def test_a_stale_fused_adam_lock_is_removed_while_the_other_ops_has_none(tmp_path):
    """optim.adamw=deepspeed builds FusedAdam under the same kind of lock; a missing lock of another op is no error."""
    lock = plant(tmp_path, "fused_adam", 700)  # just past stale_s
    assert remove_stale(tmp_path, stale_s=600) == [lock]
    assert not lock.exists()


def test_the_watch_removes_a_lock_once_it_turns_stale_and_outlasts_a_file_system_hiccup(tmp_path, monkeypatch):
    import pretrain.buildlocks as buildlocks

    real, calls = buildlocks.remove_stale, []

    def hiccup_first(root, stale_s):
        calls.append(root)
        if len(calls) == 1:
            raise OSError("Stale file handle")
        return real(root, stale_s)

    monkeypatch.setattr(buildlocks, "remove_stale", hiccup_first)
    lock = plant(tmp_path, "deepspeed_shm_comm", 0)
    watch = StaleBuildLockWatch(tmp_path, stale_s=0.5, poll_s=0.05).start()
    deadline = time.monotonic() + 3  # stale after 0.5 s, polled every 0.05 s
    while lock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.stop()
    assert not lock.exists()


def test_the_root_is_torchs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert extensions_root() == tmp_path / "ext"


@pytest.mark.slow
def test_a_lock_left_by_a_killed_build_does_not_hang_the_trainer(pretrain_shards, tmp_path):
    """DeepSpeed builds its CPU comm op under <extensions>/deepspeed_shm_comm/lock at init_distributed; a start
    killed during that build left the lock, and every later start waited on it, silently, forever."""
    root = extensions_root()
    lock = plant(root, "deepspeed_shm_comm", 3600)
    planted = lock.stat().st_mtime
    try:
        proc = run_trainer(pretrain_shards, tmp_path / "run", "--train.max_steps=1", "--checkpoint.every=0",
                           nproc=1, timeout=300)
    finally:
        if lock.exists() and lock.stat().st_mtime == planted:  # ours still (not a build's of another session)
            lock.unlink()
    assert f"removed {lock}" in proc.stderr
