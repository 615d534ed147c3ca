"""Dataprep benchmark: records/s and peak memory per stage, and the whole pipeline vs MMseqs2 alone.

    python bench/dataprep_bench.py --records 1000000 --seed 1 --work /tmp/dpbench
    python bench/dataprep_bench.py --fasta ../shared/data/ncrna/ncrna_corpus.fasta.gz --work /tmp/dpbench

Measures (each in a fresh process, wall time with a warm page cache, peak RSS from /usr/bin/time):
1. normalise + exact dedup in one process (`--workers 1`; its two helper threads hash the input and write the
   store): records in / wall s, and records in / CPU s of the process (all its threads);
   dedup memory = tracemalloc peak of the dedup stage / records (numpy buffers are traced);
2. the whole pipeline (`build_shards.py`, MMseqs2 clustering, 2 workers, report): wall s, and the
   same minus the wall time of the mmseqs processes themselves (= "pipeline excluding MMseqs2"); and the
   pipeline run without clustering (`--no-cluster`: the other reading of "excluding MMseqs2");
3. MMseqs2 alone: `mmseqs easy-linclust` on the same deduplicated sequences with the same threads (what a user
   runs by hand), and the createdb + linclust + createtsv steps the pipeline runs (`cluster.linclust_steps`).
The summary line gives pipeline / MMseqs2-alone. Results are printed as JSON (and appended to WORK/results.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TIME_FMT = "TIME wall=%e user=%U sys=%S maxrss_kb=%M"


def timed(cmd: list[str], **kw) -> dict:
    """Run under /usr/bin/time; returns wall/user/sys seconds, peak RSS bytes and stdout."""
    r = subprocess.run(["/usr/bin/time", "-f", TIME_FMT, *cmd], capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    line = [x for x in r.stderr.splitlines() if x.startswith("TIME ")][-1]
    f = dict(kv.split("=") for kv in line.split()[1:])
    return {"wall_s": float(f["wall"]), "cpu_s": float(f["user"]) + float(f["sys"]),
            "peak_rss_bytes": int(f["maxrss_kb"]) * 1024, "stdout": r.stdout}


def stage_normdedup(fasta: str, out: str) -> dict:
    """Child process: normalise + dedup only (no clustering, no shards)."""
    import tracemalloc

    from dataprep.comm import SerialComm
    from dataprep.pipeline import BuildConfig, Log, _Stage, dedup, normalise
    from dataprep.store import Store

    shutil.rmtree(out, ignore_errors=True)
    work = Path(out) / ".work"
    work.mkdir(parents=True)
    cfg = BuildConfig(inputs=(fasta,), out=out, quiet=True, workers=1)  # one process (the default forks a second)
    t0, c0 = time.perf_counter(), time.process_time()
    normalise(cfg, _Stage(work, "normalise", "bench"), SerialComm(), Log(True, 0))
    t1, c1 = time.perf_counter(), time.process_time()
    store = Store(work / "normalise")
    dedup(store, _Stage(work, "dedup", "bench"), SerialComm(), cfg.dedup_bucket_records)
    t2, c2 = time.perf_counter(), time.process_time()
    records_in = sum(s["records"] for s in json.loads((work / "normalise" / "sources.json").read_text()))
    store = Store(work / "normalise")  # memory: a second dedup run with tracemalloc on
    tracemalloc.start()
    dedup(store, _Stage(work, "dedup", "bench2"), SerialComm(), cfg.dedup_bucket_records)
    dedup_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"records_in": records_in, "valid": len(store), "normalise_wall_s": t1 - t0, "normalise_cpu_s": c1 - c0,
            "dedup_wall_s": t2 - t1, "dedup_cpu_s": c2 - c1, "dedup_traced_peak_bytes": dedup_peak}


def bench(fasta: Path, work: Path, threads: int, workers: int) -> dict:
    res: dict = {"input": str(fasta), "input_bytes": fasta.stat().st_size}
    nd = timed([sys.executable, __file__, "--stage", "normdedup", "--fasta", str(fasta), "--work", str(work / "nd")])
    s = json.loads(nd["stdout"])
    n = s["records_in"]
    res["normalise_dedup"] = {
        **s, "process_wall_s": nd["wall_s"], "process_peak_rss_bytes": nd["peak_rss_bytes"],
        "records_per_s_wall": n / (s["normalise_wall_s"] + s["dedup_wall_s"]),
        "records_per_s_cpu": n / (s["normalise_cpu_s"] + s["dedup_cpu_s"]),  # one process, all its threads
        "dedup_bytes_per_record": s["dedup_traced_peak_bytes"] / n}
    shutil.rmtree(work / "nd", ignore_errors=True)

    out = work / "build"
    shutil.rmtree(out, ignore_errors=True)
    b = timed([sys.executable, str(REPO / "dataprep" / "build_shards.py"), "--input", str(fasta), "--out", str(out),
               "--threads", str(threads), "--workers", str(workers), "--quiet"])
    summary = json.loads((out / "report" / "summary.json").read_text())
    mm, mm_cpu = summary["stage_seconds"]["mmseqs"], summary["stage_seconds"]["mmseqs_cpu"]
    res["pipeline"] = {"wall_s": b["wall_s"], "cpu_s": b["cpu_s"], "peak_rss_bytes": b["peak_rss_bytes"],
                       "stage_seconds": summary["stage_seconds"], "mmseqs_in_pipeline_s": mm,
                       "excluding_mmseqs_s": b["wall_s"] - mm, "records_per_s_excluding_mmseqs": n / (b["wall_s"] - mm),
                       "excluding_mmseqs_cpu_s": b["cpu_s"] - mm_cpu,
                       "records_per_cpu_s_excluding_mmseqs": n / (b["cpu_s"] - mm_cpu),
                       "counts": summary["counts"], "shard_bytes": summary["shards"]["bytes"]}

    nc = timed([sys.executable, str(REPO / "dataprep" / "build_shards.py"), "--input", str(fasta), "--out",
                str(work / "build_nc"), "--no-cluster", "--workers", str(workers), "--quiet"])
    res["pipeline_no_cluster"] = {"wall_s": nc["wall_s"], "cpu_s": nc["cpu_s"], "records_per_s": n / nc["wall_s"],
                                  "stage_seconds": json.loads((work / "build_nc" / "report" / "summary.json")
                                                              .read_text())["stage_seconds"]}
    shutil.rmtree(work / "build_nc", ignore_errors=True)

    from dataprep.cluster import ClusterConfig, linclust_steps, write_input
    from dataprep.store import Store
    import numpy as np

    alone = work / "mmseqs_alone"
    shutil.rmtree(alone, ignore_errors=True)
    alone.mkdir(parents=True)
    keep = np.load(out / ".work" / "cluster" / "keep.npy")
    write_input(Store(out / ".work" / "normalise"), keep, [alone / "dedup.fa"])
    m = timed(["mmseqs", "easy-linclust", str(alone / "dedup.fa"), str(alone / "clu"), str(alone / "tmp"),
               "--min-seq-id", "0.7", "-c", "0.8", "--threads", str(threads), "--dbtype", "2"])
    clusters = len({line.split("\t", 1)[0] for line in open(alone / "clu_cluster.tsv")})
    res["mmseqs_alone"] = {"sequences": len(keep), "wall_s": m["wall_s"], "cpu_s": m["cpu_s"],
                           "peak_rss_bytes": m["peak_rss_bytes"], "clusters": clusters}
    res["pipeline_over_mmseqs_alone"] = b["wall_s"] / m["wall_s"]
    res["pipeline_over_mmseqs_alone_cpu"] = b["cpu_s"] / m["cpu_s"]
    (alone / "steps").mkdir()
    steps = [timed(cmd) for cmd in linclust_steps("mmseqs", [alone / "dedup.fa"], alone / "steps",
                                                  ClusterConfig(threads=threads))]
    res["mmseqs_steps_alone"] = {"wall_s": sum(s["wall_s"] for s in steps), "cpu_s": sum(s["cpu_s"] for s in steps)}
    res["pipeline_over_mmseqs_steps_alone"] = b["wall_s"] / res["mmseqs_steps_alone"]["wall_s"]
    shutil.rmtree(alone, ignore_errors=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="synthetic records (ignored with --fasta)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--fasta", help="benchmark this FASTA instead of a synthetic one")
    p.add_argument("--work", default="/tmp/dataprep_bench")
    p.add_argument("--threads", type=int, default=2, help="MMseqs2 threads")
    p.add_argument("--workers", type=int, default=2, help="build_shards.py --workers")
    p.add_argument("--stage", choices=["normdedup"], help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.stage:
        print(json.dumps(stage_normdedup(a.fasta, a.work)))
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    if a.fasta:
        fasta = Path(a.fasta).resolve()
    else:
        fasta = work / f"synth_{a.records}_s{a.seed}.fa"
        if not fasta.exists():
            from dataprep.synth import SynthConfig, write_fasta

            t = time.perf_counter()
            write_fasta(SynthConfig(a.records, seed=a.seed), fasta)
            print(f"generated {fasta} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    subprocess.run(["cat", str(fasta)], stdout=subprocess.DEVNULL, check=True)  # warm the page cache
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(), **bench(fasta, work, a.threads, a.workers)}
    with open(work / "results.jsonl", "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res, indent=1))
    nd, pl = res["normalise_dedup"], res["pipeline"]
    print(f"\nnormalise+dedup: {nd['records_per_s_wall'] / 1e6:.2f} M rec/s wall, "
          f"{nd['records_per_s_cpu'] / 1e6:.2f} M rec/s per CPU s, dedup {nd['dedup_bytes_per_record']:.1f} B/record; "
          f"pipeline excl. MMseqs2: {pl['records_per_s_excluding_mmseqs'] / 1e3:.0f} k rec/s wall, "
          f"{pl['records_per_cpu_s_excluding_mmseqs'] / 1e3:.0f} k rec/CPU s; --no-cluster pipeline "
          f"{res['pipeline_no_cluster']['records_per_s'] / 1e3:.0f} k rec/s wall; pipeline {pl['wall_s']:.1f} s vs "
          f"MMseqs2 alone {res['mmseqs_alone']['wall_s']:.1f} s = {res['pipeline_over_mmseqs_alone']:.3f}x wall, "
          f"{res['pipeline_over_mmseqs_alone_cpu']:.3f}x CPU; vs the same MMseqs2 steps alone "
          f"{res['mmseqs_steps_alone']['wall_s']:.1f} s = {res['pipeline_over_mmseqs_steps_alone']:.3f}x wall")


if __name__ == "__main__":
    main()
