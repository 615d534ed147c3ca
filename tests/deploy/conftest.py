"""Fixtures for the deployment tests: a real single-node Slurm (one per session) and real Prometheus servers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from daemons import Prometheus, SlurmCluster, prometheus_test_config, require_tools


@pytest.fixture(scope="session")
def slurm(tmp_path_factory) -> SlurmCluster:
    """munged + slurmctld + slurmd on loopback, as root, everything under one temporary base dir."""
    require_tools("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")
    if os.geteuid() != 0:
        pytest.skip("the test Slurm runs its daemons as root (SlurmUser=root); not root here")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


@pytest.fixture
def prometheus_factory(tmp_path: Path):
    """start(targets_dir) -> a running Prometheus using the repository's config and rules (test intervals)."""
    require_tools("prometheus")
    servers: list[Prometheus] = []

    def start(targets_dir: Path) -> Prometheus:
        work = tmp_path / f"prometheus{len(servers)}"
        work.mkdir()
        cfg = prometheus_test_config(targets_dir, work / "prometheus.yml")
        server = Prometheus(cfg, work / "data", work / "prometheus.log")
        servers.append(server)
        return server.start()

    yield start
    for s in servers:
        s.stop()
