"""bpRNA splits and ArchiveII leave-one-family-out with the near-duplicate filter (real data)."""
from __future__ import annotations

import re

import numpy as np
import pytest

from finetune.ss_data import ARCHIVEII_FAMILIES, archiveii_fold, bprna_splits, load_archiveii, near_duplicate_mask
from finetune.structure import StructureRecord


def kmers(seq: str) -> set[str]:
    """Plain Python: the distinct 8-letter substrings (T read as U, case ignored, those with N skipped)."""
    norm = seq.upper().replace("T", "U")
    return {w for w in (norm[i:i + 8] for i in range(len(norm) - 7)) if "N" not in w}


def test_bprna_spot_splits(shared_data):
    s = bprna_splits(shared_data)
    assert (len(s.train), len(s.valid), len(s.test)) == (4082, 485, 473)
    assert not {r.id for r in s.train} & {r.id for r in s.test}


def test_near_duplicate_filter_on_synthetic_sequences():
    rng = np.random.default_rng(0)
    ref = "".join(rng.choice(list("ACGU"), 300))
    mutant = list(ref)
    for pos in rng.choice(300, 6, replace=False):  # 98% identity
        mutant[pos] = "A" if mutant[pos] != "A" else "C"
    unrelated = "".join(rng.choice(list("ACGU"), 300))
    fragment = ref[100:180]  # a piece of a test sequence
    mask = near_duplicate_mask(["".join(mutant), unrelated, fragment], [ref])
    assert mask.tolist() == [True, False, True]
    # the splice and MRL data are DNA letters, user files may be lower-case: the same answer
    dna = [x.replace("U", "T") for x in ("".join(mutant), unrelated, fragment)]
    assert near_duplicate_mask(dna, [ref.lower()]).tolist() == [True, False, True]
    assert near_duplicate_mask([x.lower() for x in dna], [ref.replace("U", "T")]).tolist() == [True, False, True]


def test_kmer_matrix_holds_each_sequences_distinct_kmers():
    """Against plain Python sets of 8-letter substrings (T read as U, case ignored, k-mers with N skipped): the
    k-mers per sequence and the k-mers shared by every two sequences."""
    from finetune.neardup import kmer_matrix

    rng = np.random.default_rng(1)
    seqs = ["".join(rng.choice(list("ACGUTacgutN"), int(n))) for n in rng.integers(0, 60, 40)]
    seqs += ["ACGUACGUAAAC", "acgtacgtaaaG"]  # share the k-mers of ACGUACGUAAA

    sets = [kmers(x) for x in seqs]
    matrix = kmer_matrix(seqs, k=8)
    assert np.array_equal(np.asarray(matrix.sum(axis=1)).ravel(), [len(x) for x in sets])
    shared = (matrix @ matrix.T).toarray()
    assert np.array_equal(shared, [[len(x & y) for y in sets] for x in sets])
    assert shared[-1, -2] == 4


def test_archiveii_folds_hold_out_family_and_near_duplicates(shared_data):
    recs = load_archiveii(shared_data)
    assert len(ARCHIVEII_FAMILIES) == 9 and "grp2" not in ARCHIVEII_FAMILIES
    fam_of = {r.id: f for r, f in recs}
    fold = archiveii_fold(recs, "tRNA")
    assert {fam_of[r.id] for r in fold.test} == {"tRNA"} and len(fold.test) == 557
    train_valid = fold.train + fold.valid
    assert "tRNA" not in {fam_of[r.id] for r in train_valid}
    # a group-I intron that sits inside a tRNA-Leu gene shares long stretches with tRNAs: it must be gone
    assert "grp1_a.I1.c.N.tabacum.C3.tLEU" in fold.info["removed_ids"]
    assert "grp1_a.I1.c.N.tabacum.C3.tLEU" not in {r.id for r in train_valid}
    removed = fold.info["removed_near_duplicates"] + fold.info["removed_valid_near_train"]
    assert len(train_valid) + removed == len(recs) - 557
    # validation holds no near-copy of a training record (most of a random draw is one)
    assert fold.info["removed_valid_near_train"] > len(fold.valid) > 0
    assert not near_duplicate_mask([r.sequence for r in fold.valid], [r.sequence for r in fold.train]).any()
    kept = len(recs) - 557 - fold.info["removed_near_duplicates"]
    assert len(fold.valid) + fold.info["removed_valid_near_train"] == round(0.1 * kept)   # valid_fraction's share
    assert len(fold.info["removed_ids"]) == min(50, fold.info["removed_near_duplicates"])
    assert fold.info["near_duplicate_rule"] == "shared distinct 8-mers >= 0.5 of the smaller sequence's"
    again = archiveii_fold(recs, "tRNA")
    assert [r.id for r in again.valid] == [r.id for r in fold.valid]  # seeded split
    assert [r.id for r in archiveii_fold(recs, "tRNA", seed=1).valid] != [r.id for r in fold.valid]


