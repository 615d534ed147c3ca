"""dataprep.synth, the FASTA the demo, tests and benchmarks build from: the mix its docstring promises."""
from __future__ import annotations

import gzip
import re
import subprocess
import sys
from collections import Counter, defaultdict

import numpy as np
import pytest
import zstandard

from dataprep.synth import SynthConfig, generate, write_fasta

from .helpers import REPO

N = 4000
CFG = SynthConfig(N, seed=3, invalid_fraction=0.01)


@pytest.fixture(scope="module")
def records() -> list[tuple[str, str, bytes]]:
    """(id, family label, sequence) of CFG."""
    headers, seqs = generate(CFG)
    parsed = [re.fullmatch(rb">(syn\d{9}) family=(\w+)", h) for h in headers]
    assert all(parsed), headers[:3]
    return [(m[1].decode(), m[2].decode(), s) for m, s in zip(parsed, seqs)]


def rna(seq: bytes) -> bytes:
    return seq.upper().replace(b"T", b"U")


def test_every_record_is_numbered_in_file_order_and_the_kinds_are_shuffled(records):
    assert [r[0] for r in records] == [f"syn{k:09d}" for k in range(N)]
    first = Counter(label[:3] for _, label, _ in records[:N // 4])
    assert first["FAM"] and first["NA"] and first["INV"]


def test_the_invalid_share_holds_only_records_normalisation_must_reject(records):
    bad = [s for _, label, s in records if label == "INVALID"]
    assert len(bad) == round(N * CFG.invalid_fraction)
    assert all(len(s) < 16 or re.search(rb"[^ACGU]", s) for s in bad)
    assert {len(s) for s in bad} >= {0, 5}  # the empty and the too-short kinds are both there


def test_valid_records_are_rna_or_lower_case_dna_of_the_promised_lengths(records):
    valid = [s for _, label, s in records if label != "INVALID"]
    dna = [s for s in valid if s.islower()]
    assert len(dna) == round(len(valid) * CFG.dna_fraction)
    assert all(re.fullmatch(rb"[acgt]+", s) for s in dna)
    assert all(re.fullmatch(rb"[ACGU]+", s) for s in valid if not s.islower())
    singles = [len(s) for _, label, s in records if label == "NA"]
    assert 16 <= min(singles) and max(singles) <= 3000 and 100 < np.median(singles) < 140  # lognormal, median 120


def test_exact_duplicates_and_families_come_in_the_promised_shares(records):
    valid = [rna(s) for _, label, s in records if label != "INVALID"]
    n_dup = round(N * CFG.duplicate_fraction)
    assert n_dup <= len(valid) - len(set(valid)) <= n_dup + 20  # (short family members may come out identical)
    label = {}
    for _, family, s in records:
        assert label.setdefault(rna(s), family) == family  # a copy keeps its original's family
    members = sum(label.startswith("FAM") for _, label, _ in records)
    assert round(N * CFG.family_fraction) <= members <= round(N * CFG.family_fraction) + n_dup


def prefix_identity(a: bytes, b: bytes, n: int = 12) -> float:
    """The share of equal bases among the first n: before the first indel, most often (~1 % indels per base)."""
    return float(np.mean(np.frombuffer(a[:n], np.uint8) == np.frombuffer(b[:n], np.uint8)))


def test_family_members_are_mutated_copies_of_one_seed(records):
    """3-20 % substitutions per member: two members of a family agree at ~84 % of the aligned positions, unrelated
    sequences at ~25 %."""
    families = defaultdict(list)
    for _, label, s in records:
        families[label].append(rna(s))
    kin = [prefix_identity(a, b) for label, members in families.items() if label.startswith("FAM")
           for i, a in enumerate(members) for b in members[i + 1:]]
    strangers = [prefix_identity(a, b) for a, b in zip(families["NA"][::2], families["NA"][1::2])]
    assert np.mean(kin) > 0.7 and np.mean(strangers) < 0.35


def test_wrapped_and_compressed_files_hold_the_same_records(tmp_path):
    cfg = SynthConfig(300, seed=5)
    write_fasta(cfg, tmp_path / "plain.fa")
    plain = (tmp_path / "plain.fa").read_bytes()
    headers, seqs = generate(cfg)
    assert plain == b"".join(h + b"\n" + s + b"\n" for h, s in zip(headers, seqs))
    write_fasta(SynthConfig(300, seed=5, wrap=60), tmp_path / "wrapped.fa")
    wrapped = (tmp_path / "wrapped.fa").read_bytes()
    assert max(map(len, wrapped.splitlines())) == 60 and max(map(len, plain.splitlines())) > 60
    unwrapped = [r.partition(b"\n") for r in wrapped.removesuffix(b"\n").split(b"\n>")]
    assert [b">" * (k > 0) + h for k, (h, _, _) in enumerate(unwrapped)] == headers
    assert [s.replace(b"\n", b"") for _, _, s in unwrapped] == seqs
    write_fasta(cfg, tmp_path / "c.fa.gz")
    write_fasta(cfg, tmp_path / "c.fa.zst")
    assert gzip.decompress((tmp_path / "c.fa.gz").read_bytes()) == plain
    assert zstandard.ZstdDecompressor().decompressobj().decompress((tmp_path / "c.fa.zst").read_bytes()) == plain
    write_fasta(SynthConfig(300, seed=6), tmp_path / "other.fa")
    assert (tmp_path / "other.fa").read_bytes() != plain


def test_the_command_writes_what_the_function_does(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dataprep.synth", "250", str(tmp_path / "cli.fa"), "--seed", "9",
                           "--invalid-fraction", "0.02", "--dna-fraction", "0.1", "--wrap", "50"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout == f"wrote 250 records to {tmp_path / 'cli.fa'}\n", proc.stderr
    write_fasta(SynthConfig(250, seed=9, invalid_fraction=0.02, dna_fraction=0.1, wrap=50), tmp_path / "api.fa")
    assert (tmp_path / "cli.fa").read_bytes() == (tmp_path / "api.fa").read_bytes()
