"""Issue 6 step 10: pretrain micro (or --preset nano) on the ncRNA corpus (bpRNA-sourced records and every copy or
near-duplicate of a TS0 test sequence removed), convert, fine-tune secondary structure on bpRNA TR0 (VL0 for
threshold and checkpoint choice), score TS0 beside RNAfold and beside the same head on a randomly initialised model
of the same size. Each stage is one command (each fits the 10-minute limit of the lent GPU machine); outputs go to
WORK (default bench_out/e2e, not tracked).

    python bench/finetune_gpu_e2e.py --stage data       # FASTA without bpRNA records -> dataprep shards
    python bench/finetune_gpu_e2e.py --stage pretrain   # 1 rank, DeepSpeed ZeRO-3, bf16 on a GPU
    python bench/finetune_gpu_e2e.py --stage convert    # ZeRO checkpoint -> model.safetensors + config.json
    python bench/finetune_gpu_e2e.py --stage ft         # fine-tune the converted model on bpRNA TR0
    python bench/finetune_gpu_e2e.py --stage ft-random  # the same head on a random model
    python bench/finetune_gpu_e2e.py --stage table      # WORK/table.md: TS0 rows for both + RNAfold
    python bench/finetune_gpu_e2e.py --stage all        # everything in order (both fine-tunes in parallel)

Several stages run in the pipeline's order, both fine-tunes in parallel, e.g. another seed on the same pretrained
model: `--stage ft ft-random table --ft-set train.seed=1`.

On the lent GPU machine everything must happen in one call (its disk is gone after the call; the converted
checkpoint is too large to come back), within 10 minutes: --pretrain-seconds and --ft-seconds bound the two
long stages, e.g. `--stage all --pretrain-seconds 270 --ft-seconds 150 --export $OUT`.

On a CPU, e.g. `--preset nano --pretrain-steps 1000 --pretrain-set data.token_budget=4096 --pretrain-set
data.num_workers=1 --pretrain-set optim.lr=1e-3` (BENCHMARKS.md, "Fine-tuning").
`--tiny` runs the same pipeline with a 2-layer model and a handful of steps on CPU (smoke test of the script).
`--export DIR` copies the few result files (logs, results JSON, table) flat into DIR (e.g. the device's $OUT)
after every stage, so a kill during a later one keeps them.
RNAfold (ViennaRNA) runs where it is installed; if the fine-tune stage ran without it, `--stage table` adds
the RNAfold row on the same TS0 records (run it on the CPU machine, beside the fetched results).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("RNALM_SHARED_DATA", REPO.parent / "shared" / "data"))
STAGES = ("data", "pretrain", "convert", "ft", "ft-random", "table")


def sh(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True)


def stage_data(work: Path, args) -> None:
    """The corpus without what the fine-tuned model is tested on, then shards."""
    from finetune.tasks.ss import SSDataConfig, load_splits

    dst = work / "ncrna_no_bprna.fa"
    test = [r.sequence for r in load_splits(SSDataConfig(root=str(DATA))).test]
    kept, bprna, near_test = write_pretraining_fasta(DATA / "ncrna" / "ncrna_corpus.fasta.gz", dst, test)
    print(f"kept {kept} records, dropped {bprna} bpRNA-sourced records and {near_test} copies or near-duplicates of "
          f"TS0 test sequences from other sources -> {dst}")
    cmd = [sys.executable, "dataprep/build_shards.py", "--input", str(dst), "--out", str(work / "shards"),
           "--valid-fraction", "0.02", "--label-key", "rfam_acc"]
    if shutil.which("mmseqs") is None:
        print("mmseqs not found: every record is its own cluster (--no-cluster)")
        cmd.append("--no-cluster")
    sh(cmd)


def write_pretraining_fasta(src: Path, dst: Path, test: list[str]) -> tuple[int, int, int]:
    """Drop the source=bpRNA1m90 records (the same molecules as the bpRNA structure set) and every record that is
    a copy or near-duplicate (finetune.neardup) of a test sequence: Rfam seeds and nRC hold some of TS0's.
    Returns (kept, dropped as bpRNA, dropped as near a test sequence)."""
    from finetune.neardup import near_duplicate_mask
    from finetune.structure import read_fasta

    records = read_fasta(src)
    others = [r for r in records if "source=bpRNA1m90" not in r.description]
    near = near_duplicate_mask([r.sequence for r in others], test)
    with open(dst, "w") as out:
        out.writelines(f">{r.id} {r.description}\n{r.sequence}\n" for r, drop in zip(others, near) if not drop)
    return len(others) - int(near.sum()), len(records) - len(others), int(near.sum())


def stage_pretrain(work: Path, args) -> None:
    """One rank, plain python (the trainer sets up a 1-rank group). A wall-clock budget ends it with SIGTERM:
    the trainer saves a checkpoint at the next step and exits 0, so the stages after it still run."""
    config = "pretrain/configs/tiny_cpu.yaml" if args.tiny else f"pretrain/configs/{args.preset}.yaml"
    steps = args.pretrain_steps or (30 if args.tiny else 2000)
    cmd = [sys.executable, "-m", "pretrain.train", "--config", config, f"--data.shards={work / 'shards'}",
           f"--train.out_dir={work / 'pretrain'}", f"--train.max_steps={steps}",
           f"--optim.warmup_steps={max(steps // 10, 1)}", f"--checkpoint.every={steps}",
           f"--train.valid_every={steps}", *(["--data.num_workers=0"] if args.tiny else []),
           *(f"--{kv}" for kv in args.pretrain_set)]
    if args.pretrain_seconds:
        cmd = ["timeout", "--preserve-status", "-s", "TERM", "-k", "120", str(args.pretrain_seconds), *cmd]
    sh(cmd)


def stage_convert(work: Path, args) -> None:
    sh([sys.executable, "-m", "pretrain.convert", str(work / "pretrain"), str(work / "converted")])


def finetune_cmd(work: Path, args, random: bool) -> list[str]:
    out = work / ("ss_random" if random else "ss_pretrained")
    model = ([f"--model.random_preset={'nano' if args.tiny else args.preset}"]
             + (['--model.overrides={dim: 64, num_layers: 2, num_heads: 4}'] if args.tiny else [])
             if random else [f"--model.path={work / 'converted'}"])
    rnafold = not random and importlib.util.find_spec("RNA") is not None
    quick = (["--data.limit_train=64", "--data.limit_valid=16", "--data.limit_test=16", "--train.epochs=2"]
             if args.tiny else [f"--train.epochs={args.ft_epochs}"])
    return [sys.executable, "-m", "finetune", "ss", "train", *model, f"--data.root={DATA}", "--data.dataset=bprna",
            f"--train.out_dir={out}", "--train.batch_size=8", f"--train.max_seconds={args.ft_seconds}",
            "--train.lr=5e-4", "--train.lr_decay_steps=6000", "--train.precision=bf16", "--train.progress=false",
            "--unfreeze.head_only_epochs=1", "--unfreeze.every=1", "--unfreeze.blocks_per_step=4",
            "--unfreeze.max_blocks=12", f"--eval.rnafold={str(rnafold).lower()}", *quick,
            *(f"--{kv}" for kv in args.ft_set)]


def finetune_both(work: Path, args) -> None:
    """Both fine-tunes at once, each with half the CPU cores for torch's threads: with torch's default (a thread
    per core in each) the two ran 2.3x slower on 2 cores (BENCHMARKS.md, "The same comparison at CPU scale")."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // 2)))
    procs = [subprocess.Popen(finetune_cmd(work, args, random=r), cwd=REPO, env=env) for r in (False, True)]
    if any([p.wait() != 0 for p in procs]):  # both waited for: the other's results come back too
        sys.exit("a fine-tune failed")


