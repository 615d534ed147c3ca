"""deploy/slurm/common.sh, which every sbatch script sources: which interpreter a job runs, without a cluster."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.daemons import REPO


def pick_python(repo: Path, tmp: Path, **env: str) -> subprocess.CompletedProcess:
    """Source common.sh as the sbatch scripts do, with python3 on PATH a stub, and print the choice."""
    (tmp / "bin").mkdir(exist_ok=True)
    (tmp / "bin" / "python3").write_text("#!/bin/sh\n")
    (tmp / "bin" / "python3").chmod(0o755)
    script = f'NAME=test RNALM_REPO={repo}; source {REPO}/deploy/slurm/common.sh; echo "chose $PYTHON"'
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                          env={"PATH": f"{tmp / 'bin'}:/usr/bin:/bin", "SLURM_JOB_ID": "7", **env})


def fake_repo(tmp: Path, venv_python: Path | None) -> Path:
    repo = tmp / "repo"
    (repo / ".venv" / "bin").mkdir(parents=True)
    if venv_python is not None:
        (repo / ".venv" / "bin" / "python").symlink_to(venv_python)
    else:
        shutil.rmtree(repo / ".venv")
    return repo


def test_the_repositorys_venv_is_the_default(tmp_path):
    repo = fake_repo(tmp_path, Path(sys.executable))
    r = pick_python(repo, tmp_path)
    assert r.returncode == 0 and f"chose {repo}/.venv/bin/python" in r.stdout, r.stderr
    assert f"python: {repo}/.venv/bin/python" in r.stdout   # logged for the job's output


def test_python3_on_path_only_without_a_venv(tmp_path):
    r = pick_python(fake_repo(tmp_path, None), tmp_path)
    assert r.returncode == 0 and f"chose {tmp_path}/bin/python3" in r.stdout, r.stderr


@pytest.mark.parametrize("case", ["dangling venv link", "RNALM_PYTHON missing", "python that does not start"])
def test_an_interpreter_that_does_not_run_here_stops_the_job_instead_of_another_python(tmp_path, case):
    """A .venv built on the login node against an interpreter the compute nodes lack, or a mistyped
    RNALM_PYTHON, ran python3 from PATH: other packages (or none: 'No module named torch'); a module-built python
    without its libraries on the node went on to a misleading error about the config."""
    if case == "dangling venv link":
        r = pick_python(fake_repo(tmp_path, Path("/opt/login-node-only/python3.11")), tmp_path)
        said = "does not run on"
    elif case == "python that does not start":
        broken = tmp_path / "module-python"
        broken.write_text("#!/bin/sh\necho 'error while loading shared libraries: libpython3.11.so.1.0' >&2\n"
                          "exit 127\n")
        broken.chmod(0o755)
        r = pick_python(fake_repo(tmp_path, Path(sys.executable)), tmp_path, RNALM_PYTHON=str(broken))
        said = f"{broken} does not start on"
        assert "libpython3.11.so.1.0" in r.stderr
    else:
        r = pick_python(fake_repo(tmp_path, Path(sys.executable)), tmp_path, RNALM_PYTHON=str(tmp_path / "pyhton"))
        said = f"RNALM_PYTHON={tmp_path}/pyhton is not an executable on"
    assert r.returncode == 1 and "chose" not in r.stdout
    assert said in r.stderr and "python3" not in r.stdout


def test_rnalm_python_may_name_a_command_on_path(tmp_path):
    """From an operator review: RNALM_PYTHON=python3 (documented as "interpreter") was refused, tested as a path
    relative to the repository."""
    r = pick_python(fake_repo(tmp_path, Path(sys.executable)), tmp_path, RNALM_PYTHON="python3")
    assert r.returncode == 0 and f"chose {tmp_path}/bin/python3" in r.stdout, r.stderr
    r = pick_python(fake_repo(tmp_path / "b", Path(sys.executable)), tmp_path, RNALM_PYTHON="pyhton3")
    assert r.returncode == 1 and "RNALM_PYTHON=pyhton3 is not an executable on" in r.stderr
