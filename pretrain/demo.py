"""`make demo`: synthetic FASTA -> shards -> ZeRO-3 pretraining on 2 CPU ranks (tiny model) -> released weights
-> fine-tuning (secondary structure on a bpRNA slice, RNAfold beside it; without the shared data, a regression of
GC content on the synthetic sequences) -> predict-ss and embed on a FASTA.

    python -m pretrain.demo [--out demo_out] [--records 20000] [--steps 300] [--nproc 2]

Runs in a few minutes on a 2-core machine; every stage is the real tool (dataprep CLI, MMseqs2 when
installed, torchrun + DeepSpeed ZeRO-3 on gloo, pretrain.convert). Prints where the results are.
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
DEFAULT_OUT = REPO / "demo_out"
MARK = ".rnalm-demo"  # in a demo's OUT: the folders it replaces there are its own


def claim_out(out: Path) -> None:
    """OUT for the demo, which replaces its shards/, pretrain/, model/, ... folders there on every run: a new or
    empty directory, or one a demo used before (a user review: `--out .` in the repository deleted pretrain/)."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARK).exists() and out != DEFAULT_OUT:
        sys.exit(f"demo: --out {out} holds files that are not a demo's, and the demo replaces its folders there "
                 "(shards/, pretrain/, model/, ...): name a new or empty directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARK).touch()


def run(cmd: list[str], what: str) -> None:
    print(f"\n== {what}\n$ {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONWARNINGS="ignore::FutureWarning")
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env)
    except KeyboardInterrupt:  # Ctrl-C: the stage's own processes got it too, and say so in a line each
        print(f"\ndemo: interrupted during {what}; `make demo` runs it again from the start", file=sys.stderr)
        raise SystemExit(130) from None
    if proc.returncode != 0:
        sys.exit(f"demo: {what} failed (exit {proc.returncode})")
    print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)


def make_fasta(out: Path, records: int) -> Path:
    fasta = out / "synthetic.fa"
    run([sys.executable, "-m", "dataprep.synth", str(records), str(fasta)], "synthetic ncRNA-like FASTA")
    return fasta


def build_shards(fasta: Path, shards: Path) -> None:
    shutil.rmtree(shards, ignore_errors=True)  # a fresh build each time: the FASTA was just rewritten
    cmd = [sys.executable, "dataprep/build_shards.py", "--input", str(fasta), "--out", str(shards),
           "--valid-fraction", "0.02", "--block-records", "1024"]
    if shutil.which("mmseqs") is None:
        print("mmseqs not installed: every record is its own cluster (--no-cluster)")
        cmd.append("--no-cluster")
    run(cmd, "dataprep: normalise, dedup, cluster, split, write shards")


def pretrain(shards: Path, run_dir: Path, steps: int, nproc: int) -> None:
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run each time (the trainer would otherwise resume)
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
         "-m", "pretrain.train", "--config", "pretrain/configs/tiny_cpu.yaml", f"--data.shards={shards}",
         f"--train.out_dir={run_dir}", f"--train.max_steps={steps}", f"--optim.warmup_steps={min(20, steps - 1)}",
         f"--train.valid_every={max(steps // 3, 1)}",
         f"--checkpoint.every={max(steps // 3, 1)}"],
        f"pretraining: DeepSpeed ZeRO-3, {nproc} CPU ranks (gloo), tiny model, {steps} steps")


def convert(run_dir: Path, model_dir: Path) -> None:
    run([sys.executable, "-m", "pretrain.convert", str(run_dir), str(model_dir)],
        "convert: ZeRO-3 checkpoint -> model.safetensors + config.json")


def finetune(model_dir: Path, fasta: Path, out: Path) -> dict[str, Path]:
    """A short secondary-structure fine-tune of the converted model (a regression of GC content where the shared
    data is absent), then predictions and embeddings."""
    from finetune.tasks.common import DEFAULT_DATA_ROOT

    few = out / "few.fa"
    with open(fasta, "rb") as fh:  # the first 20 records of the demo FASTA stand for a user's file
        records = fh.read().split(b"\n>")[:20]
    few.write_bytes(b"\n>".join(records).rstrip(b"\n") + b"\n")
    data = Path(DEFAULT_DATA_ROOT)
    if (data / "ss").exists():
        paths = {"finetune": out / "finetune_ss", "predict": out / "predict_ss"}
        run([sys.executable, "-m", "finetune", "ss", "train", f"--model.path={model_dir}", f"--data.root={data}",
             "--data.limit_train=300", "--data.limit_valid=60", "--data.limit_test=120", "--train.epochs=2",
             "--unfreeze.head_only_epochs=1", "--unfreeze.every=1", "--train.progress=false",
             f"--train.out_dir={paths['finetune']}"],
            "fine-tune: secondary structure on a bpRNA TR0 slice, scored on TS0 with RNAfold beside it")
        run([sys.executable, "-m", "finetune", "predict-ss", f"--model={paths['finetune']}", f"--fasta={few}",
             f"--out={paths['predict']}", "--format=dbn"], "predict-ss: structures for a FASTA")
    else:
        print(f"\n== {data / 'ss'} not found (point RNALM_SHARED_DATA at the data folder, the one holding ss/, or put "
              "it at ../shared/data): the fine-tuning step is a regression of GC content on the demo's sequences")
        paths = {"finetune_gc": out / "finetune_gc"}
        train, test = gc_content_tables(fasta, out)
        run([sys.executable, "-m", "finetune", "regress", "train", f"--model.path={model_dir}",
             f"--data.train={train}", f"--data.test={test}", "--train.epochs=3", "--unfreeze.head_only_epochs=1",
             "--unfreeze.every=1", "--train.progress=false", f"--train.out_dir={paths['finetune_gc']}"],
            "fine-tune: regression of each sequence's GC content (the finetune package's own-data task)")
    paths["embed"] = out / "embed"
    run([sys.executable, "-m", "finetune", "embed", f"--model={model_dir}", f"--fasta={few}",
         f"--out={paths['embed']}", "--plot=pca"], "embed: CLS and mean embeddings with a plot")
    return paths