def stage_table(work: Path, args) -> None:
    from finetune.results import markdown_table, write_json

    pre = json.loads((work / "ss_pretrained" / "results.json").read_text())
    rnd = json.loads((work / "ss_random" / "results.json").read_text())
    rows = {f"{k} (pretrained on ncRNA without bpRNA)": v for k, v in pre["rows"].items() if k != "RNAfold"}
    rows.update({k: v for k, v in rnd["rows"].items() if k != "RNAfold"})
    if "RNAfold" in pre["rows"]:
        rows["RNAfold"] = pre["rows"]["RNAfold"]
    else:  # fine-tuned where ViennaRNA is missing: score RNAfold here on the same TS0 records
        from finetune.tasks.ss import SSDataConfig, load_splits, rnafold_row
        limit = pre["splits"]["test"]
        rows["RNAfold"] = rnafold_row(load_splits(SSDataConfig(root=str(DATA), limit_test=limit)).test)
    table = markdown_table(rows, ("n", "f1", "f1_shift", "precision_shift", "recall_shift", "threshold"), "model")
    (work / "table.md").write_text(table)
    write_json({"rows": rows, "pretrained_history": pre["history"], "random_history": rnd["history"]},
               work / "table.json")
    print(table)


OUTPUTS = ("ncrna_no_bprna.fa", "shards", "pretrain", "converted", "ss_pretrained", "ss_random", "table.md",
           "table.json")


