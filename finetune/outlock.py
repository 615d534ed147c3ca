"""Who writes a fine-tuning OUT: one train run, holding OUT/run.lock while it runs; or the processes of one
ArchiveII run over several families (same settings, e.g. a Slurm job array), each family under a lock of its
own (OUT/<family>/run.lock), each process holding OUT/run.lock only for a moment: to check that OUT is not
another run's (OUT/folds.json records the several-family run's settings) and to claim a family.
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rnalm.files import atomic_write
from rnalm.runlock import LOCK_NAME, RunLock, RunLockError

FOLDS_FILE = "folds.json"
MOMENT_WAIT_S = 30.0  # other processes' moments on OUT/run.lock are waited out; a train run's hold is not


@contextmanager
def held(out: Path) -> Iterator[None]:
    """OUT/run.lock, once other processes' moments on it are over (MOMENT_WAIT_S): a train run's hold is refused."""
    lock = RunLock(out)
    deadline = time.monotonic() + MOMENT_WAIT_S
    while True:
        try:
            lock.acquire()
            break
        except RunLockError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield
    finally:
        lock.release()


def holder(fold_dir: Path) -> str | None:
    """Why the family in fold_dir cannot be claimed now (its live holder, heartbeat age), or None when it can (a
    lock whose holder is gone is taken over and released). Called with OUT held, as every claim is."""
    lock = RunLock(fold_dir)
    try:
        lock.acquire()
    except RunLockError as e:
        return str(e)
    lock.release()
    return None


def busy_families(out: Path) -> list[str]:
    return [p.parent.name for p in sorted(out.glob(f"*/{LOCK_NAME}")) if holder(p.parent)]


@contextmanager
def single_run(out: Path) -> Iterator[None]:
    """OUT/run.lock for a whole train run, refused while a several-family run trains families in OUT."""
    with held(out):
        if busy := busy_families(out):
            raise RunLockError(f"{out} is in use by an ArchiveII run over several families (families "
                               f"{', '.join(busy)} in training): use another --train.out_dir, or wait for it")
        yield


def claim_out(out: Path, settings: dict[str, Any]) -> None:
    """With OUT held: OUT/folds.json says OUT is a several-family run of these settings. Refused while a run of
    other settings still trains families there; a finished or stopped one's record is replaced."""
    path = out / FOLDS_FILE
    try:
        theirs = json.loads(path.read_text())
    except (OSError, ValueError):
        theirs = None
    if theirs == settings:
        return
    if theirs is not None and (busy := busy_families(out)):
        raise RunLockError(f"{out} holds an ArchiveII run of other settings ({differences(theirs, settings)}) whose "
                           f"families {', '.join(busy)} are in training: use another --train.out_dir, or wait for it")
    atomic_write(path, json.dumps(settings, indent=2) + "\n")


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> str:
    """'section.key: old -> new' for each setting that differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out.append(differences(a, b, f"{prefix}{key}."))
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(o for o in out if o)
