"""One run per out_dir: rnalm.runlock, and the trainer refusing an out_dir another live run holds."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rnalm import runlock
from rnalm.runlock import LOCK_NAME, RunLock, RunLockError

from .trainer_runs import run_trainer


def holder(tmp_path, **fields) -> dict:
    lock = {"host": socket.gethostname(), "pid": os.getpid(), "pid_space": runlock._pid_space(), "slurm_job_id": "",
            "slurm_restart": "0", "started": "earlier", **fields}
    (tmp_path / LOCK_NAME).write_text(json.dumps(lock))
    return lock


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_acquire_writes_who_holds_it_and_release_removes_it(tmp_path):
    lock = RunLock(tmp_path / "run")
    assert lock.acquire() is None
    held = json.loads((tmp_path / "run" / LOCK_NAME).read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    lock.release()
    assert not (tmp_path / "run" / LOCK_NAME).exists()


def test_a_live_holder_is_refused_and_named(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder(tmp_path, slurm_job_id="777")                        # this very process: alive
    with pytest.raises(RunLockError, match=rf"in use by another run: pid {os.getpid()} .*Slurm job 777"):
        RunLock(tmp_path).acquire()
    holder(tmp_path, host="elsewhere", pid=1)                    # another node, fresh heartbeat
    with pytest.raises(RunLockError, match="on elsewhere"):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == "elsewhere"  # left as it was


def test_another_job_step_of_the_same_slurm_job_is_refused(tmp_path, monkeypatch):
    # two sruns into one out_dir in one allocation share SLURM_JOB_ID and SLURM_RESTART_COUNT: not a requeue
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunLockError, match=rf"in use by another run: pid {os.getpid()} .*Slurm job 42"):
        RunLock(tmp_path).acquire()
    first.release()


def test_a_lock_not_written_yet_is_refused(tmp_path, monkeypatch):
    # two runs starting at once: the second finds the first's lock created (O_EXCL) but still empty
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    (tmp_path / LOCK_NAME).write_text("")
    with pytest.raises(RunLockError, match="in use by another run: a run whose lock is not written yet"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text() == ""


@pytest.mark.parametrize("case", ["requeued", "dead_process", "stale_node", "damaged"])
def test_a_gone_holder_is_taken_over(tmp_path, monkeypatch, case):
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    if case == "requeued":
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
        holder(tmp_path, slurm_job_id="42")                      # alive by its pid, but it is this job's own
    elif case == "dead_process":
        holder(tmp_path, pid=dead_pid())
    elif case == "stale_node":
        holder(tmp_path, host="elsewhere", pid=1)
        old = time.time() - runlock.STALE_S - 5
        os.utime(tmp_path / LOCK_NAME, (old, old))
    else:
        (tmp_path / LOCK_NAME).write_text('{"host": ')           # a crash while the lock was written
        old = time.time() - runlock.STALE_S - 5
        os.utime(tmp_path / LOCK_NAME, (old, old))
    lock = RunLock(tmp_path)
    assert lock.acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["slurm_job_id"] == "42"
    lock.release()


def test_of_two_runs_taking_over_one_gone_holder_only_one_holds_it(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder(tmp_path, host="elsewhere", pid=1)
    old = time.time() - runlock.STALE_S - 5
    os.utime(tmp_path / LOCK_NAME, (old, old))
    other, judge = RunLock(tmp_path), runlock.holder_gone

    def other_run_takes_over_first(*args):  # between this run's reading of the lock and its taking it over
        monkeypatch.setattr(runlock, "holder_gone", judge)
        assert other.acquire() == "no heartbeat for 185 s"
        return judge(*args)

    monkeypatch.setattr(runlock, "holder_gone", other_run_takes_over_first)
    with pytest.raises(RunLockError, match=rf"in use by another run: pid {os.getpid()} "):
        RunLock(tmp_path).acquire()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["host"] == socket.gethostname()  # the other run's
    other.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_of_three_runs_taking_over_one_gone_holder_only_one_holds_it(tmp_path, monkeypatch):
    """Run A reads the gone holder's lock, run B takes it over, and a run C starts while A checks whether the lock
    is still the gone one: A used to move the lock aside to compare it and put B's back over the one C had just
    created, and B and C both ran in one directory."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    holder(tmp_path, host="elsewhere", pid=1)
    old = time.time() - runlock.STALE_S - 5
    os.utime(tmp_path / LOCK_NAME, (old, old))
    a, b, c, judge, rename = RunLock(tmp_path), RunLock(tmp_path), RunLock(tmp_path), runlock.holder_gone, os.rename
    outcome: dict[str, str] = {}

    def attempt(name: str, lock: RunLock) -> None:
        try:
            outcome[name] = lock.acquire() or "held"
        except RunLockError:
            outcome[name] = "refused"

    def b_takes_over_first(*args):  # between A's reading of the lock and its taking it over
        monkeypatch.setattr(runlock, "holder_gone", judge)
        attempt("B", b)
        return judge(*args)

    def c_starts(*args):  # once B holds the lock, C starts as A moves the lock or reads it again to check it
        if "B" in outcome and "C" not in outcome:
            outcome["C"] = "starting"
            attempt("C", c)

    def renaming(src, dst):
        rename(src, dst)
        c_starts()

    def reading(path, *args, **kwargs):
        text = read_text(path, *args, **kwargs)
        if path == tmp_path / LOCK_NAME:
            c_starts()
        return text

    read_text = Path.read_text
    monkeypatch.setattr(runlock, "holder_gone", b_takes_over_first)
    monkeypatch.setattr(runlock.os, "rename", renaming)
    monkeypatch.setattr(Path, "read_text", reading)
    attempt("A", a)
    monkeypatch.setattr(Path, "read_text", read_text)
    monkeypatch.setattr(runlock.os, "rename", rename)
    assert "C" in outcome   # C started inside A's takeover
    assert outcome == {"B": "no heartbeat for 185 s", "A": "refused", "C": "refused"}, outcome
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == b._mine
    for lock in (a, b, c):
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists() and os.listdir(tmp_path) == []