def test_a_small_fold_keeps_one_validation_record_and_an_unknown_family_is_refused():
    rng = np.random.default_rng(0)
    records = [(StructureRecord(f"r{i}", "".join(rng.choice(list("ACGU"), 40)), np.zeros((0, 2), np.int64)), fam)
               for i, fam in enumerate(["a", "a", "a", "b"])]
    fold = archiveii_fold(records, "b")   # 10% of three records rounds to none
    assert (len(fold.train), len(fold.valid), [r.id for r in fold.test]) == (2, 1, ["r3"])
    with pytest.raises(ValueError, match="unknown ArchiveII family 'c'; families: 5s, srp, tRNA"):
        archiveii_fold(records, "c")


def random_dbn(path, lengths: list[int], seed: int = 0) -> str:
    """A .dbn file of random sequences of these lengths, each with one pair (its ends), named <stem><i>."""
    rng = np.random.default_rng(seed)
    lines = []
    for i, n in enumerate(lengths):
        seq = "".join(rng.choice(list("ACGU"), n))
        lines += [f">{path.stem}{i}", seq, "(" + "." * (n - 2) + ")" if n >= 2 else "."]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_single_nucleotide_training_record_is_skipped_and_counted(tmp_path):
    """It has no pair to learn: its loss was the mean over an empty triangle, NaN without a gradient, and
    training with one record per batch stopped ('element 0 of tensors does not require grad'). A record of
    exactly max_train_len is trained on, one past it skipped and counted."""
    from finetune.tasks.ss import SSDataConfig, load_splits

    cfg = SSDataConfig(dataset="files", train=random_dbn(tmp_path / "tr.dbn", [1, 40, 2, 50, 51]),
                       valid=random_dbn(tmp_path / "va.dbn", [30, 1]), test=random_dbn(tmp_path / "te.dbn", [35]),
                       near_dup_kmer=0, max_train_len=50)
    splits = load_splits(cfg)
    assert sorted(len(r) for r in splits.train) == [2, 40, 50]
    assert sorted(len(r) for r in splits.valid) == [1, 30]          # scored (F1 0), not trained on
    assert splits.info["skipped_train_shorter_than_2_nt"] == 1
    assert splits.info["skipped_train_longer_than_max_train_len"] == 1


def test_training_and_evaluation_limit_the_users_test_file_to_the_same_records(tmp_path):
    """--data.limit_test: `ss evaluate` (test_records, the test file alone) scores the records training's test row
    scored; a second draw inside the user-data split picked others."""
    from finetune.tasks.ss import SSDataConfig, load_splits, test_records

    cfg = SSDataConfig(dataset="files", train=random_dbn(tmp_path / "tr.dbn", [40] * 12, seed=1),
                       test=random_dbn(tmp_path / "te.dbn", [30 + i for i in range(20)], seed=2), near_dup_kmer=0,
                       limit_test=5, limit_train=6)
    trained = load_splits(cfg)
    assert len(trained.test) == 5 and len(trained.train) == 6
    assert [r.id for r in trained.test] == [r.id for r in test_records(cfg)]


def test_fold_families_reads_a_comma_separated_list():
    from finetune.tasks.ss import fold_families

    assert fold_families("all") == list(ARCHIVEII_FAMILIES)
    assert fold_families("tRNA,telomerase,") == ["tRNA", "telomerase"]  # a trailing comma names no family
    for bad, said in (("tRNA,grp2", "unknown ['grp2']"), (",", "unknown ','"), ("5s,tRNA,5s", "5s given twice")):
        with pytest.raises(ValueError, match=re.escape(said)):
            fold_families(bad)


def test_near_duplicate_mask_is_the_containment_rule_of_plain_kmer_sets():
    """The leakage tests of every task split call near_duplicate_mask itself; this pins it to the rule it states
    (shared distinct 8-mers >= 0.5 of the smaller sequence's), computed with plain Python sets, on mutants from 0
    to 30 % substitutions (the rule's edge lies between), fragments, unrelated and too-short sequences."""
    rng = np.random.default_rng(7)
    refs = ["".join(rng.choice(list("ACGU"), int(n))) for n in rng.integers(40, 160, 12)]

    def mutant(seq: str, rate: float) -> str:
        return "".join(rng.choice(list("ACGU")) if rng.random() < rate else c for c in seq)

    cands = [mutant(refs[i % 12], rate) for i, rate in enumerate(np.linspace(0, 0.3, 60))]
    cands += [r[5:5 + int(n)] for r, n in zip(refs, rng.integers(7, 40, 12))]  # fragments, some under 8 nt
    cands += ["".join(rng.choice(list("ACGU"), 100)) for _ in range(10)]

    def near(c: str, r: str) -> bool:
        a, b = kmers(c), kmers(r)
        return len(a & b) >= 0.5 * max(min(len(a), len(b)), 1)

    want = [any(near(c, r) for r in refs) for c in cands]
    assert near_duplicate_mask(cands, refs).tolist() == want
    assert 20 < sum(want) < len(want) - 20  # both sides of the rule are exercised


