"""CLI end to end on a tiny random checkpoint saved with rnalm.io: train -> evaluate -> predict, embed,
checkpoint formats, and clear errors on bad input."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from dataclasses import replace
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from finetune.backbone import BackboneConfig, detect_format, load_backbone
from finetune.cli import run
from finetune.postprocess import canonical_mask
from finetune.structure import parse_dot_bracket, read_bpseq, read_ct, read_fasta
from rnalm import io as rio
from rnalm.tokenizer import batch_encode

REPO = Path(__file__).resolve().parents[2]
SEQS = {"hairpin": "GGGGAAACCCCAUAUGCGCAAAAGCGCU", "t_letters": "ACGTTGCAACGTTTGCA", "short": "GCAUG"}


@pytest.fixture(scope="module")
def ss_model(tiny_checkpoint, shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ss_ft")
    rc = run(["ss", "train", f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}",
              "--data.limit_train=12", "--data.limit_valid=6", "--data.limit_test=6", "--train.epochs=1",
              "--eval.rnafold=false", f"--train.out_dir={out}", "--train.progress=false"])
    assert rc == 0
    return out


@pytest.fixture()
def fasta(tmp_path) -> Path:
    path = tmp_path / "in.fa"
    path.write_text("".join(f">{k} some description\n{v}\n" for k, v in SEQS.items()))
    return path


def test_train_writes_results_and_config(ss_model):
    res = json.loads((ss_model / "results.json").read_text())
    assert res["test_set"] == "bpRNA TS0" and res["splits"] == {"train": 12, "valid": 6, "test": 6}
    assert (ss_model / "train_config.yaml").exists() and (ss_model / "results.md").exists()


def test_a_train_run_that_fails_early_leaves_no_earlier_results(tiny_checkpoint, shared_data, tmp_path, capsys):
    """An ArchiveII run over several families writes its summary into OUT, where no fit ran: a fold that failed
    (here the second: no training record of <= 50 nt) left the earlier run's results.* beside the new config."""
    for name in ("results.json", "results.md"):
        (tmp_path / name).write_text("earlier run")
    rc = run(["ss", "train", f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}",
              "--data.dataset=archiveii", "--data.test_family=tRNA,srp", "--data.max_train_len=50",
              "--data.limit_train=4", "--data.limit_valid=4", "--data.limit_test=4", "--train.epochs=1",
              "--eval.rnafold=false", f"--train.out_dir={tmp_path}", "--train.progress=false"])
    assert rc == 2 and "empty split" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists() and not (tmp_path / "results.md").exists()


def test_a_train_start_refused_for_a_user_error_keeps_the_earlier_model(ss_model, tiny_checkpoint, shared_data,
                                                                        tmp_path, capsys):
    """The earlier run's model and results were removed before the backbone and options were checked, so a typo
    in a path (or continuing to fine-tune a model in place, which removed the very model it started from) lost
    them."""
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(ss_model, ft)
    before = {p.name: p.read_bytes() for p in ft.iterdir()}
    pretrain_run = tmp_path / "pretrain_run"
    (pretrain_run / "checkpoints").mkdir(parents=True)
    args = [f"--data.root={shared_data}", "--data.limit_train=4", "--data.limit_valid=4", "--data.limit_test=4",
            "--train.epochs=1", "--eval.rnafold=false", "--train.progress=false"]
    cases = {"no such checkpoint file or directory": [f"--model.path={tmp_path / 'nope'}"],
             "no backbone: set model.path": [],
             "a training run or checkpoint, not released weights": [f"--model.path={pretrain_run}"],
             f"--train.out_dir={ft} holds --model.path={ft}": [f"--model.path={ft}"],
             "train.batch_size must be >= 1": [f"--model.path={tiny_checkpoint}", "--train.batch_size=0"],
             "data.test_family: unknown ['tRNAx']": [f"--model.path={tiny_checkpoint}", "--data.dataset=archiveii",
                                                     "--data.test_family=tRNAx"],
             # a random backbone's settings were checked only after OUT was cleared (or gave a traceback)
             "unknown model preset 'Micro'": ["--model.random_preset=Micro"],
             "unexpected keyword argument 'bogus'": ["--model.random_preset=nano", "--model.overrides={bogus: 1}"],
             "attn_dropout must be in [0, 1)": ["--model.random_preset=nano", "--model.dropout=1.5"],
             "model.path (": ["--model.random_preset=nano", f"--model.path={tiny_checkpoint}"],
             "train.grad_clip must be > 0, got -1.0": [f"--model.path={tiny_checkpoint}", "--train.grad_clip=-1"],
             "train.lr must be > 0": [f"--model.path={tiny_checkpoint}", "--train.lr=-1e-4"],
             "train.lr_decay_steps must be >= 1": [f"--model.path={tiny_checkpoint}", "--train.lr_decay_steps=-5"],
             "--data.train name structure files: add --data.dataset=files": [f"--model.path={tiny_checkpoint}",
                                                                             f"--data.train={tmp_path / 'a.dbn'}"],
             f"{tmp_path / 'nope.dbn'}": [f"--model.path={tiny_checkpoint}", "--data.dataset=files",
                                          f"--data.train={tmp_path / 'nope.dbn'}", f"--data.test={tmp_path / 'nope.dbn'}"]}
    for message, extra in cases.items():
        assert run(["ss", "train", f"--train.out_dir={ft}", *args, *extra]) == 2
        assert message in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in ft.iterdir()} == before, message
    # the head was built after OUT was cleared: a traceback, and the earlier model gone; now refused with the options
    for message, extra in (("head: ss_conv_dim must be >= 1, got -1", "--head.ss_conv_dim=-1"),
                           ("head: mrl_dropout must be in [0, 1), got 1.5", "--head.mrl_dropout=1.5")):
        with pytest.raises(SystemExit) as e:
            run(["ss", "train", f"--train.out_dir={ft}", f"--model.path={tiny_checkpoint}", *args, extra])
        assert e.value.code == 2 and message in capsys.readouterr().err
        assert {p.name: p.read_bytes() for p in ft.iterdir()} == before, message
    fold = tmp_path / "tRNA"                                      # an ArchiveII fold's directory of OUT
    shutil.copytree(ss_model, fold)
    assert run(["ss", "train", f"--model.path={fold}", f"--train.out_dir={tmp_path}", "--data.dataset=archiveii",
                "--data.test_family=tRNA,5s", *args]) == 2
    assert f"holds --model.path={fold}" in capsys.readouterr().err
    inside = fold / sorted(before)[0]                             # a file of that fold's model
    assert run(["ss", "train", f"--model.path={inside}", f"--train.out_dir={tmp_path}", "--data.dataset=archiveii",
                "--data.test_family=tRNA,5s", *args]) == 2
    assert f"holds --model.path={inside}" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in fold.iterdir()} == before
    backbone = tmp_path / "out" / "backbone"                      # a backbone kept inside OUT is not replaced
    shutil.copytree(tiny_checkpoint, backbone)
    assert run(["ss", "train", f"--model.path={backbone}", f"--train.out_dir={tmp_path / 'out'}", *args]) == 0
    assert sorted(p.name for p in backbone.iterdir()) == sorted(p.name for p in Path(tiny_checkpoint).iterdir())


