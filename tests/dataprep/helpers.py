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
                      report=kw.pop("report", False), quiet=True, workers=kw.pop("workers", 2), **kw)
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


def reference_kept(paths: list[Path], min_len: int = 16, max_len: int = 8192) -> tuple[dict[str, bytes], int]:
    """Independent plain-Python reading of FASTA: (kept id -> normalised sequence, records in)."""
    import gzip

    valid = set(b"ACGURYKMSWBDHVN")
    records = []
    for path in paths:
        opener = gzip.open if Path(path).read_bytes()[:2] == b"\x1f\x8b" else open
        with opener(path, "rb") as f:
            for line in f:
                if line.startswith(b">"):
                    words = line[1:].split()
                    records.append([words[0].decode() if words else "", []])
                else:
                    records[-1][1].append(b"".join(line.split()))
    kept, seen_seq, first_seq_of_id = {}, set(), {}
    for rid, parts in records:
        s = b"".join(parts).upper().replace(b"T", b"U")
        if not rid or not (min_len <= len(s) <= max_len) or set(s) - valid:
            continue
        if first_seq_of_id.setdefault(rid, s) != s:
            continue
        if s not in seen_seq:
            seen_seq.add(s)
            kept[rid] = s
    return kept, len(records)


def check_clusters(got: dict) -> None:
    """Cluster fields are consistent over the whole corpus and every cluster lies in one split."""
    from collections import defaultdict

    members = defaultdict(list)
    for _, split, cid, size, idx in got.values():
        members[cid].append((split, size, idx))
    for cid, rows in members.items():
        assert len({r[0] for r in rows}) == 1, f"cluster {cid} spans splits"
        assert {r[1] for r in rows} == {len(rows)}, f"cluster {cid}: size field != members"
        assert sorted(r[2] for r in rows) == list(range(len(rows))), f"cluster {cid}: index_in_cluster"
