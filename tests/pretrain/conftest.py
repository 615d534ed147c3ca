"""Trainer test fixtures: one shard set per session (from the real ncRNA corpus) and the reference run.

Set RNALM_PRETRAIN_TEST_SHARDS=DIR to reuse an already built shard set.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .trainer_runs import PY, REPO, STRAIGHT_STEPS, run_trainer


@pytest.fixture(scope="session")
def pretrain_shards(tmp_path_factory, ncrna_fasta) -> Path:
    """Shards of the real ncRNA corpus, built once per session with dataprep's CLI (no clustering: fast)."""
    reuse = os.environ.get("RNALM_PRETRAIN_TEST_SHARDS")
    if reuse:
        return Path(reuse)
    script = REPO / "dataprep" / "build_shards.py"
    if not script.exists():
        pytest.skip("dataprep/build_shards.py not present yet")
    out = tmp_path_factory.mktemp("shards") / "ncrna"
    proc = subprocess.run([PY, str(script), "--input", str(ncrna_fasta), "--out", str(out), "--no-cluster",
                           "--valid-fraction", "0.05", "--shard-records", "6000", "--block-records", "512",
                           "--no-report", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"build_shards failed:\n{proc.stderr[-4000:]}"
    return out


@pytest.fixture(scope="session")
def straight_run(pretrain_shards, tmp_path_factory) -> Path:
    """12 uninterrupted steps, checkpoints every 4 (keep 2), validation at the end. Read-only for tests."""
    out = tmp_path_factory.mktemp("straight") / "run"
    run_trainer(pretrain_shards, out, f"--train.max_steps={STRAIGHT_STEPS}", f"--train.valid_every={STRAIGHT_STEPS}")
    return out


@pytest.fixture
def copy_of_straight_run(straight_run, tmp_path) -> Path:
    """A private copy to resume/convert without disturbing other tests."""
    dst = tmp_path / "run"
    shutil.copytree(straight_run, dst)
    return dst
