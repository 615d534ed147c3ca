"""One run per directory: two pretraining runs writing one checkpoints/ folder delete each other's saves in
progress; two fine-tuning runs overwrite each other's model (fine-tuning's ArchiveII folds share out their
families through one lock per fold).

Rank 0 holds `out_dir/run.lock` (JSON: host, pid and its pid space, Slurm job id and restart count, start time)
and touches it every HEARTBEAT_S seconds from a thread. A new run takes the lock over when the holder is gone: a
later run of the same Slurm job (a requeue reruns the job under its id, with SLURM_RESTART_COUNT one higher), a
process no longer alive on this host in this pid space (containers sharing a host name have pid spaces of their
own), or a heartbeat older than STALE_S (the holder's node died); otherwise it refuses to start, naming the
holder.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 180.0
GUARD_STALE_S = 60.0   # a takeover guard held this long (seen unchanged) is a crashed run's


class RunLockError(RuntimeError):
    pass


def _pid_space() -> str:
    """Where this process's pid means this process: the boot and the pid namespace ('' where /proc cannot say)."""
    try:
        return f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()} {os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return ""


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_space": _pid_space(),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
            "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # a zombie (killed, not yet reaped: a container whose init reaps no children) holds nothing
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def holder_gone(holder: dict, me: dict, heartbeat_age: float) -> str | None:
    """Why the lock's holder can be taken over, or None while it may still be running."""
    # the same restart count: another job step of this very run of the job (two sruns in one allocation)
    if holder.get("slurm_job_id") == me["slurm_job_id"] != "" and holder.get("slurm_restart") != me["slurm_restart"]:
        return f"Slurm job {me['slurm_job_id']} runs again (requeued)"
    pid = holder.get("pid")
    same_pids = holder.get("host") == me["host"] and holder.get("pid_space") == me["pid_space"] != ""
    if same_pids and isinstance(pid, int) and pid > 0 and not _alive(pid):
        return f"process {pid} on this host has ended"
    if heartbeat_age > STALE_S:
        return f"no heartbeat for {heartbeat_age:.0f} s"
    return None


def _who(holder: dict, heartbeat_age: float) -> str:
    who = (f"pid {holder.get('pid')} on {holder.get('host')}"
           + (f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else "")
           + f", started {holder.get('started')}" if holder else "a run whose lock is not written yet")
    return f"{who}, heartbeat {heartbeat_age:.0f} s ago"


class RunLock:
    def __init__(self, out_dir: str | Path, option: str | None = "--train.out_dir") -> None:
        """`option`: the command-line option that names the directory (in the refusal); None: a command that
        works on another run's directory, which can only wait."""
        self.path, self.option = Path(out_dir) / LOCK_NAME, option
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._mine: dict | None = None
        self._guard_seen: tuple[tuple[int, int], float] | None = None   # a takeover guard: (inode, mtime), since

    def acquire(self) -> str | None:
        """Take the lock (raises RunLockError when another live run holds it); returns why an earlier
        holder was taken over, if there was one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _me()
        taken_over = None
        while not self._create(me):
            try:
                holder, age, text = self._read_holder()
            except FileNotFoundError:
                if os.path.lexists(self.path):  # a link to nothing, which O_EXCL never creates through
                    raise RunLockError(f"{self.path} is a broken link: remove it") from None
                continue  # its holder ended meanwhile
            taken_over = holder_gone(holder, me, age)
            if taken_over is None:
                advice = (f"Two runs in one directory would overwrite each other's files: use another {self.option}, "
                          if self.option else "")
                raise RunLockError(f"{self.path.parent} is in use by another run: {_who(holder, age)}. "
                                   f"{advice}stop that run, or wait {STALE_S:.0f} s after it died") from None
            self._remove_if_unchanged(text)
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()
        return taken_over

    def live_holder(self) -> str | None:
        """Who holds the lock, when another process that may still run does (read only: nothing is taken over)."""
        try:
            holder, age, _ = self._read_holder()
        except OSError:
            return None
        me = _me()
        if all(holder.get(k) == me[k] for k in ("host", "pid", "pid_space")):
            return None  # this process's own
        return None if holder_gone(holder, me, age) else _who(holder, age)

    def _read_holder(self) -> tuple[dict, float, str]:
        """(holder, heartbeat age, the file's text); a lock not written yet by a run starting now, or damaged by a
        crash, reads as {} and is judged by its age."""
        age = time.time() - self.path.stat().st_mtime
        text = self.path.read_text()
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return (holder if isinstance(holder, dict) else {}), age, text

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError as e:  # e.g. a full disk: an empty lock left here would refuse the next start for STALE_S
            self.path.unlink(missing_ok=True)
            raise RunLockError(f"{self.path}: cannot write the run lock: {e.strerror or e}") from None
        self._mine = me
        return True

    def _remove_if_unchanged(self, text: str) -> None:
        """Remove a gone holder's lock unless another run has replaced it since it was read. Runs taking over take
        turns through a guard file, so one at a time checks the lock and removes it; a run starting meanwhile
        creates its lock only where none is, so nothing replaces the lock between that check and the removal.
        Without the guard, of three runs the second could take over between the first's check and removal."""
        guard = self.path.with_name(f".{LOCK_NAME}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            self._wait_on_guard(guard)
            return  # the caller reads the lock again
        try:
            if self.path.read_text() == text:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            guard.unlink(missing_ok=True)

    def _wait_on_guard(self, guard: Path) -> None:
        """Another run is taking over, for milliseconds. A guard seen unchanged (same file, same mtime) for
        GUARD_STALE_S by this process's own clock is a crashed run's and is removed: the file server's clock, which
        stamps the mtime, may run apart from this node's. (Two runs removing one crashed run's guard at once could
        still both take over: a crash within those milliseconds, then starts at the same instant.)"""
        try:
            st = guard.stat()
        except FileNotFoundError:
            return
        seen = (st.st_ino, st.st_mtime_ns)
        if self._guard_seen is None or self._guard_seen[0] != seen:
            self._guard_seen = (seen, time.monotonic())
        elif time.monotonic() - self._guard_seen[1] > GUARD_STALE_S:
            guard.unlink(missing_ok=True)
            self._guard_seen = None
        time.sleep(0.05)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:  # a file system hiccup: the next beat tries again
                pass

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if json.loads(self.path.read_text()) == self._mine:  # not a lock another run has taken over since
                self.path.unlink()
        except (OSError, ValueError):
            pass