def test_a_takeover_guard_left_by_a_crashed_run_is_removed_after_it_was_seen_unchanged_a_while(tmp_path,
                                                                                                 monkeypatch):
    """Judged by how long this process saw it, not by its mtime: a file server's clock 11 s behind this node's made
    a guard taken a moment ago look 11 s old, and two runs took the lock over."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(runlock, "GUARD_STALE_S", 0.5)
    holder(tmp_path, pid=dead_pid())
    guard = tmp_path / f".{LOCK_NAME}.takeover"
    guard.touch()                                      # a run that crashed while taking over, a day ago
    old = time.time() - 86400
    os.utime(guard, (old, old))
    lock, start = RunLock(tmp_path), time.monotonic()
    assert lock.acquire().endswith("on this host has ended")
    assert time.monotonic() - start >= 0.5 and not guard.exists()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == lock._mine
    lock.release()


def test_a_dead_pid_of_another_pid_space_is_not_taken_for_its_holder(tmp_path, monkeypatch):
    """Containers sharing the host name (another pid namespace) or a reboot: the holder's pid says nothing here.
    A live run in such a container was taken over as 'process N on this host has ended'; its heartbeat decides."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert runlock._pid_space()                                    # Linux: boot id and pid namespace known
    for other_space in ("another-boot pid:[4026531836]", "", None):   # None: a lock written before pid_space
        lock = holder(tmp_path, pid=dead_pid(), pid_space=other_space)
        if other_space is None:
            (tmp_path / LOCK_NAME).write_text(json.dumps({k: v for k, v in lock.items() if k != "pid_space"}))
        with pytest.raises(RunLockError, match="in use by another run"):
            RunLock(tmp_path).acquire()
        old = time.time() - runlock.STALE_S - 5                    # ... until the heartbeat is stale
        os.utime(tmp_path / LOCK_NAME, (old, old))
        lock = RunLock(tmp_path)
        assert lock.acquire().startswith("no heartbeat for")
        lock.release()


def test_where_proc_cannot_tell_the_pid_space_a_dead_pid_says_nothing(tmp_path, monkeypatch):
    """Both pid spaces unknown ('' where /proc cannot say) are not one pid space: the heartbeat decides."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setattr(runlock, "_pid_space", lambda: "")
    holder(tmp_path, pid=dead_pid(), pid_space="")
    with pytest.raises(RunLockError, match="in use by another run"):
        RunLock(tmp_path).acquire()


def test_runs_outside_slurm_are_no_requeued_job():
    """An empty Slurm job id names no job: two runs without one are not one job run again, restart counts or not."""
    me = {**runlock._me(), "slurm_job_id": "", "slurm_restart": "0"}
    other = {"host": "elsewhere", "pid": 5, "pid_space": "x", "slurm_job_id": "", "slurm_restart": "1"}
    assert runlock.holder_gone(other, me, 0.0) is None
    assert runlock.holder_gone({**other, "slurm_job_id": "7"}, {**me, "slurm_job_id": "7"}, 0.0) == \
        "Slurm job 7 runs again (requeued)"


def test_a_takeover_guard_replaced_meanwhile_is_timed_anew(tmp_path, monkeypatch):
    """Another run's new guard is not the crashed one seen before: its time starts when it is first seen."""
    monkeypatch.setattr(runlock, "GUARD_STALE_S", 0.3)
    guard, lock = tmp_path / f".{LOCK_NAME}.takeover", RunLock(tmp_path)
    guard.touch()
    lock._wait_on_guard(guard)
    time.sleep(0.4)
    guard.unlink()
    guard.touch()
    os.utime(guard, ns=(10**9, 10**9))  # another file: its mtime (and maybe its inode) differs
    lock._wait_on_guard(guard)
    assert guard.exists()
    time.sleep(0.4)
    lock._wait_on_guard(guard)           # the same guard, seen unchanged for longer than GUARD_STALE_S
    assert not guard.exists()


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path):
    """A full disk (here: a file size limit of 1 byte) while the lock is written: the start is refused with the
    reason, and no empty lock refuses the next start for STALE_S."""
    script = ("import resource, sys; from rnalm.runlock import RunLock, RunLockError\n"
              "resource.setrlimit(resource.RLIMIT_FSIZE, (1, 1))\n"
              "try:\n    RunLock(sys.argv[1]).acquire()\nexcept RunLockError as e:\n    sys.exit(str(e))\n")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[2], timeout=60)
    assert proc.returncode == 1 and "cannot write the run lock: File too large" in proc.stderr, proc.stderr
    assert not (tmp_path / LOCK_NAME).exists()
    lock = RunLock(tmp_path)
    assert lock.acquire() is None
    lock.release()


