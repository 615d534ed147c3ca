"""finetune.predict's checks and file naming, without a model: what predict-ss decides before any work."""
from __future__ import annotations

import json
import re

import pytest

from finetune.predict import (PREDICTIONS_LIST, StructurePredictConfig, check_lengths, check_not_replacing,
                              predict_ss, remove_listed, safe_name)
from finetune.structure import FastaRecord


@pytest.mark.parametrize(("record_id", "name"), [
    ("chr1:5-10(+)", "chr1_5-10___"), ("..hidden", "__hidden"), ("../../etc/passwd", "___.._etc_passwd"),
    ("", "record"), ("x" * 300, "x" * 200), ("a.b_c-D9", "a.b_c-D9"), ("../evil", "___evil"), (".", "_"), ("..", "__"),
    (".hidden", "_hidden"), ("a.b", "a.b")])
def test_a_record_id_becomes_a_plain_visible_file_name(record_id, name):
    assert safe_name(record_id) == name


def test_only_plain_names_an_earlier_run_listed_are_removed(tmp_path):
    out, outside = tmp_path / "out", tmp_path / "precious.ct"
    (out / "sub").mkdir(parents=True)
    for path in (outside, out / "a.ct", out / "sub" / "b.ct", out / "user.ct"):
        path.write_text("x")
    (out / PREDICTIONS_LIST).write_text(json.dumps({"files": ["a.ct", "../precious.ct", "sub/b.ct", str(outside), 7]}))
    remove_listed(out / PREDICTIONS_LIST)
    assert sorted(p.name for p in out.rglob("*.ct")) == ["b.ct", "user.ct"] and outside.exists()
    for damaged in ('["a.ct"]', '{"files": "a.ct"}', '{"files": null}', "{"):   # nothing listed, nothing removed
        (out / "user.ct").write_text("x")
        (out / PREDICTIONS_LIST).write_text(damaged)
        remove_listed(out / PREDICTIONS_LIST)
        assert (out / "user.ct").exists()


def test_a_link_to_nothing_is_a_file_not_to_replace(tmp_path):
    (tmp_path / "mine.ct").symlink_to(tmp_path / "gone")
    with pytest.raises(ValueError, match="holds 1 file"):
        check_not_replacing(tmp_path, ["mine.ct", "other.ct"])


def test_files_not_to_replace_are_named_three_at_most(tmp_path):
    for name in "abcde":
        (tmp_path / f"{name}.ct").write_text("mine")
    with pytest.raises(ValueError, match=re.escape("holds 5 file(s) that predict-ss did not write and would replace: "
                                                   "a.ct, b.ct, c.ct ...; name another --out")):
        check_not_replacing(tmp_path, [f"{name}.ct" for name in "abcde"])


def test_long_records_are_named_longest_first_three_at_most():
    records = [FastaRecord(f"r{n}", "A" * n, "") for n in (11, 14, 9, 12, 13)]
    with pytest.raises(ValueError, match=re.escape("4 record(s) longer than --max_len=10: 'r14' (14 nt), 'r13' (13 nt), "
                                                   "'r12' (12 nt) and 1 more. The")):
        check_lengths(records, StructurePredictConfig(fasta="in.fa", max_len=10))
    with pytest.raises(ValueError, match=re.escape("--max_len (0) must be >= 1")):
        check_lengths(records, StructurePredictConfig(max_len=0))
    with pytest.raises(ValueError, match=re.escape("about 5.1 GB of memory for the longest; pass --max_len=2000")):
        check_lengths([FastaRecord("long", "A" * 2000, "")], StructurePredictConfig())


@pytest.mark.parametrize("threshold", [-0.1, 1.5])
def test_a_threshold_outside_0_1_is_refused(tmp_path, threshold):
    with pytest.raises(ValueError, match=re.escape(f"--threshold ({threshold}) is a pair probability")):
        predict_ss(StructurePredictConfig(model="m", fasta="f.fa", out=str(tmp_path), threshold=threshold))
