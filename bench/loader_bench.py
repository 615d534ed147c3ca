"""The pretraining data loader alone: samples/s and tokens/s, in total and per worker.

    python bench/loader_bench.py --fasta ../shared/data/ncrna/ncrna_corpus.fasta.gz --build /tmp/ncrna_shards
    python bench/loader_bench.py --synthetic 2000000 --build /tmp/syn_shards
    python bench/loader_bench.py --shards DIR [--workers 0 1 2 4] [--batches 600] [--token-budget 8192]

--fasta builds the shards with dataprep/build_shards.py (the real pipeline) unless --build already holds a
manifest; --synthetic writes random ncRNA-like records (log-normal lengths, mean ~120 nt, clusters of 1..8).
Each configuration iterates a fresh PretrainLoader: the first --warmup batches (worker start-up, first
shard reads) are not timed, then --batches batches are. tokens = real tokens delivered (incl. <cls>/<eos>;
packed, so there is no padding); per worker = total / max(1, workers). The loader target (issue 7) is >= 5x
what the trainer consumes (~200k tokens/s for giga on one H100), i.e. >= 1M tokens/s per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pretrain.data import DataConfig, PretrainLoader  # noqa: E402
from pretrain.data.synthetic import synthetic_corpus, write_shards  # noqa: E402

TRAINER_TOKENS_PER_S = 200_000


def build(args) -> Path:
    out = Path(args.build or args.shards)
    if (out / "manifest.json").exists():
        return out
    if args.fasta:
        cmd = [sys.executable, str(REPO / "dataprep" / "build_shards.py"), "--input", args.fasta, "--out", str(out)]
        print("building:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True, cwd=REPO)
    else:
        corpus = synthetic_corpus(args.synthetic, seed=0, valid_fraction=0.01)
        write_shards(out, **corpus, records_per_shard=200_000, block_records=4096)
    return out


def measure(shards: Path, workers: int, args) -> dict:
    cfg = DataConfig(str(shards), sampling=args.sampling, token_budget=args.token_budget, num_workers=workers,
                     seed=0)
    loader = PretrainLoader(cfg)
    it = iter(loader)
    t_start = time.perf_counter()
    for _ in range(args.warmup):
        next(it)
    t0 = time.perf_counter()
    s0, k0 = loader.stats["samples"], loader.stats["tokens"]
    for _ in range(args.batches):
        next(it)
    dt = time.perf_counter() - t0
    samples, tokens = loader.stats["samples"] - s0, loader.stats["tokens"] - k0
    per = max(1, workers)
    return {"workers": workers, "sampling": args.sampling, "token_budget": args.token_budget,
            "batches": args.batches, "seconds": round(dt, 3), "startup_s": round(t0 - t_start, 3),
            "samples_per_s": round(samples / dt), "tokens_per_s": round(tokens / dt),
            "samples_per_s_per_worker": round(samples / dt / per), "tokens_per_s_per_worker": round(tokens / dt / per),
            "fill": round(tokens / (args.batches * args.token_budget), 4),
            "x_trainer_target": round(tokens / dt / TRAINER_TOKENS_PER_S, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="an existing dataprep output dir")
    src.add_argument("--fasta", help="build shards from this FASTA with dataprep/build_shards.py")
    src.add_argument("--synthetic", type=int, help="write this many synthetic records")
    p.add_argument("--build", help="where --fasta/--synthetic shards go (reused when a manifest is there)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sampling", default="cluster", choices=["cluster", "uniform"])
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--batches", type=int, default=600)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--out", help="append the JSON results here")
    args = p.parse_args()
    if (args.fasta or args.synthetic) and not args.build:
        p.error("--fasta/--synthetic need --build DIR")
    shards = build(args)
    print(f"shards: {shards}  cpus: {os.cpu_count()}", file=sys.stderr)
    results = []
    for workers in args.workers:  # each row appended as measured: a run killed at its time limit keeps the rest
        results.append(measure(shards, workers, args))
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"shards": str(shards), **results[-1]}) + "\n")
    print(f"token_budget {args.token_budget}, sampling {args.sampling}, {args.batches} batches")
    print("| workers | samples/s | tokens/s | samples/s per worker | tokens/s per worker | batch fill | x 200k tok/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['workers']} | {r['samples_per_s']:,} | {r['tokens_per_s']:,} | {r['samples_per_s_per_worker']:,} "
              f"| {r['tokens_per_s_per_worker']:,} | {r['fill']:.3f} | {r['x_trainer_target']} |")


if __name__ == "__main__":
    main()
