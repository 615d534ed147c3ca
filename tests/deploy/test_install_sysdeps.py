"""deploy/install_sysdeps.sh, on a PATH where only stubs stand: which apt packages each scope asks for."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.daemons import REPO


def asked_for(tmp: Path, *scope: str) -> list[str]:
    """The packages the script would install with a Python 3.11 lacking ensurepip and headers, g++ and every
    tool missing, and apt-get a stub that records its arguments (as root; else the script names what is missing)."""
    bin_ = tmp / "bin"
    bin_.mkdir(exist_ok=True)
    for tool in ("id", "env", "sudo", "true"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), bin_ / tool)
    (bin_ / "apt-get").write_text(f'#!/bin/bash\necho "$*" >> {tmp}/apt.log\n')
    (bin_ / "python3.11").write_text('#!/bin/bash\ncase "$*" in *version_info*) echo 3.11;; *) exit 1;; esac\n')
    for stub in ("apt-get", "python3.11"):
        (bin_ / stub).chmod(0o755)
    r = subprocess.run(["/bin/bash", str(REPO / "deploy" / "install_sysdeps.sh"), *scope], capture_output=True,
                       text=True, timeout=60, env={"PATH": str(bin_), "PYTHON3": "python3.11", "HOME": str(tmp)})
    assert r.returncode == 0, r.stderr
    log = tmp / "apt.log"
    if log.exists():   # root: apt-get update, then apt-get install ... PACKAGES
        return log.read_text().splitlines()[-1].split()[4:]
    match = re.search(r"missing: (.*) \(tests", r.stderr)
    if match is None:
        pytest.skip(f"install_sysdeps.sh neither installed nor named the missing packages: {r.stderr}")
    return match.group(1).split()


def test_the_pipeline_scope_installs_no_daemons_and_this_pythons_venv(tmp_path):
    """`make demo` on a cluster's login node must not install Debian's Slurm or Prometheus daemons beside the
    site's; the venv and headers are those of the Python make uses (python3-venv is the distro default's)."""
    assert sorted(asked_for(tmp_path, "pipeline")) == ["g++", "mmseqs2", "python3.11-dev", "python3.11-venv"]


def test_the_test_scope_adds_what_the_tests_start(tmp_path):
    assert set(asked_for(tmp_path)) >= {"g++", "mmseqs2", "python3.11-dev", "python3.11-venv", "openmpi-bin",
                                       "slurm-wlm", "prometheus"}  # (munged: /usr/sbin, which the script adds)
