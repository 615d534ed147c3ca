"""The CPU benchmarks (bench/loader_bench.py, bench/dataprep_bench.py) at a tiny size: they run, and the numbers they
report are computed from what they measured (speeds themselves are not asserted: they live in BENCHMARKS.md)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, require_tool


def bench(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, f"bench/{script}", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_loader_bench_rows_agree_with_each_other_and_the_table(tmp_path):
    out = bench("loader_bench.py", "--synthetic", "3000", "--build", str(tmp_path / "shards"), "--workers", "0", "1",
                "--batches", "20", "--warmup", "20", "--token-budget", "2048", "--out", str(tmp_path / "rows.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "rows.jsonl").read_text().splitlines()]
    assert [r["workers"] for r in rows] == [0, 1]
    assert rows[0]["fill"] == rows[1]["fill"] and 0.8 < rows[0]["fill"] <= 1  # one stream either way: same batches
    for r in rows:
        assert r["tokens_per_s_per_worker"] == r["tokens_per_s"]  # 0 workers: the calling process is the one
        assert 100 < r["tokens_per_s"] / r["samples_per_s"] < 200  # ~120 nt records with <cls> and <eos>
        assert r["x_trainer_target"] == pytest.approx(r["tokens_per_s"] / 200_000, abs=0.06)
        assert f"| {r['workers']} | {r['samples_per_s']:,} | {r['tokens_per_s']:,} |" in out
    again = bench("loader_bench.py", "--shards", str(tmp_path / "shards"), "--workers", "2", "--batches", "20",
                  "--warmup", "2", "--token-budget", "2048")
    cells = again.splitlines()[-1].split("|")[1:-1]
    workers, _, tokens_per_s, _, per_worker = (int(c.replace(",", "")) for c in cells[:5])
    assert workers == 2 and abs(per_worker - tokens_per_s / 2) <= 1  # the shards built above, read by two workers
    assert float(cells[-1]) == round(tokens_per_s / 200_000, 1)


def test_dataprep_bench_compares_the_pipeline_with_mmseqs2_alone_on_the_same_sequences(tmp_path):
    require_tool("mmseqs")
    bench("dataprep_bench.py", "--records", "3000", "--work", str(tmp_path))
    res = json.loads((tmp_path / "results.jsonl").read_text())
    counts = res["pipeline"]["counts"]
    assert res["normalise_dedup"]["records_in"] == counts["records_in"] == 3000
    assert res["normalise_dedup"]["valid"] == 3000 - counts["rejected"]
    assert res["mmseqs_alone"]["sequences"] == counts["kept"] == 3000 - counts["rejected"] - counts["duplicates"]
    assert res["mmseqs_alone"]["clusters"] == counts["clusters"]  # the pipeline clusters as MMseqs2 run by hand
    assert res["pipeline_over_mmseqs_alone"] == res["pipeline"]["wall_s"] / res["mmseqs_alone"]["wall_s"]
    assert res["pipeline"]["excluding_mmseqs_s"] == pytest.approx(
        res["pipeline"]["wall_s"] - res["pipeline"]["stage_seconds"]["mmseqs"])
    assert 0 < res["pipeline"]["stage_seconds"]["mmseqs"] < res["pipeline"]["wall_s"]
