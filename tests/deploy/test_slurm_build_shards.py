"""`sbatch deploy/slurm/build_shards.sh` runs dataprep's MPI mode as 2 srun ranks (PMIx) on the real
single-node Slurm and writes exactly the shards a serial build_shards.py run writes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy.daemons import REPO, require_tools

pytestmark = [pytest.mark.system, pytest.mark.timeout(240)]
BUILD_ARGS = ("--shard-records", "500", "--block-records", "128")


def test_build_shards_mpi_under_slurm_matches_serial_run(slurm, tmp_path):
    require_tools("mmseqs", "mpirun")
    from dataprep.synth import SynthConfig, write_fasta

    fasta = tmp_path / "synthetic.fa.gz"
    write_fasta(SynthConfig(records=3000, seed=1), fasta)
    job_id = slurm.sbatch("--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
                          str(REPO / "deploy/slurm/build_shards.sh"), "--input", str(fasta),
                          "--out", str(tmp_path / "mpi"), *BUILD_ARGS,
                          env={"RNALM_PYTHON": sys.executable}, cwd=REPO)
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=180)
    out = (tmp_path / f"{job_id}.out").read_text(errors="replace")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", out[-3000:]
    assert "2 MPI ranks" in out and "x 2 ranks" in out, out[-3000:]   # one MPI world, not 2 serial runs

    subprocess.run([sys.executable, "dataprep/build_shards.py", "--input", str(fasta), "--out",
                    str(tmp_path / "serial"), *BUILD_ARGS, "--quiet"], cwd=REPO, check=True, timeout=180)
    mpi, serial = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("mpi", "serial"))
    assert mpi["counts"] == serial["counts"] and mpi["counts"]["kept"] > 0
    assert [(s["path"], s["sha256"]) for s in mpi["shards"]] == [(s["path"], s["sha256"]) for s in serial["shards"]]


def test_build_shards_without_arguments_fails_clearly(slurm, tmp_path):
    job_id = slurm.sbatch("--nodes=1", "--cpus-per-task=1", f"--output={tmp_path}/%j.out", str(REPO / "deploy/slurm/build_shards.sh"),
                          cwd=REPO)
    info = slurm.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert info["JobState"] == "FAILED"
    assert "no arguments: give at least --input" in (tmp_path / f"{job_id}.out").read_text()