def gc_content_tables(fasta: Path, out: Path, train: int = 600, test: int = 150) -> tuple[Path, Path]:
    """train.csv and test.csv (sequence,label: the GC share) of the synthetic FASTA's random singletons
    (`family=NA`: no family member on both sides of the split, as the near-duplicate filter would find)."""
    rows = []
    for record in fasta.read_text().split(">")[1:]:
        header, _, seq = record.partition("\n")
        seq = seq.replace("\n", "").upper().replace("T", "U")
        if "family=NA" in header and 20 <= len(seq) <= 400 and set(seq) <= set("ACGU"):
            rows.append(f"{seq},{(seq.count('G') + seq.count('C')) / len(seq):.4f}")
        if len(rows) == train + test:
            break
    paths = out / "gc_train.csv", out / "gc_test.csv"
    for path, part in zip(paths, (rows[:train], rows[train:])):
        path.write_text("sequence,label\n" + "\n".join(part) + "\n")
    return paths


def summary(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if "event" not in r]
    valid = [r for r in records if r.get("event") == "valid"]
    return {"steps": steps[-1]["step"], "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
            "tokens": steps[-1]["tokens"], "valid": valid[-1] if valid else None,
            "median_tokens_per_s": sorted(r["tokens_per_s"] for r in steps)[len(steps) // 2]}


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(prog="python -m pretrain.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--nproc", type=int, default=2)
    args = parser.parse_args(argv)
    low = [f"--{k} ({v})" for k, v in vars(args).items() if k != "out" and v < 1]
    if low:
        parser.error(f"{', '.join(low)}: must be >= 1")
    out = args.out.resolve()
    claim_out(out)
    paths = {"shards": out / "shards", "pretrain": out / "pretrain", "model": out / "model"}
    fasta = make_fasta(out, args.records)
    build_shards(fasta, paths["shards"])
    pretrain(paths["shards"], paths["pretrain"], args.steps, args.nproc)
    convert(paths["pretrain"], paths["model"])
    tuned = finetune(paths["model"], fasta, out)
    s = summary(paths["pretrain"])
    print(f"\n== pretraining demo done: {s['steps']} steps, {s['tokens']:,} tokens, loss {s['first_loss']:.3f} -> "
          f"{s['last_loss']:.3f}, median {s['median_tokens_per_s']:,.0f} tokens/s")
    if s["valid"]:
        v = s["valid"]
        print(f"   validation: loss {v['loss']:.4f}, perplexity {v['perplexity']:.3f}, "
              f"masked accuracy {v['accuracy']:.2%}")
    print("   (the synthetic sequences are mostly random: the loss floor is about 1.32, ln 4 = 1.386 at the 80% of "
          "targets shown as <mask>, ~1.07 at those that show a nucleotide)")
    print(f"   shards:          {paths['shards']}  (manifest.json, report/)")
    print(f"   training run:    {paths['pretrain']}  (config.yaml, log.jsonl, checkpoints/)")
    print(f"   released model:  {paths['model']}  (model.safetensors, config.json)")
    if "finetune" in tuned:
        print(f"   fine-tuned SS:   {tuned['finetune']}  (results.md, results.json, finetuned.safetensors)")
        print("   (a tiny model pretrained for a minute on random sequences: RNAfold is expected to score higher; "
              "f1_shift counts a pair off by one base as found, threshold is the pair probability tuned on validation)")
        print(f"   predictions:     {tuned['predict']}  (predictions.dbn)")
    else:
        print(f"   fine-tuned GC:   {tuned['finetune_gc']}  (results.md, results.json: R^2 of the GC share)")
    print(f"   embeddings:      {tuned['embed']}  (.npy + plot)")
    paths.update(tuned)
    py = os.path.relpath(sys.executable, Path.cwd())
    print(f"\nNext, with this environment ({py}, or `source .venv/bin/activate` and then python):")
    if "finetune" in tuned:
        print(f"   {py} -m finetune predict-ss --model={tuned['finetune']} --fasta=YOUR.fa --out=pred")
    print(f"   {py} -m finetune embed --model={paths['model']} --fasta=YOUR.fa --out=emb")
    print(f"   {py} -m finetune classify train --model.path={paths['model']} --data.train=YOURS.csv "
          "--data.test=TEST.csv   (columns sequence,label)")
    print(f"   {py} -m pretrain.evaluate {paths['model']} --config {paths['pretrain'] / 'config.yaml'}"
          "   (the run's validation, again)")
    print('   your own data, at scale: README.md "From FASTA to a fine-tuned model"')
    return paths


if __name__ == "__main__":
    main()
