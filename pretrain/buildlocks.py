"""Stale build locks of torch's JIT extensions, which would hang a start-up silently and forever.

DeepSpeed builds its ops through torch.utils.cpp_extension (its CPU comm op in init_distributed, FusedAdam) under
a lock file `<extensions dir>/<op>/lock` that names no owner: every other process waits while it exists. A process
killed while it builds or checks an op (a preempted or cancelled start, a peer's failure) leaves it behind. While
the trainer starts, a thread removes the locks of these ops once they are older than any build of them takes,
naming them on stderr. Other extensions' locks in the same root are left alone (their builds may take longer).
"""
from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

OPS = ("deepspeed_shm_comm", "fused_adam")  # DeepSpeed's ops the trainer builds (CPU comm; optim.adamw=deepspeed)
STALE_S = 600.0   # their builds take 1-2 min
POLL_S = 10.0


def extensions_root() -> Path | None:
    """torch's build root (TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions/py<ver>_<accelerator>)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory
        return Path(_get_build_directory("", verbose=False))
    except (ImportError, OSError):  # a torch without it, or a root it cannot create: no build will run there
        return None


def remove_stale(root: Path, stale_s: float = STALE_S) -> list[Path]:
    removed = []
    for lock in (root / op / "lock" for op in OPS):
        try:
            age = time.time() - lock.stat().st_mtime
            if age <= stale_s:
                continue
            lock.unlink()
        except FileNotFoundError:  # its build ended meanwhile
            continue
        print(f"removed {lock}: a torch extension build lock {age:.0f} s old, left by a process killed while it "
              "built or checked that op (every start would wait on it forever); if the op was never built, this "
              "start fails to load it and the next one builds it", file=sys.stderr, flush=True)
        removed.append(lock)
    return removed


class StaleBuildLockWatch:
    """Runs remove_stale every POLL_S seconds from start() until stop()."""

    def __init__(self, root: Path | None = None, stale_s: float = STALE_S, poll_s: float = POLL_S) -> None:
        self.root, self.stale_s, self.poll_s = root or extensions_root(), stale_s, poll_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="stale-build-locks", daemon=True)

    def start(self) -> StaleBuildLockWatch:
        if self.root is not None:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _watch(self) -> None:
        while True:
            try:
                remove_stale(self.root, self.stale_s)
            except OSError:  # a file system hiccup: the next poll tries again
                pass
            if self._stop.wait(self.poll_s):
                return
