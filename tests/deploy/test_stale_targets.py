"""pretrain.sh removes the file_sd target files of jobs that no longer run, on squeue's word only: a failed
query (a busy controller) must not stop Prometheus from scraping another live job."""
from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.deploy.daemons import REPO

SQUEUE = {  # what a stub squeue does -> whether the other job's target file must survive
    "running": ("echo 1111", True),
    "gone, empty answer": ("exit 0", False),
    "gone, invalid job id": ("echo 'slurm_load_jobs error: Invalid job id specified' >&2; exit 1", False),
    "query failed": ("echo 'slurm_load_jobs error: Socket timed out on send/recv operation' >&2; exit 1", True),
}


@pytest.mark.parametrize("case", SQUEUE)
def test_stale_target_files_are_removed_only_on_squeues_word(case, tmp_path):
    body, kept = SQUEUE[case]
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "squeue").write_text(f"#!/bin/bash\n{body}\n")
    (tmp_path / "bin" / "squeue").chmod(0o755)
    sd = tmp_path / "sd"
    sd.mkdir()
    for job in ("1111", "4242"):
        (sd / f"rnalm-{job}.json").write_text("[]")
    script = (REPO / "deploy" / "slurm" / "pretrain.sh").read_text()
    function = re.search(r"^remove_stale_targets\(\) \{.*?^\}", script, re.S | re.M).group(0)
    subprocess.run(["bash", "-c", f"{function}\nremove_stale_targets"], check=True, timeout=30,
                   env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SD_DIR": str(sd), "SLURM_JOB_ID": "4242"})
    assert (sd / "rnalm-1111.json").exists() == kept
    assert (sd / "rnalm-4242.json").exists()  # its own


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_another_users_target_file_is_never_removed(tmp_path):
    """With PrivateData=jobs, squeue answers nothing for another user's live job: its file was removed, and that
    job lost its monitoring and alerts without a word."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "squeue").write_text("#!/bin/bash\nexit 0\n")   # 'not running' for every job
    (tmp_path / "bin" / "squeue").chmod(0o755)
    sd = tmp_path / "sd"
    sd.mkdir()
    for job in ("1111", "2222"):
        (sd / f"rnalm-{job}.json").write_text("[]")
    os.chown(sd / "rnalm-2222.json", 65534, 65534)  # nobody's
    script = (REPO / "deploy" / "slurm" / "pretrain.sh").read_text()
    function = re.search(r"^remove_stale_targets\(\) \{.*?^\}", script, re.S | re.M).group(0)
    subprocess.run(["bash", "-c", f"{function}\nremove_stale_targets"], check=True, timeout=30,
                   env={"PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin", "SD_DIR": str(sd), "SLURM_JOB_ID": "4242"})
    assert not (sd / "rnalm-1111.json").exists() and (sd / "rnalm-2222.json").exists()
