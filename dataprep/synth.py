"""Synthetic ncRNA-like FASTA for the demo, tests and benchmarks (vectorised; ~1M records/s).

Mix (defaults): 55 % random singletons, 40 % family members (mutated copies of a hidden seed: 3-20 %
substitutions, ~1 % indels), 5 % exact duplicates of other records, plus a fraction of invalid records
(invalid characters, empty sequences, too short). Some valid records are written as lower-case DNA (T)
to exercise normalisation. Lengths are lognormal (median 120 nt), clipped to 16..3000.

    python -m dataprep.synth N OUT.fa[.gz|.zst] [--seed S] [--invalid-fraction F] [--wrap W]
"""
from __future__ import annotations

import argparse
import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from .arrays import concat_ranges, offsets_from_lengths

_BASES = np.frombuffer(b"ACGU", np.uint8)


@dataclass(frozen=True)
class SynthConfig:
    records: int
    seed: int = 0
    family_fraction: float = 0.40
    duplicate_fraction: float = 0.05
    invalid_fraction: float = 0.001
    dna_fraction: float = 0.02  # valid records written as lower-case DNA
    wrap: int = 0  # line width; 0 = one line per sequence


def _lengths(rng: np.random.Generator, n: int) -> np.ndarray:
    return np.clip(rng.lognormal(np.log(120), 0.8, n), 16, 3000).astype(np.int64)


def _families(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n family members: (bytes, lengths, family index)."""
    sizes = np.clip(np.round(rng.lognormal(np.log(8), 1.0, n // 2 + 1)), 2, 1000).astype(np.int64)
    nfam = int(np.searchsorted(np.cumsum(sizes), n)) + 1
    fam = np.repeat(np.arange(nfam), sizes[:nfam])[:n]
    seed_len = _lengths(rng, nfam)
    seed_off = np.cumsum(seed_len) - seed_len
    seeds = _BASES[rng.integers(0, 4, int(seed_len.sum()))]
    member = seeds[concat_ranges(seed_off[fam], seed_len[fam])]
    rate = np.repeat(rng.uniform(0.03, 0.20, n), seed_len[fam])
    sub = rng.random(len(member)) < rate
    member[sub] = _BASES[rng.integers(0, 4, int(sub.sum()))]
    u = rng.random(len(member))
    copies = 1 + (u < 0.005).astype(np.int64) - (u > 0.995)  # ~0.5 % insertions, ~0.5 % deletions
    rec = np.repeat(np.arange(n), seed_len[fam])
    lens = np.bincount(rec, weights=copies, minlength=n).astype(np.int64)
    return np.repeat(member, copies), lens, fam


def generate(cfg: SynthConfig) -> tuple[list[bytes], list[bytes]]:
    """(headers, sequences) in file order; each header is b'>id desc'."""
    rng = np.random.default_rng(cfg.seed)
    n = cfg.records
    n_bad = int(round(n * cfg.invalid_fraction))
    n_dup = int(round(n * cfg.duplicate_fraction))
    n_fam = int(round(n * cfg.family_fraction))
    n_single = n - n_bad - n_dup - n_fam
    fam_seq, fam_len, fam = _families(rng, n_fam) if n_fam else (np.zeros(0, np.uint8), np.zeros(0, np.int64),
                                                                  np.zeros(0, np.int64))
    single_len = _lengths(rng, n_single)
    seq = np.concatenate((fam_seq, _BASES[rng.integers(0, 4, int(single_len.sum()))]))
    lens = np.concatenate((fam_len, single_len))
    off = offsets_from_lengths(lens)
    text = seq.tobytes()
    seqs = [text[off[i]: off[i + 1]] for i in range(len(lens))]
    labels = [f"FAM{f:06d}" for f in fam.tolist()] + ["NA"] * n_single
    base = len(seqs)
    if base:
        for i in rng.integers(0, base, n_dup).tolist():
            seqs.append(seqs[i])
            labels.append(labels[i])
    for i in rng.choice(len(seqs), int(round(len(seqs) * cfg.dna_fraction)), replace=False).tolist():
        seqs[i] = seqs[i].replace(b"U", b"T").lower()
    bad = [b"ACGUXACGUACGUACGUACGU", b"", b"ACGUA", b"ACGU*ACGUACGUACGUACGU", b"ACGU-ACGU-ACGU-ACGU-A"]
    seqs += [bad[k % len(bad)] for k in range(n_bad)]
    labels += ["INVALID"] * n_bad
    order = rng.permutation(len(seqs))
    headers = [b">syn%09d family=%s" % (k, labels[i].encode()) for k, i in enumerate(order.tolist())]
    return headers, [seqs[i] for i in order.tolist()]


def _wrap(seq: bytes, width: int) -> bytes:
    return b"\n".join(seq[i: i + width] for i in range(0, len(seq), width)) if width and len(seq) > width else seq


def write_fasta(cfg: SynthConfig, path: str | Path) -> int:
    headers, seqs = generate(cfg)
    if cfg.wrap:
        seqs = [_wrap(s, cfg.wrap) for s in seqs]
    body = b"".join(b"%s\n%s\n" % hs for hs in zip(headers, seqs))
    path = Path(path)
    if path.suffix == ".gz":
        body = gzip.compress(body, compresslevel=6)
    elif path.suffix == ".zst":
        body = zstandard.ZstdCompressor(level=3).compress(body)
    path.write_bytes(body)
    return len(headers)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m dataprep.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("records", type=int)
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--family-fraction", type=float, default=0.40)
    p.add_argument("--duplicate-fraction", type=float, default=0.05)
    p.add_argument("--invalid-fraction", type=float, default=0.001)
    p.add_argument("--dna-fraction", type=float, default=0.02)
    p.add_argument("--wrap", type=int, default=0)
    a = p.parse_args(argv)
    cfg = SynthConfig(a.records, a.seed, a.family_fraction, a.duplicate_fraction, a.invalid_fraction,
                      a.dna_fraction, a.wrap)
    n = write_fasta(cfg, a.out)
    print(f"wrote {n} records to {a.out}")


if __name__ == "__main__":
    main()