def test_split_filter_and_evaluation_options_are_refused_before_out_is_cleared(ss_model, tiny_checkpoint,
                                                                              shared_data, tmp_path, capsys,
                                                                              monkeypatch):
    """From a user review: a negative --data.valid_fraction swapped train and validation without a word;
    near_dup_kmer=20 asked numpy for 8 TiB (32: a traceback), a negative shared run failed in numpy, an empty
    --eval.thresholds after the first epoch, and a missing ViennaRNA after the last, with no results written."""
    import importlib.util
    import shutil

    ft = tmp_path / "ft"
    shutil.copytree(ss_model, ft)
    before = {p.name: p.read_bytes() for p in ft.iterdir()}
    args = ["ss", "train", f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}", "--data.limit_train=4",
            "--data.limit_valid=4", "--data.limit_test=4", "--train.epochs=1", f"--train.out_dir={ft}",
            "--train.progress=false"]
    for extra, message in (("--data.valid_fraction=-0.1", "--data.valid_fraction must be in [0, 1), got -0.1"),
                           ("--data.near_dup_kmer=32", "--data.near_dup_kmer must be in 0..12 (0: no k-mer check)"),
                           ("--data.near_dup_containment=0", "--data.near_dup_containment must be in (0, 1]"),
                           ("--data.near_dup_shared_run=-5", "--data.near_dup_shared_run must be >= 0"),
                           ("--eval.thresholds=[]", "--eval.thresholds must be pair probabilities in [0, 1]"),
                           ("--eval.thresholds=[0.5, 2]", "--eval.thresholds must be pair probabilities in [0, 1]")):
        with pytest.raises(SystemExit) as e:
            run([*args, extra])
        assert e.value.code == 2 and message in capsys.readouterr().err, extra
        assert {p.name: p.read_bytes() for p in ft.iterdir()} == before, extra
    found = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "RNA" else found(name, *a))
    evaluate = ["ss", "evaluate", f"--model.path={ft}", f"--data.root={shared_data}", "--data.limit_test=2",
                f"--train.out_dir={tmp_path / 'ev'}", "--train.progress=false"]
    for argv in (args, evaluate):
        assert run(argv) == 2 and "which is not installed here" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ft.iterdir()} == before
    assert run([*evaluate, "--eval.rnafold=false"]) == 0  # (parsed and run without it)


def test_a_failed_evaluation_leaves_no_earlier_scores_beside_its_config(ss_model, shared_data, tmp_path, capsys):
    """From a user review: the earlier evaluation's eval_results stayed beside a failed one's config."""
    ev = tmp_path / "ev"
    args = ["ss", "evaluate", f"--data.root={shared_data}", "--data.limit_test=2", "--eval.rnafold=false",
            f"--train.out_dir={ev}", "--train.progress=false"]
    assert run([*args, f"--model.path={ss_model}"]) == 0 and (ev / "eval_results.json").exists()
    assert run([*args, f"--model.path={tmp_path / 'nope'}"]) != 0
    assert sorted(p.name for p in ev.iterdir()) == ["evaluate_config.yaml"]


def test_model_option_of_train_and_evaluate_hints_at_model_path(ss_model, tmp_path, capsys):
    """--model=DIR (the predict commands' option) was 'model: expected a mapping of keys for BackboneConfig'."""
    for cmd in (["ss", "train"], ["ss", "evaluate"], ["mrl", "train"], ["splice", "train"]):
        assert run([*cmd, f"--model={ss_model}", f"--train.out_dir={tmp_path}"]) == 2
        assert f"did you mean --model.path={ss_model}?" in capsys.readouterr().err
    assert run(["ss", "evaluate", "--model", str(ss_model), f"--train.out_dir={tmp_path}"]) == 2
    assert f"did you mean --model.path={ss_model}?" in capsys.readouterr().err


def test_predict_and_embed_without_fasta_say_so(ss_model, tiny_checkpoint, capsys):
    """predict-ss and <task> predict read the empty --fasta as '.' ('.: cannot read (Is a directory)')."""
    for cmd in (["predict-ss", f"--model={ss_model}"], ["ss", "predict", f"--model={ss_model}"],
                ["mrl", "predict", f"--model={ss_model}"], ["embed", f"--model={tiny_checkpoint}"]):
        assert run(cmd) == 2
        assert capsys.readouterr().err == "error: --fasta is required\n", cmd


def test_evaluate_uses_stored_threshold(ss_model, shared_data, tmp_path, capsys):
    assert run(["ss", "evaluate", f"--model.path={ss_model}", f"--data.root={shared_data}", "--data.limit_test=5",
                "--eval.rnafold=true", f"--train.out_dir={tmp_path}", "--train.progress=false"]) == 0
    res = json.loads((tmp_path / "eval_results.json").read_text())
    meta = json.loads((ss_model / "finetune.json").read_text())
    assert res["rows"]["nano-custom fine-tuned"]["threshold"] == meta["threshold"]
    assert res["rows"]["RNAfold"]["n"] == 5
    assert "| RNAfold |" in capsys.readouterr().out


def test_ctrl_c_is_one_line_not_a_traceback(ss_model, tmp_path):
    from tests.conftest import interrupted_while_reading

    rc, err = interrupted_while_reading(["-m", "finetune", "predict-ss", f"--model={ss_model}",
                                         f"--fasta={tmp_path / 'in.fa'}", f"--out={tmp_path / 'pred'}"], tmp_path)
    assert (rc, err) == (130, "python -m finetune: interrupted\n")


@pytest.mark.parametrize("fmt", ["dbn", "bpseq", "ct"])
def test_predict_ss_formats_round_trip(ss_model, fasta, tmp_path, fmt, capsys):
    out = tmp_path / "pred"
    # threshold 0 forces many candidate pairs through post-processing
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={out}", f"--format={fmt}",
                "--threshold=0.0", "--progress=false", "--batch_size=2"]) == 0
    assert f"predicted 3 structures -> {out} ({fmt})" in capsys.readouterr().out
    if fmt == "dbn":
        lines = (out / "predictions.dbn").read_text().splitlines()
        recs = {lines[k][1:]: (lines[k + 1], parse_dot_bracket(lines[k + 2])) for k in range(0, len(lines), 3)}
    elif fmt == "bpseq":
        recs = {k: (r.sequence, r.pairs) for k in SEQS for r in [read_bpseq(out / f"{k}.bpseq")]}
    else:
        recs = {k: (r.sequence, r.pairs) for k in SEQS for r in read_ct(out / f"{k}.ct")}
    assert set(recs) == set(SEQS)
    from finetune.backbone import load_finetuned
    from finetune.tasks.ss import predict_pairs

    predicted = dict(zip(SEQS, predict_pairs(load_finetuned(ss_model)[0], list(SEQS.values()), 0.0, progress=False)))
    for k, (seq, pairs) in recs.items():
        assert seq == SEQS[k].replace("T", "U")
        assert sorted(map(tuple, pairs.tolist())) == sorted(map(tuple, predicted[k].tolist()))  # what the model said
        mask = canonical_mask(seq)
        assert all(mask[i, j] for i, j in pairs)
        assert len(np.unique(pairs.ravel())) == pairs.size
    assert len(recs["hairpin"][1]) > 0 and len(recs["short"][1]) == 0  # GCAUG: the only canonical pair is 3 apart


