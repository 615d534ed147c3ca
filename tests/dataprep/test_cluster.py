"""dataprep.cluster: MMseqs2's names and outputs, its steps against `mmseqs easy-linclust`, the holdout search."""
from __future__ import annotations

import gzip
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dataprep import cluster as clustering
from dataprep.cluster import (ClusterConfig, _decimal, assign, fasta_block, linked_pairs, name_width, parse_cluster_tsv,
                              parse_hits, parse_pairs, run_linclust, run_mmseqs, search_db)
from dataprep.errors import ToolError
from dataprep.store import Store
from tests.conftest import require_tool
from tests.dataprep.helpers import build_small

COMPLEMENT = {"A": "U", "C": "G", "G": "C", "U": "A"}


@pytest.mark.parametrize("n", [1, 2, 10, 11, 100, 101, 1000])
def test_every_position_gets_a_distinct_name_that_parses_back(tmp_path, monkeypatch, n):
    monkeypatch.setattr(clustering, "ROWS_PER_CHUNK", 7)  # (parsed in chunks, the last one partial)
    positions = np.arange(n)
    w = name_width(n)
    assert w == len(str(n - 1))
    names = _decimal(positions, w)
    assert len({bytes(row) for row in names}) == n
    out = tmp_path / "pairs.tsv"
    out.write_bytes(b"".join(bytes(row) + b"\t" + bytes(row) + b"\n" for row in names))
    assert parse_pairs(out, w, "pairs").tolist() == [[i, i] for i in range(n)]


def test_fasta_block_writes_a_header_and_a_line_per_record():
    seq = np.frombuffer(b"ACGUGGA", np.uint8)
    off = np.array([0, 3, 3, 7])
    assert fasta_block(_decimal(np.array([7, 8, 9]), 2), seq, off).tobytes() == b">07\nACG\n>08\n\n>09\nUGGA\n"


@pytest.mark.parametrize("rows_per_chunk", [1, 3, 1 << 20])
def test_search_hits_link_at_the_coverage_of_either_sequence(tmp_path, monkeypatch, rows_per_chunk):
    monkeypatch.setattr(clustering, "ROWS_PER_CHUNK", rows_per_chunk)
    out = tmp_path / "pairs.tsv"
    out.write_text("03\t11\t0.800\t0.150\n04\t12\t0.150\t1.000\n05\t13\t0.799\t0.799\n06\t14\t0.810\t0.900\n")
    assert parse_hits(out, 2, 0.8).tolist() == [[3, 11], [4, 12], [6, 14]]
    assert parse_hits(out, 2, 0.9).tolist() == [[4, 12], [6, 14]]
    out.write_text("")
    assert parse_hits(out, 2, 0.8).shape == (0, 2)
    for bad in ("04\t12\t0.15\t1.000\n", "04\t1a\t0.150\t1.000\n", "04\t12\t0.150\t1.00 \n", "04\t12\t0,150\t1.000\n",
                "04 12\t0.150\t1.000\n", "04\t12\t0.150"):
        out.write_text("03\t11\t0.800\t0.150\n" * 3 + bad + "05\t13\t0.799\t0.799\n" * (len(bad) > 14))
        named = f"{out}: line 4: unexpected MMseqs2 search output {str(bad[:5].encode())[:-1]}"
        with pytest.raises(ToolError, match=re.escape(named)):
            parse_hits(out, 2, 0.8)


def test_mmseqs_steps_marked_done_are_skipped_and_those_that_succeed_are_marked(tmp_path):
    fake = tmp_path / "mmseqs"
    fake.write_text(f'#!/bin/sh\necho "$1" >> {tmp_path}/calls\n[ "$1" != d ]\n')
    fake.chmod(0o755)
    log = tmp_path / "mmseqs.log"
    log.write_bytes(b"[=====")  # an earlier run's, killed in a progress bar
    (tmp_path / "a.done").touch()
    marks = [tmp_path / f"{step}.done" for step in "abd"]
    with pytest.raises(ToolError, match="mmseqs d failed"):
        run_mmseqs([[str(fake), step] for step in "abcd"], log, [marks[0], marks[1], None, marks[2]])
    assert (tmp_path / "calls").read_text().split() == ["b", "c", "d"]
    assert marks[1].exists() and not marks[2].exists()
    assert log.read_text().startswith(f"[=====\n# finished by an earlier run (a.done), not run again: {fake} a\n$ ")


def test_a_cluster_tsv_must_list_every_record_once(tmp_path):
    tsv = tmp_path / "cluster.tsv"
    tsv.write_text("0\t0\n0\t1\n2\t2\n")
    assert parse_cluster_tsv(tsv, 3, 1).tolist() == [0, 0, 2]
    for bad in ("0\t0\n0\t1\n", "0\t0\n0\t1\n0\t1\n", "0\t0\n0\t1\n3\t2\n", "0\t0\n0\t1\n0\t3\n",
                "0\t0\n0\t1\n2\t2\n2\t2\n"):
        tsv.write_text(bad)
        with pytest.raises(ToolError, match="does not list every input sequence exactly once"):
            parse_cluster_tsv(tsv, 3, 1)


