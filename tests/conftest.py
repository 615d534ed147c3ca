"""Shared test fixtures: where the real data lives, and skips with a reason when it is absent."""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds its CPU comm op under a lock in TORCH_EXTENSIONS_DIR; a per-checkout cache keeps other
# checkouts' runs (and a lock left by a process killed mid-build there) out of this one. Subprocesses inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
SHARED_DATA = Path(os.environ.get("RNALM_SHARED_DATA", REPO.parent / "shared" / "data"))
SHARED_DATASETS = ("ncrna", "ss", "splice", "mrl")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real datasets (ncrna, ss, splice, mrl); skips when it, or one of them, is not there."""
    if not (SHARED_DATA / "README.md").exists():
        pytest.skip(f"real data not found at {SHARED_DATA} (set RNALM_SHARED_DATA)")
    missing = [d for d in SHARED_DATASETS if not (SHARED_DATA / d / "README.md").exists()]
    if missing:  # a partial copy: tests read any of them through this fixture
        pytest.skip(f"real data at {SHARED_DATA} lacks {', '.join(missing)} (set RNALM_SHARED_DATA to a whole copy)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ncrna_fasta(shared_data: Path) -> Path:
    path = shared_data / "ncrna" / "ncrna_corpus.fasta.gz"
    if not path.exists():
        pytest.skip(f"{path} not found")
    return path


@contextlib.contextmanager
def killed_after_one_rename():
    """A save stopped (KeyboardInterrupt) between its first os.replace and its second."""
    replace, renames = os.replace, []

    def replaced_once(src, dst):
        if renames:
            raise KeyboardInterrupt
        renames.append(dst)
        replace(src, dst)

    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(os, "replace", replaced_once)
        yield


def require_tool(name: str) -> str:
    """Path of an external tool; skips with the install hint when missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (run: bash deploy/install_sysdeps.sh)")
    return path


def interrupted_while_reading(cmd: list[str], tmp_path: Path) -> tuple[int, str]:
    """(exit code, stderr) of `cmd` given Ctrl-C's SIGINT while it reads the FASTA `tmp_path/in.fa`, a FIFO: the
    open below returns once the command has opened it, i.e. it is past its start-up, inside its work."""
    import signal
    import subprocess
    import sys
    import time

    fifo = tmp_path / "in.fa"
    os.mkfifo(fifo)
    # SIGINT's default, as under a terminal: a shell starts background commands (CI's) with it ignored, and exec
    # keeps that, so the command would never see the signal
    proc = subprocess.Popen([sys.executable, *cmd], cwd=REPO, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    with open(fifo, "w") as writer:
        writer.write(">a\nACGUACGUAC\n>b\nACG")  # a record and a half; the rest never comes
        writer.flush()
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=120)[1]
    return proc.returncode, stderr
