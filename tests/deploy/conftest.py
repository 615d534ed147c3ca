"""Fixtures for the deployment tests: a real single-node Slurm (one per session), real Prometheus servers and a
small synthetic shard set written with dataprep's shard writer."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from tests.deploy.daemons import Prometheus, SlurmCluster, require_tools, start_prometheus


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
    """start() -> a running Prometheus using the repository's config and rules (test intervals)."""
    require_tools("prometheus")
    servers: list[Prometheus] = []

    def start() -> Prometheus:
        servers.append(start_prometheus(tmp_path / f"prometheus{len(servers)}"))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """A dataprep-format shard set (4 train shards of 600 records, 1 valid shard) of random RNA, every record
    its own cluster; written with dataprep.shards, so the trainer reads it exactly like real data."""
    from dataprep.shards import Manifest, ShardInfo, ShardWriter, blocks_from_arrays, write_manifest

    out = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    infos, next_cluster = [], 0
    for split, n_shards, n in (("train", 4, 600), ("valid", 1, 100)):
        for s in range(n_shards):
            lengths = rng.integers(20, 200, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            seq = np.frombuffer(b"ACGU", np.uint8)[rng.integers(0, 4, offsets[-1])]
            ids = [f"{split}{s}_{i}" for i in range(n)]
            clusters = np.arange(next_cluster, next_cluster + n, dtype=np.int64)
            next_cluster += n
            rel = f"{split}/shard-{s:06d}.tar"
            writer = ShardWriter(out / rel)
            for block in blocks_from_arrays(seq, offsets, ids, clusters, np.ones(n, np.int64),
                                            np.zeros(n, np.int64), np.zeros(n, np.int32), None, 128):
                writer.write(block)
            nbytes, sha = writer.close()
            infos.append(ShardInfo(rel, split, n, writer.blocks, writer.tokens, nbytes, sha))
    write_manifest(out, Manifest(shards=infos, sources=[{"path": "synthetic"}], params={}, tools={}))
    return out