def clear_outputs(work: Path) -> None:
    """--stage all is a fresh experiment: an earlier run's pretrain/ would be resumed (or refused, the shards
    rebuilt) and its results reported as this run's."""
    for name in OUTPUTS:
        path = work / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def export(work: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for src, name in ((work / "pretrain" / "log.jsonl", "pretrain_log.jsonl"),
                      (work / "converted" / "config.json", "converted_config.json"),
                      (work / "ss_pretrained" / "results.json", "ss_pretrained_results.json"),
                      (work / "ss_random" / "results.json", "ss_random_results.json"),
                      (work / "table.md", "table.md")):
        if src.exists():
            shutil.copy(src, dest / name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stage", nargs="+", choices=(*STAGES, "all"), default=["all"],
                    help="the stages to run (in the pipeline's order, whatever the order given)")
    ap.add_argument("--work", type=Path, default=REPO / "bench_out" / "e2e")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run with a 2-layer model")
    ap.add_argument("--preset", choices=("nano", "micro"), default="micro", help="model pretrained and fine-tuned")
    ap.add_argument("--pretrain-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="trainer override (repeatable), e.g. data.token_budget=4096 for a CPU run")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--ft-epochs", type=int, default=12)
    ap.add_argument("--pretrain-seconds", type=int, default=None, help="wall-clock budget of the pretrain stage")
    ap.add_argument("--ft-seconds", type=int, default=240, help="training-time budget of each fine-tune")
    ap.add_argument("--ft-set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override of both fine-tunes (repeatable, after the defaults), e.g. train.seed=1")
    ap.add_argument("--export", type=Path, default=None, help="copy the result files flat into this directory")
    args = ap.parse_args()
    if "all" in args.stage:
        clear_outputs(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    run = {"data": stage_data, "pretrain": stage_pretrain, "convert": stage_convert,
           "ft": lambda w, a: sh(finetune_cmd(w, a, random=False)),
           "ft-random": lambda w, a: sh(finetune_cmd(w, a, random=True)), "table": stage_table}
    stages = [s for s in STAGES if s in args.stage or "all" in args.stage]
    for stage in stages:
        try:
            if stage == "ft" and "ft-random" in stages:  # both fine-tunes at once: one GPU holds both easily
                finetune_both(args.work, args)
            elif stage != "ft-random" or "ft" not in stages:
                run[stage](args.work, args)
        finally:  # after every stage, failed or not: the GPU plan's timeout kills a later one with SIGKILL
            if args.export:
                export(args.work, args.export)


if __name__ == "__main__":
    main()
