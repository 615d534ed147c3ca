"""`make demo` (pretrain.demo), README's first command: every stage runs for real and leaves what it announces."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dataprep.shards import read_manifest
from pretrain import demo
from rnalm.io import load_pretrained

from .trainer_runs import PY, REPO, read_log, trainer_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
STEPS = 12


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("demo")
    proc = subprocess.run([PY, "-m", "pretrain.demo", f"--out={out}", "--records=3000", f"--steps={STEPS}"], cwd=REPO,
                          env=trainer_env(), capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_demo_runs_dataprep_pretraining_convert_finetune_predict_and_embed(demo_run):
    out, stdout = demo_run
    kept = read_manifest(out / "shards").counts["kept"]
    assert 0 < kept < 3000  # the synthetic FASTA's duplicates and invalid records were dropped
    log = read_log(out / "pretrain")
    steps = [r for r in log if "event" not in r]
    assert steps[-1]["step"] == STEPS and steps[-1]["loss"] < steps[0]["loss"]
    assert any(r.get("event") == "valid" for r in log)
    model = load_pretrained(out / "model")
    few = (out / "few.fa").read_text().count(">")
    assert few == 20
    ids = (out / "embed" / "ids.txt").read_text().split()
    assert np.load(out / "embed" / "cls.npy").shape == (few, model.config.dim) and len(ids) == few
    if (out / "finetune_ss").exists():  # the shared data's bpRNA slice
        rows = json.loads((out / "finetune_ss" / "results.json").read_text())["rows"]
        assert set(rows) == {"nano-custom fine-tuned", "RNAfold"} and all(r["n"] == 120 for r in rows.values())
        predicted = out / "predict_ss"
        headers = (predicted / "predictions.dbn").read_text().splitlines()[::3]  # id, sequence, structure
        assert all(line.startswith(">") for line in headers)
        assert len(headers) + len(list(predicted.glob("*.bpseq"))) == few  # too deep for brackets: a .bpseq
        assert f"predictions:     {predicted}" in stdout
    else:
        assert (out / "finetune_gc" / "results.json").exists()
    assert f"pretraining demo done: {STEPS} steps" in stdout and "validation: loss" in stdout
    assert f"-m pretrain.evaluate {out / 'model'} --config {out / 'pretrain' / 'config.yaml'}" in stdout


def test_without_the_shared_data_the_demo_fine_tunes_a_gc_content_regression(demo_run, monkeypatch):
    out, _ = demo_run
    monkeypatch.setattr("finetune.tasks.common.DEFAULT_DATA_ROOT", str(out / "no_shared_data"))
    paths = demo.finetune(out / "model", out / "synthetic.fa", out)
    results = json.loads((paths["finetune_gc"] / "results.json").read_text())
    assert results["rows"]["all"]["n"] == 150 and results["rows"]["all"]["pearson_r"] > 0
    assert np.load(paths["embed"] / "mean.npy").shape[0] == 20


def test_the_gc_tables_hold_family_free_records_labelled_with_their_gc_share(tmp_path):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">a family=NA\nGGCC\nAAUU\n"  # 8 nt: too short
                     ">b family=FAM000001\n" + "GC" * 20 + "\n"  # a family member
                     ">c family=NA\n" + "gcat" * 10 + "\n"  # lower-case DNA: normalised
                     ">d family=NA\n" + "ACGU" * 5 + "X\n"  # an invalid character
                     ">e family=NA\n" + "GGGA" * 10 + "\n"
                     ">f family=NA\n" + "AAAU" * 10 + "\n")  # beyond the 1 + 1 asked for
    train, test = demo.gc_content_tables(fasta, tmp_path, train=1, test=1)
    assert train.read_text() == "sequence,label\n" + "GCAU" * 10 + ",0.5000\n"
    assert test.read_text() == "sequence,label\n" + "GGGA" * 10 + ",0.7500\n"


def test_the_demo_never_replaces_folders_of_a_directory_that_is_not_its_own(tmp_path, capsys):
    """From a user review: `python -m pretrain.demo --out .` in the repository deleted pretrain/ (it replaces its
    shards/, pretrain/ and model/ folders in OUT on every run)."""
    mine = tmp_path / "mine"
    (mine / "pretrain").mkdir(parents=True)
    (mine / "pretrain" / "train.py").write_text("the user's")
    with pytest.raises(SystemExit, match=f"--out {mine} holds files that are not a demo's"):
        demo.claim_out(mine)
    with pytest.raises(SystemExit, match=f"--out {mine} holds files that are not a demo's"):
        demo.main([f"--out={mine}", "--records=10"])
    assert (mine / "pretrain" / "train.py").read_text() == "the user's"
    for new in (tmp_path / "new", tmp_path / "empty"):  # new, empty, or a demo's own (again)
        (tmp_path / "empty").mkdir(exist_ok=True)
        demo.claim_out(new)
        (new / "shards").mkdir()
        demo.claim_out(new)
    with pytest.raises(SystemExit) as e:
        demo.main([f"--out={tmp_path / 'new'}", "--steps=0"])
    assert e.value.code == 2 and "--steps (0): must be >= 1" in capsys.readouterr().err