def test_the_near_duplicate_rules_hold_at_their_bounds():
    """Containment of exactly max_containment is a near-duplicate (>=), and a shared stretch one nucleotide
    shorter than `run` is not one (the run hash covers all `run` nucleotides)."""
    from finetune.neardup import shared_run_mask

    rng = np.random.default_rng(9)

    def random(n: int) -> str:
        return "".join(rng.choice(list("ACGU"), n))

    ref = random(200)
    half = ref[:27] + random(20)  # 40 8-mers: the 20 of ref[:27] and 20 more across the joint and after it

    assert len(kmers(half)) == 40 and len(kmers(half) & kmers(ref)) == 20  # exactly half
    assert near_duplicate_mask([half], [ref]).tolist() == [True]
    assert near_duplicate_mask([half], [ref], max_containment=0.51).tolist() == [False]
    locus = random(300)
    a, b = locus[:149] + random(100), random(100) + locus[100:149] + random(100)  # share locus[100:149], 49 nt
    assert shared_run_mask([b], [a], 50).tolist() == [False] and shared_run_mask([b], [a], 49).tolist() == [True]


def test_a_folds_settings_leave_out_where_and_how_it_runs_and_resolve_paths(tmp_path, monkeypatch):
    """A finished ArchiveII fold is reused by a run of equal settings: one writing elsewhere, on another device,
    with another evaluation batch or progress setting, or naming the same files by a relative path, has them."""
    from dataclasses import replace

    from finetune.backbone import BackboneConfig
    from finetune.tasks.ss import SSConfig, SSDataConfig, run_settings, several_family_settings
    from finetune.trainer import TrainConfig

    monkeypatch.chdir(tmp_path)
    cfg = SSConfig(model=BackboneConfig(random_preset="nano"), data=SSDataConfig(dataset="archiveii", root="data"),
                   train=TrainConfig(out_dir="a", device="cpu", eval_batch_size=8, progress=True))
    same = replace(cfg, data=replace(cfg.data, root=str(tmp_path / "data")),
                   train=replace(cfg.train, out_dir="b", device="auto", eval_batch_size=2, progress=False))
    assert run_settings(same, "tRNA") == run_settings(cfg, "tRNA")
    assert run_settings(cfg, "tRNA")["data"]["root"] == str(tmp_path / "data")
    assert run_settings(replace(cfg, train=replace(cfg.train, lr=1e-3)), "tRNA") != run_settings(cfg, "tRNA")
    assert run_settings(cfg, "5s") != run_settings(cfg, "tRNA")
    several = replace(cfg, data=replace(cfg.data, test_family="tRNA,5s"))
    assert several_family_settings(several) == several_family_settings(  # the families in any order
        replace(cfg, data=replace(cfg.data, test_family="5s,tRNA")))


def test_a_fold_is_finished_only_with_results_of_these_settings(tmp_path):
    """A results.json of other settings (an earlier run's, which a process training the fold now replaces) is no
    finished fold: the summary must wait for the fold, not average the old numbers in."""
    import json

    from finetune.tasks.ss import finished_fold

    (tmp_path / "results.json").write_text(json.dumps({"rows": {}, "settings": {"lr": 1e-3}}))
    assert finished_fold(tmp_path, {"lr": 1e-3}) == {"rows": {}, "settings": {"lr": 1e-3}}
    assert finished_fold(tmp_path, {"lr": 5e-4}) is None
    assert finished_fold(tmp_path / "not_yet", {"lr": 1e-3}) is None


def test_an_archiveii_model_is_scored_on_the_family_it_held_out():
    from finetune.tasks.ss import SSDataConfig, _evaluation_data

    meta = {"data": {"dataset": "ArchiveII", "test": "tRNA"}}
    for asked in (SSDataConfig(), SSDataConfig(dataset="archiveii"), SSDataConfig(dataset="archiveii",
                                                                                  test_family="tRNA")):
        got = _evaluation_data(asked, meta, "m")
        assert (got.dataset, got.test_family) == ("archiveii", "tRNA")
    files = SSDataConfig(dataset="files", test="t.dbn")
    assert _evaluation_data(files, meta, "m") == files  # the user's own test file, as asked
    with pytest.raises(ValueError, match="m was trained on ArchiveII with family tRNA held out; family 5s was in"):
        _evaluation_data(SSDataConfig(dataset="archiveii", test_family="5s"), meta, "m")
    bprna_model = {"data": {"dataset": "bpRNA", "test": "TS0"}}
    one = SSDataConfig(dataset="archiveii", test_family="5s")
    assert _evaluation_data(one, bprna_model, "m") == one
    with pytest.raises(ValueError, match="ss evaluate scores one ArchiveII family: set --data.test_family"):
        _evaluation_data(SSDataConfig(dataset="archiveii", test_family="tRNA,5s"), bprna_model, "m")
