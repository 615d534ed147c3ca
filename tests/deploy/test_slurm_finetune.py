"""`sbatch --array=0-1 deploy/slurm/finetune.sh ss train ... --data.dataset=archiveii` on the real single-node
Slurm: the array's tasks run one command, share out its ArchiveII families (each trained exactly once) and the
summary of every family is written."""
from __future__ import annotations

import json
import sys

import pytest

from tests.deploy.daemons import REPO

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(300)]
FAMILIES = ("tRNA", "srp")


def test_archiveii_families_are_shared_out_over_a_job_array(slurm, shared_data, tmp_path):
    from rnalm.config import ModelConfig
    from rnalm.io import save_pretrained
    from rnalm.model import RiNALMo

    backbone, out = tmp_path / "backbone", tmp_path / "ss_archiveii"
    save_pretrained(RiNALMo(ModelConfig.preset("nano", dim=32, num_layers=1, num_heads=2)), backbone)
    job = slurm.sbatch("--array=0-1", "--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%A_%a.out",
                       str(REPO / "deploy/slurm/finetune.sh"), "ss", "train", f"--model.path={backbone}",
                       f"--data.root={shared_data}", "--data.dataset=archiveii", f"--data.test_family={','.join(FAMILIES)}",
                       "--data.max_train_len=150", "--data.limit_train=8", "--data.limit_valid=4", "--data.limit_test=4",
                       "--train.epochs=1", "--eval.rnafold=false", "--train.progress=false", f"--train.out_dir={out}",
                       env={"RNALM_PYTHON": sys.executable}, cwd=REPO)
    logs = ""
    for task in (0, 1):
        info = slurm.wait_state(f"{job}_{task}", {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, timeout=240)
        log = (tmp_path / f"{job}_{task}.out").read_text(errors="replace")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log[-3000:]
        assert f"array task {task} of job {job}" in log, log[-3000:]
        logs += log
    for fam in FAMILIES:
        assert logs.count(f"ArchiveII {fam}: training") == 1, logs[-4000:]
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["rows"]) == {*FAMILIES, "mean of 2 families"}
    assert not list(out.rglob("run.lock"))


def test_finetune_sh_without_arguments_fails_clearly(slurm, tmp_path):
    job = slurm.sbatch("--gpus-per-node=0", "--cpus-per-task=1", f"--output={tmp_path}/%j.out",
                       str(REPO / "deploy/slurm/finetune.sh"), cwd=REPO)
    info = slurm.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=60)
    assert info["JobState"] == "FAILED"
    assert "no arguments: give a python -m finetune command" in (tmp_path / f"{job}.out").read_text()