@pytest.mark.system
@pytest.mark.parametrize("cov_mode", [None, 1])
def test_the_linclust_steps_cluster_as_mmseqs_easy_linclust_does(tmp_path, ncrna_fasta, cov_mode):
    """The pipeline runs the steps of easy-linclust itself (not its FASTA outputs): the same clusters as the
    command, at MMseqs2's own --cov-mode and another. On these 3,000 records, easy-linclust's --spaced-kmer-mode 1
    moves 484 records to another representative, --cov-mode 1 707."""
    require_tool("mmseqs")
    records = gzip.open(ncrna_fasta, "rt").read().split(">")[1:]
    pick = np.sort(np.random.default_rng(3).permutation(len(records))[:3000])
    fasta = tmp_path / "in.fa"
    fasta.write_text("".join(f">{j:04d}\n{''.join(records[i].split(chr(10))[1:])}\n" for j, i in enumerate(pick)))
    cfg = ClusterConfig(threads=1, cov_mode=cov_mode)
    ours = parse_cluster_tsv(run_linclust([fasta], tmp_path / "work", cfg, tmp_path / "mmseqs.log"), 3000, 4)
    mode = [] if cov_mode is None else ["--cov-mode", str(cov_mode)]
    subprocess.run(["mmseqs", "easy-linclust", str(fasta), str(tmp_path / "ref"), str(tmp_path / "tmp"),
                    "--threads", "1", "--min-seq-id", str(cfg.min_seq_id), "-c", str(cfg.coverage), *mode, "-v", "1"],
                   check=True, capture_output=True)
    ref = parse_cluster_tsv(tmp_path / "ref_cluster.tsv", 3000, 4)
    assert len(np.unique(ours)) < 2950  # (clusters that join records, so the comparison can fail)
    # a few records of slack: MMseqs2's k-mer matching now and then misses a member under CPU load
    assert np.count_nonzero(ours != ref) <= 10, np.count_nonzero(ours != ref)


@pytest.mark.system
def test_clustering_leaves_no_sequences_on_disk(tmp_path: Path):
    """`cluster` keeps only its arrays: the FASTA input and MMseqs2's working folder are removed."""
    require_tool("mmseqs")
    a = "".join(np.random.default_rng(6).choice(list("ACGU"), 120))
    (tmp_path / "in.fa").write_text(f">a\n{a}\n>b\n{a[:60]}G{a[61:]}\n")
    res = build_small(tmp_path, [tmp_path / "in.fa"], no_cluster=False, valid_fraction=0.0,
                      cluster=ClusterConfig(threads=1))
    assert res.manifest.counts["clusters"] == 1
    work = tmp_path / "out" / ".work" / "cluster"
    assert sorted(p.name for p in work.iterdir() if p.suffix not in (".npy", ".json")) == ["mmseqs.log"]


def test_assign_numbers_clusters_by_representative_and_members_in_kept_order():
    rng = np.random.default_rng(0)
    reps = np.sort(rng.choice(5000, 40, replace=False))
    rep = rng.choice(reps, 5000)
    rep[reps] = reps  # a representative is a member of its own cluster
    got = assign(rep)
    assert got.cluster_id.tolist() == np.searchsorted(reps, rep).tolist()
    seen: dict[int, int] = {}
    for i, r in enumerate(rep.tolist()):
        assert got.index_in_cluster[i] == seen.get(r, 0)
        seen[r] = seen.get(r, 0) + 1
    assert got.cluster_size.tolist() == [seen[r] for r in rep.tolist()]


@pytest.mark.system
def test_a_rank_left_without_queries_searches_nothing(tmp_path):
    """Each rank searches every ranks-th query of a group of cluster sizes: with one query and two ranks, the second
    rank has none (MMseqs2 refuses an empty query file) and returns no pairs; the first finds the query itself and
    its near copy."""
    require_tool("mmseqs")
    rng = np.random.default_rng(5)
    a = rng.choice(list("ACGU"), 200)
    b = a.copy()
    b[::40] = [COMPLEMENT[x] for x in b[::40]]
    c = rng.choice(list("ACGU"), 200)
    (tmp_path / "in.fa").write_text("".join(f">{n}\n{''.join(s)}\n" for n, s in zip("abc", (a, b, c))))
    build_small(tmp_path, [tmp_path / "in.fa"], no_cluster=False, valid_fraction=0.0, cluster=ClusterConfig(threads=1))
    work = tmp_path / "out" / ".work"
    store, keep = Store(work / "normalise"), np.load(work / "dedup" / "keep.npy")
    cfg, scratch, log = ClusterConfig(threads=1), tmp_path / "scratch", tmp_path / "search.log"
    search_db(store, keep, scratch, log, cfg)
    sizes = np.array([2])  # (per query)
    assert linked_pairs(store, keep, np.array([0]), sizes, scratch, log, cfg, (1, 2)).shape == (0, 2)
    assert sorted(map(tuple, linked_pairs(store, keep, np.array([0]), sizes, scratch, log, cfg, (0, 2)).tolist())) \
        == [(0, 0), (0, 1)]


def test_ranks_sharing_a_node_share_its_memory_in_the_holdout_search():
    """MMseqs2 sizes its k-mer index for all of the node's memory in each process unless told otherwise."""
    from dataprep.cluster import search_memory_limit

    assert search_memory_limit(1) is None
    available_mib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:")) / 1024
    for ranks in (2, 8):
        limit = search_memory_limit(ranks)
        assert limit.endswith("M") and abs(int(limit[:-1]) * ranks / (0.8 * available_mib) - 1) < 0.05
