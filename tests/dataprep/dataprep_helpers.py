"""Helpers for dataprep tests: in-process builds of small FASTA texts and reading the results back."""
from __future__ import annotations

import csv
from pathlib import Path

from dataprep.normalize import NormalizeConfig
from dataprep.pipeline import BuildConfig, BuildResult, build
from dataprep.shards import iter_blocks, read_manifest

REPO = Path(__file__).resolve().parents[2]


def build_small(tmp_path: Path, inputs: list[Path | str], out: str = "out", **kw) -> BuildResult:
    norm = {k: kw.pop(k) for k in ("min_len", "max_len", "label_key") if k in kw}
    cfg = BuildConfig(inputs=tuple(str(p) for p in inputs), out=str(tmp_path / out),
                      normalize=NormalizeConfig(**norm), no_cluster=kw.pop("no_cluster", True),
                      report=kw.pop("report", False), quiet=True, workers=kw.pop("workers", 1), **kw)
    return build(cfg)


def read_tsv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def read_back(out: Path) -> dict[str, tuple[bytes, str, int, int, int]]:
    """id -> (sequence, split, cluster_id, cluster_size, index_in_cluster) over every shard of the manifest."""
    m = read_manifest(out)
    got = {}
    for s in m.shards:
        for b in iter_blocks(out / s.path, verify_checksum=True, expected_sha256=s.sha256):
            for i, rid in enumerate(b.ids):
                assert rid not in got, f"{rid} twice in the shards"
                got[rid] = (b.sequence(i), s.split, int(b.cluster_id[i]), int(b.cluster_size[i]),
                            int(b.index_in_cluster[i]))
    return got