def test_predict_ss_short_and_too_knotted_records(ss_model, tmp_path, capsys):
    from finetune.predict import _write_dbn
    from finetune.structure import StructureRecord

    tiny = tmp_path / "tiny.fa"
    tiny.write_text(">one\nA\n>two\nGC\n>ten\nGGGAAAUCCC\n>odd\nGGXAAACC\n")
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={tiny}", f"--out={tmp_path / 'p'}",
                "--progress=false"]) == 0
    assert (tmp_path / "p" / "predictions.dbn").read_text().splitlines()[:6] == [">one", "A", ".", ">two", "GC", ".."]
    assert "letters outside the RiNALMo alphabet (X), read as <unk> and never paired; first: 'odd'" in \
        capsys.readouterr().err

    knot = np.array([(i, i + 31) for i in range(31)])  # 31 mutually crossing pairs: one bracket level each
    preds = [StructureRecord("knotted", "G" * 31 + "A" * 8 + "C" * 31, knot),
             StructureRecord("hairpin", "GGGAAACCC", np.array([(0, 8), (1, 7)]))]
    _write_dbn(preds, tmp_path)
    assert (tmp_path / "predictions.dbn").read_text() == ">hairpin\nGGGAAACCC\n((.....))\n"
    assert read_bpseq(tmp_path / "knotted.bpseq").pairs.tolist() == knot.tolist()
    assert "1 predicted structure(s) need more than 30 bracket levels: written to" in capsys.readouterr().err

    # ids that clash ignoring case: the overflow files carry their FASTA position, as --format=bpseq names them
    # (they were once numbered among the overflow records only: 000001_K was FASTA record 2)
    preds = [preds[1], StructureRecord("K", preds[0].sequence, knot), StructureRecord("k", preds[0].sequence, knot)]
    (tmp_path / "clash").mkdir()
    assert _write_dbn(preds, tmp_path / "clash") == ["predictions.dbn", "000002_K.bpseq", "000003_k.bpseq"]
    assert sorted(p.name for p in (tmp_path / "clash").iterdir()) == ["000002_K.bpseq", "000003_k.bpseq",
                                                                       "predictions.dbn"]
    assert "as 000002_K.bpseq, 000003_k.bpseq instead" in capsys.readouterr().err
    (tmp_path / "many").mkdir()   # the warning names five
    knotted = [StructureRecord(f"k{i}", preds[1].sequence, knot) for i in range(7)]
    assert len(_write_dbn(knotted, tmp_path / "many")) == 8
    assert f"7 predicted structure(s) need more than 30 bracket levels: written to {tmp_path / 'many'} as k0.bpseq, " \
        "k1.bpseq, k2.bpseq, k3.bpseq, k4.bpseq ... instead" in capsys.readouterr().err


def watch_pair_matrices(monkeypatch) -> tuple[list, list]:
    """(decoded matrices, how many of them were alive at each decoding)."""
    import weakref

    from finetune import postprocess

    seen, most_alive = [], []
    greedy = postprocess._greedy_candidates

    def watched(probs, sequence, min_prob):
        seen.append(weakref.ref(probs))
        most_alive.append(sum(ref() is not None for ref in seen))
        return greedy(probs, sequence, min_prob)

    monkeypatch.setattr(postprocess, "_greedy_candidates", watched)
    return seen, most_alive


def test_predict_ss_memory_does_not_grow_with_records(ss_model, tmp_path, monkeypatch):
    """Each batch's [L, L] probabilities are dropped once decoded (1,000 records of 600 nt held 2.4 GB)."""
    seen, most_alive = watch_pair_matrices(monkeypatch)
    many = tmp_path / "many.fa"
    many.write_text("".join(f">r{i}\n{SEQS['hairpin']}\n" for i in range(8)))
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={many}", f"--out={tmp_path / 'p'}",
                "--progress=false", "--batch_size=2"]) == 0
    assert len(seen) == 8 and max(most_alive) <= 2


def test_validation_memory_does_not_grow_with_records(tiny_checkpoint, shared_data, tmp_path, monkeypatch):
    """Threshold tuning kept every validation record's [L, L] probabilities (ArchiveII's 23S: 34 MB each)."""
    seen, most_alive = watch_pair_matrices(monkeypatch)
    assert run(["ss", "train", f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}",
                "--data.limit_train=2", "--data.limit_valid=8", "--data.limit_test=2", "--train.epochs=1",
                "--train.eval_batch_size=2", "--eval.rnafold=false", f"--train.out_dir={tmp_path}",
                "--train.progress=false"]) == 0
    assert len(seen) == 8 + 2 and max(most_alive) <= 2


def test_predict_ss_refuses_long_records_before_loading(ss_model, fasta, tmp_path, capsys):
    """A 5,000-nt record needed ~32 GB in the head and was killed for memory after the model had loaded."""
    long = tmp_path / "long.fa"
    long.write_text(f">ok\nACGUACGU\n>chr1:5-1028\n{'ACGU' * 256}\n")
    out = tmp_path / "p"
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={long}", f"--out={out}"]) == 2
    err = capsys.readouterr().err
    assert "1 record(s) longer than --max_len=1022: 'chr1:5-1028' (1024 nt)" in err and "--max_len=1024" in err
    assert not out.exists()
    args = ["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={out}", "--progress=false"]
    assert run([*args, "--max_len=27"]) == 2 and "'hairpin' (28 nt)" in capsys.readouterr().err
    assert run([*args, "--max_len=28"]) == 0 and (out / "predictions.dbn").exists()


def test_per_record_files_never_overwrite_each_other(ss_model, tmp_path):
    """tRNA1 and trna1 were written as tRNA1.ct and trna1.ct: one file on a case-insensitive file system."""
    src = tmp_path / "case.fa"
    src.write_text(">tRNA1\nGGGGAAACCCC\n>trna1\nGGGAAAUCCC\n")
    out = tmp_path / "p"
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={src}", f"--out={out}", "--format=ct",
                "--progress=false"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["000001_tRNA1.ct", "000002_trna1.ct", "predict_ss.json"]


