"""The loader on shards that the real dataprep pipeline (MMseqs2 clusters) built from the real ncRNA corpus."""
from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from dataprep.shards import iter_blocks, read_manifest
from pretrain.data import DataConfig, PretrainLoader

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.system  # needs mmseqs


@pytest.fixture(scope="module")
def real_shards(tmp_path_factory, ncrna_fasta):
    if shutil.which("mmseqs") is None:
        pytest.skip("mmseqs not installed (run: bash deploy/install_sysdeps.sh)")
    out = tmp_path_factory.mktemp("ncrna") / "shards"
    proc = subprocess.run([sys.executable, str(REPO / "dataprep" / "build_shards.py"), "--input", str(ncrna_fasta),
                           "--out", str(out), "--no-report", "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def clusters_of_split(out: Path, split: str) -> dict[str, int]:
    manifest = read_manifest(out)
    return {i: c for s in manifest.split_shards(split) for b in iter_blocks(manifest.shard_path(s))
            for i, c in zip(b.ids, b.cluster_id.tolist())}


def test_one_record_per_real_cluster_per_epoch(real_shards):
    cluster_of = clusters_of_split(real_shards, "train")
    n_clusters = len(set(cluster_of.values()))
    assert n_clusters < len(cluster_of)  # MMseqs2 did group records
    loader = PretrainLoader(DataConfig(str(real_shards), num_workers=0, seed=3))
    ids = [i for b in itertools.islice(loader, 700) for i in b.ids]
    assert len(ids) >= 2 * n_clusters
    for epoch in (ids[:n_clusters], ids[n_clusters:2 * n_clusters]):
        assert Counter(cluster_of[i] for i in epoch) == Counter(set(cluster_of.values()))
    assert ids[:n_clusters] != ids[n_clusters:2 * n_clusters]


def test_validation_split_of_real_shards_in_one_pass_over_two_ranks(real_shards):
    valid = clusters_of_split(real_shards, "valid")
    cfg = DataConfig(str(real_shards), split="valid", sampling="uniform", infinite=False, num_workers=2)
    got = [i for r in range(2) for b in PretrainLoader(cfg, r, 2) for i in b.ids]
    assert sorted(got) == sorted(valid)