def test_release_leaves_a_lock_another_run_took_over(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = RunLock(tmp_path)
    lock.acquire()
    taken = holder(tmp_path, started="later")                        # same host and pid, another run's record
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text()) == taken


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path)
    lock.acquire()
    old = time.time() - 1000
    os.utime(tmp_path / LOCK_NAME, (old, old))
    deadline = time.monotonic() + 10  # a loaded machine may run the heartbeat thread late
    while time.time() - (tmp_path / LOCK_NAME).stat().st_mtime > 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 10
    lock.release()


@pytest.mark.slow
def test_trainer_refuses_an_out_dir_held_by_a_live_run(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder(out, host="gpu007", pid=12345, slurm_job_id="9001")
    proc = run_trainer(pretrain_shards, out, "--train.max_steps=2", expect_rc=None, timeout=120)
    assert proc.returncode != 0
    assert "in use by another run: pid 12345 on gpu007, Slurm job 9001" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == 12345   # the holder's lock is not touched


@pytest.mark.timeout(20)
def test_a_broken_link_in_place_of_the_lock_is_an_error_not_a_hang(tmp_path):
    (tmp_path / LOCK_NAME).symlink_to(tmp_path / "nowhere")
    with pytest.raises(RunLockError, match="is a broken link"):
        RunLock(tmp_path).acquire()


def test_live_holder_names_another_live_process_and_not_this_one_or_a_gone_one(tmp_path):
    """Read only: what finetune's evaluate/predict warn with. A train run reloads its best model while holding its
    own lock, which must not read as another run; a lock file of other JSON reads as a lock not written yet."""
    lock = RunLock(tmp_path)
    with lock:
        assert RunLock(tmp_path).live_holder() is None                  # this process's own
    holder(tmp_path, pid=dead_pid())
    assert RunLock(tmp_path).live_holder() is None                      # ended: would be taken over
    holder(tmp_path, host="another-node")                               # alive as far as anyone here can tell
    assert RunLock(tmp_path).live_holder().startswith(f"pid {os.getpid()} on another-node")
    (tmp_path / LOCK_NAME).write_text("[]")
    assert RunLock(tmp_path).live_holder() == "a run whose lock is not written yet, heartbeat 0 s ago"
    assert (tmp_path / LOCK_NAME).read_text() == "[]"                  # nothing taken over


def test_another_live_process_here_is_a_holder_and_so_is_this_pid_of_another_pid_space(tmp_path):
    """Only host, pid and pid space together make a lock this process's own."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        holder(tmp_path, pid=proc.pid)
        assert RunLock(tmp_path).live_holder().startswith(f"pid {proc.pid} on {socket.gethostname()}")
    finally:
        proc.kill()
        proc.wait()
    holder(tmp_path, pid_space="another-container")
    assert RunLock(tmp_path).live_holder().startswith(f"pid {os.getpid()} on {socket.gethostname()}")


def test_a_process_of_another_user_is_alive(tmp_path, monkeypatch):
    """kill(pid, 0) on someone else's process raises PermissionError: it exists."""
    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    holder(tmp_path, pid=4242)
    monkeypatch.setattr(runlock.os, "kill", kill)
    assert RunLock(tmp_path).live_holder().startswith("pid 4242 on")


def test_a_killed_holder_not_yet_reaped_is_gone(tmp_path):
    """A zombie answers kill(pid, 0): in a container whose init reaps no children, a SIGKILLed run's rerun was
    refused for the heartbeat's 180 s."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        proc.kill()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not become a zombie"
            time.sleep(0.05)
        holder(tmp_path, pid=proc.pid)
        assert RunLock(tmp_path).live_holder() is None
    finally:
        proc.wait()