def test_a_rerun_into_the_same_directory_leaves_only_its_own_predictions(ss_model, tmp_path):
    """The .ct files of an earlier run's records stayed beside this run's, with nothing telling them apart."""
    first, second, out = tmp_path / "first.fa", tmp_path / "second.fa", tmp_path / "p"
    first.write_text(">old1\nGGGGAAACCCC\n>.\nGGGAAAUCCC\n")
    second.write_text(">new1\nGGGGAAACCCC\n")
    out.mkdir()
    (out / "mine.ct").write_text("the user's own file\n")
    for fasta in (first, second):
        assert run(["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={out}", "--format=ct",
                    "--progress=false"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mine.ct", "new1.ct", "predict_ss.json"]
    listing = json.loads((out / "predict_ss.json").read_text())
    assert listing["files"] == ["new1.ct"] and listing["fasta"] == str(second) and listing["records"] == 1
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={first}", f"--out={out}", "--progress=false"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["mine.ct", "predict_ss.json", "predictions.dbn"]


def test_a_killed_predict_ss_rerun_lists_its_files_and_the_same_command_completes(ss_model, tmp_path,
                                                                                   monkeypatch):
    """Found by a crash-safety review: a rerun killed after its first .ct file left the earlier run's listing
    (whose files it had removed), and the same command was then refused for 'a file predict-ss did not write'."""
    import finetune.predict as predict

    first, second, out = tmp_path / "first.fa", tmp_path / "second.fa", tmp_path / "p"
    first.write_text(">a1\nGGGGAAACCCC\n>a2\nGGGAAAUCCC\n")
    second.write_text(">b1\nGGGGAAACCCC\n>b2\nGGGAAAUCCC\n")
    args = ["predict-ss", f"--model={ss_model}", f"--out={out}", "--format=ct", "--progress=false"]
    assert run([*args, f"--fasta={first}"]) == 0
    written = predict.write_ct

    def killed_after_one_file(pred, path):
        written(pred, path)
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(predict, "write_ct", killed_after_one_file)
        with pytest.raises(KeyboardInterrupt):
            run([*args, f"--fasta={second}"])
    listing = json.loads((out / "predict_ss.json").read_text())
    assert listing["files"] == ["b1.ct", "b2.ct"] and listing["complete"] is False
    assert sorted(p.name for p in out.iterdir()) == ["b1.ct", "predict_ss.json"]
    assert run([*args, f"--fasta={second}"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["b1.ct", "b2.ct", "predict_ss.json"]
    assert json.loads((out / "predict_ss.json").read_text())["complete"] is True


def test_predict_ss_refuses_to_replace_files_it_did_not_write(ss_model, tmp_path, capsys):
    """The user's own mine.ct, a reference structure of the record `mine`, was silently overwritten."""
    fasta, out = tmp_path / "in.fa", tmp_path / "p"
    fasta.write_text(">mine\nGGGGAAACCCC\n>other\nGGGAAAUCCC\n")
    out.mkdir()
    (out / "mine.ct").write_text("the user's own file\n")
    args = ["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={out}", "--progress=false"]
    assert run([*args, "--format=ct"]) == 2
    assert f"{out} holds 1 file(s) that predict-ss did not write and would replace: mine.ct" in capsys.readouterr().err
    assert (out / "mine.ct").read_text() == "the user's own file\n" and not (out / "other.ct").exists()
    (out / "mine.ct").unlink()
    assert run([*args, "--format=ct"]) == 0 and run([*args, "--format=ct"]) == 0  # its own files: replaced
    assert sorted(p.name for p in out.iterdir()) == ["mine.ct", "other.ct", "predict_ss.json"]


def test_output_directories_are_checked_before_any_work(ss_model, tiny_checkpoint, fasta, tmp_path, capsys):
    """An empty --out wrote into the current directory (and printed '/cls.npy'); a file as --out failed with a bare
    errno after all the work; evaluate without --model.path ended in a TypeError traceback."""
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for cmd, model in (("predict-ss", ss_model), ("embed", tiny_checkpoint)):
        assert run([cmd, f"--model={model}", f"--fasta={fasta}", "--out="]) == 2
        assert "--out is required: an output directory" in capsys.readouterr().err
        for out in (a_file, a_file / "sub"):
            assert run([cmd, f"--model={model}", f"--fasta={fasta}", f"--out={out}"]) == 2
            assert f"--out={out}: {a_file} is a file, not a directory" in capsys.readouterr().err
    assert run(["ss", "evaluate", f"--train.out_dir={tmp_path / 'ev'}"]) == 2
    assert "--model.path is required" in capsys.readouterr().err
    assert run(["ss", "evaluate", f"--model.path={ss_model}", "--train.out_dir="]) == 2
    assert "--train.out_dir is required" in capsys.readouterr().err
    for task in ("ss", "splice", "mrl"):     # was "no sequences to score", after loading the model
        assert run([task, "evaluate", f"--model.path={ss_model}", f"--train.out_dir={tmp_path / 'ev'}",
                    "--data.limit_test=0"]) == 2
        assert "--data.limit_test (0) must be >= 1 (unset: all records)" in capsys.readouterr().err
    assert not (tmp_path / "ev").exists()


def test_a_file_of_a_fine_tuned_model_points_at_its_directory(ss_model, fasta, tmp_path, capsys):
    """predict-ss said to import it as the original's .pt; embed read the task model's file as a backbone and
    blamed the head count."""
    weights = ss_model / "finetuned.safetensors"
    for cmd in ("predict-ss", "embed"):
        assert run([cmd, f"--model={weights}", f"--fasta={fasta}", f"--out={tmp_path / cmd}"]) == 2
        assert f"is part of the fine-tuned model {ss_model}: pass that directory" in capsys.readouterr().err


def test_predict_ss_errors_are_clear(ss_model, tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nACGU\n>broken\nACGU123\n")
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={bad}", f"--out={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "bad.fa:4" in err and "'broken'" in err and "invalid characters" in err
    good = tmp_path / "good.fa"
    good.write_text(">a\nACGUACGUAC\n")
    assert run(["predict-ss", f"--model={tiny_checkpoint}", f"--fasta={good}", f"--out={tmp_path}"]) == 2
    assert "is not a fine-tuned model directory" in capsys.readouterr().err
    assert run(["predict-ss", f"--model={tmp_path / 'nope'}", f"--fasta={good}"]) == 2
    assert "not found" in capsys.readouterr().err
    assert run(["predict-ss", f"--model={good}", f"--fasta={good}"]) == 2  # was: 'directory not found' for a file
    assert f"{good} is a file" in (err := capsys.readouterr().err) and "pass the directory" in err
    original = tmp_path / "ss_bprna_ft.pt"
    original.write_bytes(b"")
    assert run(["predict-ss", f"--model={original}", f"--fasta={good}"]) == 2
    assert "import-original-ss --checkpoint=" in capsys.readouterr().err
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={good}", f"--out={tmp_path}", "--threshold=1.5"]) == 2
    assert "--threshold (1.5) is a pair probability" in capsys.readouterr().err
    assert run(["ss", "fly"]) == 2 and run(["nosuchtask"]) == 2


def test_batch_sizes_below_one_are_refused(ss_model, tiny_checkpoint, shared_data, fasta, tmp_path, capsys):
    """--batch_size=0 was 'error: range() arg 3 must not be zero', -1 an AttributeError traceback."""
    for size in (0, -1):
        assert run(["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={tmp_path}",
                    f"--batch_size={size}"]) == 2
        assert f"--batch_size ({size}) must be >= 1" in capsys.readouterr().err
        assert run(["mrl", "train", f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}",
                    f"--train.out_dir={tmp_path}", f"--train.batch_size={size}"]) == 2
        assert f"train.batch_size must be >= 1, got {size}" in capsys.readouterr().err


def test_damaged_model_directories_are_named(ss_model, tiny_checkpoint, fasta, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    def damaged(src, name, damage):
        d = tmp_path / name
        shutil.copytree(src, d)
        damage(d)
        return d

    def error(cmd, model):
        assert run([cmd, f"--model={model}", f"--fasta={fasta}", f"--out={tmp_path / 'out'}", "--progress=false"]) == 2
        return capsys.readouterr().err

    def truncate(path):
        path.write_bytes(path.read_bytes()[:1000])

    def drop_tensor(path):
        state = load_file(path)
        save_file({k: v for k, v in state.items() if k != "pred_head.conv_out.bias"}, path)

    def edit_meta(d, **changes):
        meta = json.loads((d / "finetune.json").read_text())
        (d / "finetune.json").write_text(json.dumps({k: v for k, v in {**meta, **changes}.items() if v is not None}))

    d = damaged(tiny_checkpoint, "no_config", lambda d: (d / "config.json").unlink())
    assert "model.safetensors in this tool's layout but no config.json" in error("embed", d)
    d = damaged(tiny_checkpoint, "bad_json", lambda d: (d / "config.json").write_text("{oops"))
    assert f"{d / 'config.json'}: unreadable JSON" in error("embed", d)
    d = damaged(tiny_checkpoint, "cut", lambda d: truncate(d / "model.safetensors"))
    assert f"{d / 'model.safetensors'}: unreadable safetensors file" in error("embed", d)
    d = damaged(ss_model, "ft_tensor", lambda d: drop_tensor(d / "finetuned.safetensors"))
    assert "finetuned.safetensors and finetune.json do not fit" in error("predict-ss", d)
    d = damaged(ss_model, "ft_threshold", lambda d: edit_meta(d, threshold=None))
    assert f"{d / 'finetune.json'}: missing threshold" in error("predict-ss", d)
    d = damaged(ss_model, "ft_dim", lambda d: edit_meta(d, model={**json.loads((d / "finetune.json").read_text())[
        "model"], "dim": 64}))
    assert "do not fit" in error("predict-ss", d)
    d = damaged(ss_model, "ft_newer_key", lambda d: edit_meta(d, model={**json.loads((d / "finetune.json").read_text())[
        "model"], "newer_field": 1}))
    assert f"{d / 'finetune.json'}: no usable 'model' entry" in error("predict-ss", d)  # was: no file named
    (tmp_path / "text.pt").write_bytes(b"not a checkpoint")
    assert f"{tmp_path / 'text.pt'}: torch.load(weights_only=True) cannot read" in error("embed", tmp_path / "text.pt")


def test_devices_this_machine_lacks_are_one_line_errors(ss_model, fasta, tmp_path, capsys):
    """--device=cuda on a CPU machine was an AssertionError traceback, --device=gpu a RuntimeError one."""
    for device in (f"cuda:{torch.cuda.device_count()}", "gpu"):
        assert run(["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={tmp_path}",
                    f"--device={device}", "--progress=false"]) == 2
        assert f"device {device!r}:" in capsys.readouterr().err


def test_embed_writes_arrays_ids_and_plot(tiny_checkpoint, ncrna_fasta, tmp_path, capsys):
    with gzip.open(ncrna_fasta, "rt") as f:
        head = "".join(islice(f, 400))
    src = tmp_path / "slice.fa"
    src.write_text(head[: head.rfind(">")])
    n = src.read_text().count(">")
    assert n >= 50
    out = tmp_path / "emb"
    assert run(["embed", f"--model={tiny_checkpoint}", f"--fasta={src}", f"--out={out}", "--progress=false"]) == 0
    assert f"wrote {out}/cls.npy ({n}, 32), mean.npy, ids.txt, embeddings.png (" in capsys.readouterr().out
    cls, mean = np.load(out / "cls.npy"), np.load(out / "mean.npy")
    ids = (out / "ids.txt").read_text().split()
    assert cls.shape == mean.shape == (n, 32) and len(ids) == n and ids[0] == "ncrna_000001"
    assert len((out / "labels.txt").read_text().split()) == n
    assert (out / "embeddings.png").stat().st_size > 10_000
    # the first row equals a direct forward of the first sequence
    lm = rio.load_pretrained(tiny_checkpoint)
    tokens = torch.tensor(batch_encode([read_fasta(src)[0].sequence])[0])
    with torch.no_grad():
        rep = lm(tokens).representation[0]
    np.testing.assert_allclose(cls[0], rep[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(mean[0], rep[1:-1].mean(0).numpy(), atol=1e-5)
    # the same from Python, without files: rows in the given order whatever the batching
    from finetune.embed import embed_sequences

    got = embed_sequences(load_backbone(BackboneConfig(path=str(tiny_checkpoint))),
                          [r.sequence for r in read_fasta(src)], batch_size=7)
    np.testing.assert_allclose(got["cls"], cls, atol=1e-5)
    np.testing.assert_allclose(got["mean"], mean, atol=1e-5)


def test_embed_plots_a_sample_of_plot_max_and_leaves_no_partial_arrays(tiny_checkpoint, tmp_path):
    """t-SNE of a million CLS vectors takes hours: the plot shows a seeded sample of --plot_max of them."""
    from finetune.embed import EmbedConfig, embed

    src = tmp_path / "in.fa"
    src.write_text("".join(f">r{i} class={'ab'[i % 2]}\n{'ACGU' * (3 + i % 7)}\n" for i in range(40)))
    result = embed(EmbedConfig(model=str(tiny_checkpoint), fasta=str(src), out=str(tmp_path / "e"), plot_max=12,
                               tsne_min=5, progress=False, batch_size=7))
    assert result["plotted"] == "tsne of 12 sequences sampled of 40"
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["cls.npy", "embeddings.png", "ids.txt",
                                                                  "labels.txt", "mean.npy"]
    lm = rio.load_pretrained(tiny_checkpoint)
    tokens = torch.tensor(batch_encode(["ACGU" * (3 + i % 7) for i in range(40)])[0])
    with torch.no_grad():  # every row, batched by length on one side and all at once (padded) on the other
        rep = lm(tokens).representation
    lengths = [4 * (3 + i % 7) for i in range(40)]
    np.testing.assert_allclose(result["cls"], rep[:, 0].numpy(), atol=1e-5)
    np.testing.assert_allclose(result["mean"], np.stack([rep[i, 1:1 + n].mean(0).numpy()
                                                          for i, n in enumerate(lengths)]), atol=1e-5)


def test_embed_samples_limit_records_in_fasta_order_and_cuts_each_at_max_len(tiny_checkpoint, tmp_path):
    from finetune.embed import EmbedConfig, embed

    src = tmp_path / "in.fa"
    src.write_text("".join(f">r{i}\n{'ACGU' * (2 + i)}\n" for i in range(10)) + ">cut\nACGUACGU\n")
    cfg = EmbedConfig(model=str(tiny_checkpoint), fasta=str(src), out=str(tmp_path / "e"), plot="none", limit=4,
                      progress=False)
    embed(cfg)
    ids, order = (tmp_path / "e" / "ids.txt").read_text().split(), [f"r{i}" for i in range(10)] + ["cut"]
    assert len(ids) == 4 and ids == sorted(ids, key=order.index)
    embed(replace(cfg, limit=10, out=str(tmp_path / "all_but_one")))
    assert len((tmp_path / "all_but_one" / "ids.txt").read_text().split()) == 10
    embed(replace(cfg, seed=1, out=str(tmp_path / "f")))
    assert (tmp_path / "f" / "ids.txt").read_text().split() != ids
    whole = embed(replace(cfg, limit=None, max_len=8, out=str(tmp_path / "g")))
    assert whole["plot"] is None and not (tmp_path / "g" / "embeddings.png").exists()   # --plot=none
    np.testing.assert_array_equal(whole["cls"][9], whole["cls"][10])   # r9 from its first 8 nt: 'cut' itself


@pytest.mark.parametrize(("n", "plot", "plot_max", "plotted"), [
    (6, "auto", 100, "tsne of 6 sequences"), (5, "auto", 100, "pca of 5 sequences"),   # tsne_min=6
    (8, "pca", 100, "pca of 8 sequences"), (8, "auto", 7, "tsne of 7 sequences sampled of 8")])
def test_embed_plots_tsne_from_tsne_min_sequences_or_as_asked(tiny_checkpoint, tmp_path, n, plot, plot_max, plotted):
    from finetune.embed import EmbedConfig, embed

    src = tmp_path / "in.fa"
    src.write_text("".join(f">r{i}\n{'ACGU' * (2 + i)}\n" for i in range(n)))
    result = embed(EmbedConfig(model=str(tiny_checkpoint), fasta=str(src), out=str(tmp_path / "e"), plot=plot,
                               tsne_min=6, plot_max=plot_max, progress=False))
    assert result["plotted"] == plotted


def test_the_legend_keeps_the_most_frequent_labels():
    from finetune.embed import legend_groups

    labels = ["b", "a", "c", "b", "c", "d", "c"]
    assert legend_groups(labels, 2).tolist() == ["b", "other", "c", "b", "c", "other", "c"]
    assert legend_groups(labels, 3).tolist() == ["b", "a", "c", "b", "c", "other", "c"]   # a tie: alphabetical


def test_embed_refuses_empty_requests_and_names_only_what_it_wrote(tiny_checkpoint, tmp_path, capsys):
    two = tmp_path / "two.fa"
    two.write_text(">a\nACGU\n>b\nGGCC\n")
    args = ["embed", f"--model={tiny_checkpoint}", f"--fasta={two}", f"--out={tmp_path / 'e'}", "--progress=false"]
    for bad in ("--max_len=0", "--limit=0", "--batch_size=0", "--plot_max=0"):
        assert run([*args, bad]) == 2
        assert f"error: {bad[:-2]} (0): must be >= 1" in capsys.readouterr().err  # that option only
    assert run(args) == 0  # two records: too few to plot
    assert "embeddings.png" not in capsys.readouterr().out and not (tmp_path / "e" / "embeddings.png").exists()


def test_embed_leaves_no_earlier_run_beside_its_arrays(tiny_checkpoint, tmp_path):
    """A second run into the same OUT kept the first run's 3-row labels.txt and plot beside its 2-row arrays."""
    out = tmp_path / "e"
    for text in (">a class=x\nACGU\n>b class=y\nGGCC\n>c class=x\nAAUU\n", ">a\nACGU\n>b\nGGCC\n"):
        (tmp_path / "in.fa").write_text(text)
        assert run(["embed", f"--model={tiny_checkpoint}", f"--fasta={tmp_path / 'in.fa'}", f"--out={out}",
                    "--progress=false", "--plot=pca"]) == 0
    assert (out / "ids.txt").read_text().split() == ["a", "b"]
    assert not (out / "labels.txt").exists() and not (out / "embeddings.png").exists()


def test_an_interrupted_embed_leaves_no_earlier_runs_ids_beside_its_arrays(tiny_checkpoint, tmp_path, monkeypatch):
    """Found by a crash-safety review: a rerun killed after its arrays were renamed into place left the earlier
    run's ids.txt beside them, pairing other records' ids with these vectors without a word."""
    import finetune.embed as embed

    out, fasta = tmp_path / "e", tmp_path / "in.fa"
    args = ["embed", f"--model={tiny_checkpoint}", f"--fasta={fasta}", f"--out={out}", "--progress=false"]
    fasta.write_text(">a class=x\nACGU\n>b class=y\nGGCC\n>c class=x\nAAUU\n")
    assert run(args) == 0 and (out / "ids.txt").exists()
    written = embed.write_embeddings

    def killed_after_the_arrays(*a, **kw):
        written(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(embed, "write_embeddings", killed_after_the_arrays)
    fasta.write_text(">p\nACGUAC\n>q\nGGCCGG\n")
    with pytest.raises(KeyboardInterrupt):
        run(args)
    assert sorted(p.name for p in out.iterdir()) == ["cls.npy", "mean.npy"]  # no ids.txt: not a complete set
    assert np.load(out / "cls.npy").shape[0] == 2


def test_embed_reads_a_repeated_label_key_as_dataprep_does(tiny_checkpoint, tmp_path, capsys):
    """Embed coloured by the first of two different values where dataprep rejects the record and fine-tuning data
    refused even one value given twice; now one rule: the same value (or an empty `key=`) is fine, two differ: an
    error naming the file and record, before any embedding is computed."""
    src = tmp_path / "in.fa"
    args = ["embed", f"--model={tiny_checkpoint}", f"--fasta={src}", f"--out={tmp_path / 'e'}", "--progress=false"]
    src.write_text(">a class=x class=x\nACGU\n>b class= class=y\nGGCC\n>c\nAAUU\n")
    assert run(args) == 0
    assert (tmp_path / "e" / "labels.txt").read_text().split() == ["x", "y", "NA"]
    src.write_text(">a class=x\nACGU\n>b class=y len=4 class=z\nGGCC\n")
    assert run([*args, f"--out={tmp_path / 'f'}"]) == 2
    assert f"{src}: record 'b' gives class= twice: 'y' and 'z'" in capsys.readouterr().err
    assert not (tmp_path / "f").exists()


def test_embed_warns_when_it_truncates(tiny_checkpoint, tmp_path, capsys):
    """A 3,000-nt record was embedded from its first 1,022 nt without a word."""
    src = tmp_path / "long.fa"
    src.write_text(">short\nACGUACGU\n>nine\nACGUACGUA\n>mrna_1 class=mRNA\nACGUAGGCUA\n")
    args = ["embed", f"--model={tiny_checkpoint}", f"--fasta={src}", f"--out={tmp_path / 'e'}", "--progress=false"]
    assert run([*args, "--max_len=8"]) == 0
    assert "2 record(s) longer than --max_len=8 are embedded from their first 8 nt only; longest: 'mrna_1' (10 nt)" \
        in capsys.readouterr().err
    assert run([*args, "--max_len=10"]) == 0 and "longer than" not in capsys.readouterr().err
    src.write_text(">a\nACGU\n>odd\nACXP\n")
    assert run(args) == 0
    assert f"warning: {src}: 1 record(s) contain letters outside the RiNALMo alphabet (PX), read as <unk>; " \
        "first: 'odd'" in capsys.readouterr().err


def test_backbone_formats_load_the_same_weights(tiny_checkpoint, tmp_path):
    ref = rio.load_pretrained(tiny_checkpoint)
    state = ref.state_dict()
    rio.export_official(state, tmp_path / "rinalmo_tiny_pretrained.pt")
    torch.save({f"lm.{k}": v for k, v in state.items()} | {"threshold": torch.tensor(0.1)}, tmp_path / "ss_ft.pt")
    from safetensors.torch import save_file
    save_file(rio.export_multimolecule(state), tmp_path / "mm.safetensors")
    tokens = torch.tensor(batch_encode(["ACGUAGCUAGC", "GGA"])[0])
    stream = torch.random.get_rng_state()  # loading draws no random initialisation (rnalm.io.with_weights)
    with torch.no_grad():
        want = ref(tokens).representation
        for path, fmt in ((tiny_checkpoint, "rnalm"), (tmp_path / "rinalmo_tiny_pretrained.pt", "official"),
                          (tmp_path / "ss_ft.pt", "official"), (tmp_path / "mm.safetensors", "multimolecule")):
            assert detect_format(Path(path)) == fmt
            heads = {} if fmt == "rnalm" else {"num_heads": 4}  # original files do not record the head count
            lm = load_backbone(BackboneConfig(path=str(path), overrides=heads))
            assert not lm.training  # as load_pretrained: dropout would make two calls on one input differ
            torch.testing.assert_close(lm(tokens).representation, want)
    assert torch.equal(torch.random.get_rng_state(), stream)
    rand = load_backbone(BackboneConfig(random_preset="nano", overrides={"dim": 16, "num_layers": 1,
                                                                                "num_heads": 2}))
    assert rand.config.dim == 16 and not rand.training


def test_a_fine_tuned_model_runs_in_the_dtype_it_is_moved_to(ss_model):
    from finetune.backbone import load_finetuned

    model, _ = load_finetuned(ss_model)
    tokens = torch.tensor(batch_encode(["GGGGAAACCCC", "ACGU"])[0])
    with torch.no_grad():
        want = model(tokens)  # one [L, L] pair-logit map per sequence
        # the head got fp32 input: a dtype error; bf16 logits (|w| up to ~4) are off by <= ~0.03 here
        for dtype, atol, rtol in ((torch.float64, 1e-4, 1e-4), (torch.bfloat16, 0.06, 2 ** -6)):
            got = model.to(dtype)(tokens)
            assert [g.dtype for g in got] == [dtype] * len(want)
            for g, w in zip(got, want):
                torch.testing.assert_close(g.float(), w, atol=atol, rtol=rtol)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_a_device_the_machine_lacks_is_named_and_no_file_is_blamed(ss_model, tiny_checkpoint):
    from finetune.backbone import load_finetuned

    for load, path in ((rio.load_pretrained, tiny_checkpoint), (load_finetuned, ss_model)):
        with pytest.raises(ValueError, match="device 'cuda': this machine has no CUDA device") as e:
            load(path, map_location="cuda")
        assert not isinstance(e.value, rio.WeightsError)  # was: "... do not fit", "unreadable safetensors file"
        with pytest.raises(ValueError, match="'gpu' is not a device"):
            load(path, map_location="gpu")


def test_overrides_reach_every_backbone_kind(ss_model, tiny_checkpoint, fasta, tmp_path):
    from finetune.backbone import load_finetuned

    stream = torch.random.get_rng_state()
    tuned = load_finetuned(ss_model)[0].lm
    lm = load_backbone(BackboneConfig(path=str(ss_model), dropout=0.0, attention_backend="sdpa"))
    assert torch.equal(torch.random.get_rng_state(), stream)  # no random initialisation drawn, head included
    assert (lm.config.attn_dropout, lm.config.residual_dropout, lm.config.attention_backend) == (0.0, 0.0, "sdpa")
    assert tuned.config.attn_dropout == 0.1
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), tuned.state_dict().values()))
    rio.export_official(rio.load_pretrained(tiny_checkpoint).state_dict(), tmp_path / "official.pt")
    assert run(["embed", f"--model={tmp_path / 'official.pt'}", f"--fasta={fasta}", f"--out={tmp_path / 'e'}",
                "--overrides={num_heads: 4}", "--plot=none", "--progress=false"]) == 0
    assert np.load(tmp_path / "e" / "cls.npy").shape == (len(SEQS), 32)


def test_splice_and_mrl_predict(tiny_checkpoint, shared_data, fasta, tmp_path):
    for task, extra in (("splice", []), ("mrl", ["--unfreeze.head_only_epochs=0"])):
        ft = tmp_path / task
        assert run([task, "train", f"--model.path={tiny_checkpoint}", f"--data.root={shared_data}",
                    "--data.limit_train=16", "--data.limit_valid=8", "--data.limit_test=8", "--train.epochs=1",
                    f"--train.out_dir={ft}", "--train.progress=false", *extra]) == 0
        assert run([task, "predict", f"--model={ft}", f"--fasta={fasta}", f"--out={ft}/pred",
                    "--progress=false"]) == 0
        rows = [row.split("\t") for row in (ft / "pred" / "predictions.tsv").read_text().splitlines()]
        assert len(rows) == 1 + len(SEQS) and rows[1][0] == "hairpin"
        if task == "mrl":
            assert rows[0] == ["id", "mrl"]
        else:   # the predicted class is the most probable one
            classes = [c.removeprefix("p_") for c in rows[0][2:]]
            assert rows[0][:2] == ["id", "prediction"] and len(classes) == 3
            assert all(row[1] == classes[max(range(3), key=lambda k: float(row[2 + k]))] for row in rows[1:])
        for structure_only in ("--format=ct", "--threshold=0.3"):  # refused, not silently ignored
            with pytest.raises(SystemExit):
                run([task, "predict", f"--model={ft}", f"--fasta={fasta}", f"--out={ft}/x", structure_only])
    assert run(["predict-ss", f"--model={tmp_path / 'mrl'}", f"--fasta={fasta}"]) == 2


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "finetune", "ss", "train", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--train.lr=" in out.stdout and "--unfreeze.head_only_epochs=" in out.stdout
    out = subprocess.run([sys.executable, "-m", "finetune", "predict-ss", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--format=dbn" in out.stdout and "--batch_size=8" in out.stdout


def test_usage_is_a_usage_error_without_a_command_and_an_answer_to_help(capsys):
    assert run([]) == 2 and "usage:" in capsys.readouterr().out
    assert run(["--help"]) == 0 and "python -m finetune embed" in capsys.readouterr().out
    assert run(["ss"]) == 2 and "expected train, evaluate or predict" in capsys.readouterr().err
    assert run(["import-original-ss", "--out=x"]) == 2
    assert "--checkpoint is required" in capsys.readouterr().err


def test_a_process_that_left_families_to_others_names_them_and_their_holders(tmp_path, capsys):
    from finetune.cli import _print_summary

    _print_summary({"pending": {"5s": "pid 12 on node-a", "srp": "no process"}}, str(tmp_path), "train")
    out = capsys.readouterr().out
    assert f"the summary ({tmp_path}/results.md) is left to the process that finishes the last one" in out
    assert "  5s: pid 12 on node-a\n  srp: no process\n" in out and "results:" not in out


def test_import_original_ss_checkpoint_then_predict(ss_model, fasta, tmp_path, capsys):
    """An original-layout `ss_*_ft.pt` (lm.*, pred_head.*, threshold) becomes a directory predict-ss reads."""
    from finetune.backbone import load_finetuned

    model, _ = load_finetuned(ss_model)
    original = {k: v for k, v in model.state_dict().items()} | {"threshold": torch.tensor(0.17)}
    torch.save(original, tmp_path / "ss_tiny_ft.pt")
    out = tmp_path / "imported"
    assert run(["import-original-ss", f"--checkpoint={tmp_path / 'ss_tiny_ft.pt'}", f"--out={out}",
                "--num_heads=4"]) == 0
    imported, meta = load_finetuned(out)
    assert meta["threshold"] == pytest.approx(0.17) and meta["task"] == "ss"
    tokens = torch.tensor(batch_encode(["GGGGAAACCCCAUAUGC"])[0])
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens)[0], model(tokens)[0])
    assert run(["predict-ss", f"--model={out}", f"--fasta={fasta}", f"--out={tmp_path / 'p'}",
                "--progress=false"]) == 0
    torch.save({k: v for k, v in original.items() if not k.startswith("pred_head.")}, tmp_path / "lm_only.pt")
    assert run(["import-original-ss", f"--checkpoint={tmp_path / 'lm_only.pt'}", "--num_heads=4"]) == 2
    assert "not an original secondary-structure checkpoint" in capsys.readouterr().err


def test_an_imported_archiveii_model_is_scored_on_its_held_out_family_only(ss_model, tmp_path, capsys):
    """The original's ss_archiveII-<family>_ft.pt saw the 8 other families: `ss evaluate` on one of them (or on
    bpRNA TS0, which holds copies of them) scored it on its training data."""
    from finetune.backbone import load_finetuned

    model, _ = load_finetuned(ss_model)
    original = dict(model.state_dict()) | {"threshold": torch.tensor(0.2)}
    for name in ("rinalmo_giga_ss_archiveII-tRNA_ft.pt", "ss_bprna_ft.pt", "ss_archiveII-16S_ft.pt",
                 "ss_archiveII-grp2_ft.pt"):
        torch.save(original, tmp_path / name)

    def imported(name: str, *options: str) -> dict:
        out = tmp_path / name.replace(".pt", "")
        assert run(["import-original-ss", f"--checkpoint={tmp_path / name}", f"--out={out}", "--num_heads=4",
                    *options]) == 0
        return load_finetuned(out)[1].get("data", {})

    assert imported("rinalmo_giga_ss_archiveII-tRNA_ft.pt") == {"dataset": "ArchiveII", "test": "tRNA"}
    assert "ArchiveII family tRNA held out" in capsys.readouterr().out
    assert imported("ss_archiveII-16S_ft.pt")["test"] == "16s"
    assert imported("ss_bprna_ft.pt") == {} and imported("ss_bprna_ft.pt", "--held_out_family=RNaseP")["test"] == "RNaseP"
    assert run(["ss", "evaluate", f"--model.path={tmp_path / 'rinalmo_giga_ss_archiveII-tRNA_ft'}",
                "--data.test_family=5s", f"--train.out_dir={tmp_path / 'eval'}"]) == 2
    assert "with family tRNA held out; family 5s was in its training data" in capsys.readouterr().err
    assert run(["import-original-ss", f"--checkpoint={tmp_path / 'ss_archiveII-grp2_ft.pt'}", "--num_heads=4",
                f"--out={tmp_path / 'grp2'}"]) == 2
    assert "family 'grp2', not one of" in capsys.readouterr().err and not (tmp_path / "grp2").exists()


@pytest.mark.parametrize("task", ["ss", "splice", "mrl"])
def test_an_override_keeps_the_tasks_own_defaults_of_its_section(task):
    """Every documented command passes --train.out_dir (or similar): that rebuilt the task's train/unfreeze
    sections from the class defaults (splice: batch 32 -> 1, AdamW -> Adam; mrl: unfreezing 27 blocks -> none)."""
    from dataclasses import replace

    from finetune.tasks import mrl, splice, ss
    from rnalm.configfile import from_cli

    cls = {"ss": ss.SSConfig, "splice": splice.SpliceConfig, "mrl": mrl.MRLConfig}[task]
    cfg = from_cli(cls, ["--train.out_dir=elsewhere", "--unfreeze.lr_divisor=5"])
    assert cfg.train == replace(cls().train, out_dir="elsewhere")
    assert cfg.unfreeze == replace(cls().unfreeze, lr_divisor=5.0)


def test_embed_that_cannot_reserve_its_arrays_says_how_much_and_leaves_nothing(tiny_checkpoint, tmp_path,
                                                                               monkeypatch):
    import errno

    import finetune.embed as embed_module

    def disk_full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embed_module.os, "posix_fallocate", disk_full)
    src = tmp_path / "in.fa"
    src.write_text(">a\nACGU\n>b\nGGCC\n")
    with pytest.raises(OSError, match=r"\.cls\.npy\.tmp: cannot reserve 0\.00 GB for the embeddings \(No space"):
        embed_module.embed(embed_module.EmbedConfig(model=str(tiny_checkpoint), fasta=str(src),
                                                    out=str(tmp_path / "e"), progress=False, plot="none"))
    assert list((tmp_path / "e").iterdir()) == []


def test_embed_that_fails_midway_leaves_no_partial_arrays(tiny_checkpoint, tmp_path, monkeypatch):
    import finetune.embed as embed_module

    calls = []

    def failing_mean(rep, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory (simulated)")
        return embed_module.nucleotide_mask(tokens).float().sum(1, keepdim=True) * rep[:, 0]

    monkeypatch.setattr(embed_module, "nucleotide_mean", failing_mean)
    src = tmp_path / "in.fa"
    src.write_text("".join(f">r{i}\n{'ACGU' * (3 + i)}\n" for i in range(6)))
    with pytest.raises(RuntimeError, match="simulated"):
        embed_module.embed(embed_module.EmbedConfig(model=str(tiny_checkpoint), fasta=str(src), batch_size=2,
                                                    out=str(tmp_path / "e"), progress=False, plot="none"))
    assert list((tmp_path / "e").iterdir()) == []


def test_structures_from_python_are_those_predict_ss_writes(ss_model, fasta, tmp_path):
    """The documented notebook route: load_finetuned + predict_pairs + to_dot_bracket, no files."""
    from finetune.backbone import load_finetuned
    from finetune.structure import to_dot_bracket
    from finetune.tasks.ss import predict_pairs

    model, meta = load_finetuned(ss_model)
    seqs = list(SEQS.values())
    pairs = predict_pairs(model, seqs, 0.01, progress=False)  # a low threshold: the tiny model pairs something
    assert run(["predict-ss", f"--model={ss_model}", f"--fasta={fasta}", f"--out={tmp_path}", "--threshold=0.01",
                "--progress=false"]) == 0
    written = (tmp_path / "predictions.dbn").read_text().splitlines()[2::3]
    assert [to_dot_bracket(p, len(s)) for p, s in zip(pairs, seqs)] == written and sum(map(len, pairs)) > 0
    with pytest.raises(TypeError, match=r"got one sequence: pass \[seq\]"):
        predict_pairs(model, seqs[0], meta["threshold"])


def test_a_train_run_into_an_out_dir_another_live_run_holds_is_refused(ss_model, tmp_path, capsys, monkeypatch):
    """Two runs into one OUT overwrote each other's model and results; now the second is refused, naming the
    first, and nothing of the first's is touched."""
    import shutil

    from finetune import outlock
    from rnalm.runlock import RunLock

    monkeypatch.setattr(outlock, "MOMENT_WAIT_S", 0.5)  # what the refusal waits for other processes' moments
    ft = tmp_path / "ft"
    shutil.copytree(ss_model, ft)
    before = {p.name: p.read_bytes() for p in ft.iterdir()}
    with RunLock(ft):
        assert run(["ss", "train", f"--model.path={ss_model}", f"--train.out_dir={ft}", "--train.epochs=1"]) == 2
        assert f"{ft} is in use by another run: pid {os.getpid()}" in capsys.readouterr().err
        before["run.lock"] = (ft / "run.lock").read_bytes()
        assert {p.name: p.read_bytes() for p in ft.iterdir()} == before


def test_a_model_being_trained_is_read_with_a_warning(ss_model, shared_data, fasta, tmp_path, capsys):
    """Evaluating or predicting with OUT (or an ArchiveII fold's directory) while its run trains gave the best
    epoch so far with no word that a run was still writing it."""
    import shutil

    ft, empty = tmp_path / "ft", tmp_path / "fold"
    shutil.copytree(ss_model, ft)
    empty.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from rnalm.runlock import RunLock\n"
         "locks = [RunLock(d) for d in sys.argv[1:]]\n[l.acquire() for l in locks]\nprint('held', flush=True)\n"
         "time.sleep(120)", str(ft), str(empty)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        evaluate = ["ss", "evaluate", f"--model.path={ft}", f"--data.root={shared_data}", "--data.limit_test=2",
                    "--eval.rnafold=false", f"--train.out_dir={tmp_path / 'ev'}", "--train.progress=false"]
        predict = ["predict-ss", f"--model={ft}", f"--fasta={fasta}", f"--out={tmp_path / 'pred'}"]
        in_place = [*evaluate[:-2], f"--train.out_dir={ft}", "--train.progress=false"]  # beside the model trained
        for argv in (evaluate, predict, in_place):
            assert run(argv) == 0
            err = capsys.readouterr().err
            assert f"warning: {ft} is being trained now (pid {holder.pid} on" in err and "best epoch so far" in err
        assert run(["predict-ss", f"--model={empty}", f"--fasta={fasta}", f"--out={tmp_path / 'p2'}"]) != 0
        assert f"A run trains into it now (pid {holder.pid} on" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    assert run(predict) == 0
    assert "warning" not in capsys.readouterr().err  # a dead holder's lock is no warning


@pytest.mark.parametrize("task, relative", [("ss", "ss/bpRNA-1m90_len10-100.csv.gz"),
                                            ("splice", "splice/gue_splice_reconstructed_dev_test.csv.gz"),
                                            ("mrl", "mrl/sample2019_varlen25to100_random7600_human7600.csv.gz")])
def test_a_missing_data_folder_says_how_to_point_at_it(tiny_checkpoint, tmp_path, capsys, task, relative):
    """From a user test: the error named the file only ('file not found'), not --data.root or RNALM_SHARED_DATA."""
    rc = run([task, "train", f"--model.path={tiny_checkpoint}", f"--data.root={tmp_path}", "--train.epochs=1",
              f"--train.out_dir={tmp_path / 'out'}", "--train.progress=false"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{tmp_path / relative} not found: --data.root=DIR names the folder that holds" in err
    assert "RNALM_SHARED_DATA" in err and "Traceback" not in err
