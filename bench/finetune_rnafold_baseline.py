"""RNAfold baseline on bpRNA TS0 and the 9 ArchiveII families, scored with finetune.metrics (exact and +-1).

    .venv/bin/python bench/finetune_rnafold_baseline.py --data ../shared/data --out bench_out/rnafold

Writes OUT/rnafold_baseline.json and OUT/rnafold_baseline.md (one row per test set, ArchiveII mean).
Single process, CPU; ArchiveII's long rRNAs dominate the time.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from finetune.metrics import ss_report
from finetune.rnafold import rnafold_pairs
from finetune.ss_data import ARCHIVEII_FAMILIES, load_archiveii, load_bprna
from finetune.results import markdown_table, write_json


def score(records, desc: str) -> dict:
    t0 = time.time()
    items = [(r.pairs, rnafold_pairs(r.sequence), len(r)) for r in tqdm(records, desc=desc, mininterval=10)]
    return {**ss_report(items), "seconds": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    ap.add_argument("--out", type=Path, default=Path("bench_out/rnafold"))
    args = ap.parse_args()
    import RNA

    rows = {"bpRNA TS0": score(load_bprna(args.data)["TS0"], "bpRNA TS0")}
    arch = load_archiveii(args.data)
    for fam in ARCHIVEII_FAMILIES:
        rows[f"ArchiveII {fam}"] = score([r for r, f in arch if f == fam], fam)
    fams = [rows[f"ArchiveII {f}"] for f in ARCHIVEII_FAMILIES]
    rows["ArchiveII mean of 9 families"] = {k: float(np.mean([r[k] for r in fams]))
                                            for k in ("precision", "recall", "f1", "precision_shift",
                                                      "recall_shift", "f1_shift")}
    rows["ArchiveII mean of 9 families"]["n"] = sum(r["n"] for r in fams)
    result = {"model": "RNAfold (ViennaRNA %s, MFE, default parameters)" % RNA.__version__, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(result, args.out / "rnafold_baseline.json")
    (args.out / "rnafold_baseline.md").write_text(markdown_table(rows, ("n", "f1", "f1_shift", "precision_shift",
                                                                        "recall_shift")))
    print((args.out / "rnafold_baseline.md").read_text())


if __name__ == "__main__":
    main()
