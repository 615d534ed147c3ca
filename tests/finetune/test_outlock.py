"""finetune.outlock: OUT held for a moment or a whole run, families claimed, a several-family run's settings."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest

from finetune import outlock
from rnalm.runlock import LOCK_NAME, RunLock, RunLockError
from tests.pretrain.test_runlock import dead_pid, holder


def test_held_waits_out_another_process_moment_but_not_a_whole_run(tmp_path, monkeypatch):
    monkeypatch.setattr(outlock, "MOMENT_WAIT_S", 5.0)
    moment = RunLock(tmp_path)
    moment.acquire()
    threading.Timer(0.5, moment.release).start()
    with outlock.held(tmp_path):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / LOCK_NAME).exists()
    monkeypatch.setattr(outlock, "MOMENT_WAIT_S", 0.5)
    with RunLock(tmp_path):
        started = time.monotonic()
        with pytest.raises(RunLockError, match="in use by another run"), outlock.held(tmp_path):
            pass
        assert 0.5 <= time.monotonic() - started < 5


def test_busy_families_are_those_a_live_run_trains_and_a_gone_holders_lock_is_cleared(tmp_path):
    (tmp_path / "5s").mkdir()
    holder(tmp_path / "5s", pid=dead_pid())
    with RunLock(tmp_path / "srp"), RunLock(tmp_path / "tRNA"):
        assert outlock.busy_families(tmp_path) == ["srp", "tRNA"]
        with pytest.raises(RunLockError, match=r"families srp, tRNA in training"), outlock.single_run(tmp_path):
            pass
    assert not (tmp_path / "5s" / LOCK_NAME).exists()
    with outlock.single_run(tmp_path):
        assert (tmp_path / LOCK_NAME).exists()


def test_claim_out_keeps_the_same_settings_and_refuses_other_settings_only_while_they_train(tmp_path):
    ours = {"train": {"seed": 0, "lr": 1e-3}, "data": "archiveii", "model": {"path": "m"}}
    theirs = {"train": {"seed": 7, "lr": 1e-3}, "model": {"path": "m"}}
    outlock.claim_out(tmp_path, ours)
    path = tmp_path / outlock.FOLDS_FILE
    written = path.stat().st_mtime_ns
    outlock.claim_out(tmp_path, json.loads(path.read_text()))
    assert path.stat().st_mtime_ns == written                        # the same run's next process: left as it is
    with RunLock(tmp_path / "srp"):
        with pytest.raises(RunLockError, match=r"other settings \(data: 'archiveii' -> None; train.seed: 0 -> 7\)"):
            outlock.claim_out(tmp_path, theirs)
    outlock.claim_out(tmp_path, theirs)                              # that run stopped: OUT is this one's
    assert json.loads(path.read_text()) == theirs
