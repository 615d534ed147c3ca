"""Fine-tuning on the user's own labelled files (`classify`, `regress`): real ncRNA sequences of three Rfam classes
(and a value computed from each sequence) written as CSV/TSV; training, evaluation and prediction through the CLI
and the API; bad files named with their line and reason."""
from __future__ import annotations

import csv
import gzip
import json

import numpy as np
import pytest

from finetune.backbone import BackboneConfig, load_finetuned
from finetune.cli import run
from finetune.structure import StructureError, read_fasta
from finetune.tasks import classify, regress
from finetune.tasks.user_data import UserDataConfig, read_labelled, user_splits
from finetune.trainer import TrainConfig

CLASSES = ("5S_rRNA", "tRNA", "miRNA")


@pytest.fixture(scope="module")
def family_records(shared_data):
    """(id, sequence, class): the first 40 records of each of three classes of the ncRNA corpus."""
    out: dict[str, list[tuple[str, str, str]]] = {c: [] for c in CLASSES}
    for r in read_fasta(shared_data / "ncrna" / "ncrna_corpus.fasta.gz"):
        label = dict(w.split("=", 1) for w in r.description.split() if "=" in w).get("class")
        if label in out and len(out[label]) < 40:
            out[label].append((r.id, r.sequence, label))
    return out


def write_table(path, rows, header=("id", "sequence", "label")):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wt", newline="") as f:
        w = csv.writer(f, delimiter="\t" if ".tsv" in path.suffixes else ",")
        w.writerow(header)
        w.writerows(rows)
    return path


def gc(seq: str) -> float:
    return sum(c in "GC" for c in seq) / len(seq)


def test_classify_trains_evaluates_and_predicts_the_users_classes(tiny_checkpoint, family_records, tmp_path, capsys):
    train_rows = [r for c in CLASSES for r in family_records[c][:30]]
    test_rows = [r for c in CLASSES for r in family_records[c][30:]]
    train = write_table(tmp_path / "train.csv", train_rows)
    test = write_table(tmp_path / "test.tsv.gz", test_rows)  # tab-separated by its suffix, and compressed
    out = tmp_path / "ft"
    assert run(["classify", "train", f"--model.path={tiny_checkpoint}", f"--data.train={train}",
                f"--data.test={test}", "--data.valid_fraction=0.2", f"--train.out_dir={out}", "--train.epochs=3",
                "--train.batch_size=16", "--train.lr=3e-3", "--train.progress=false"]) == 0
    result = json.loads((out / "results.json").read_text())
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    row = result["rows"]["test.tsv.gz"]
    assert row["n"] == 30 and {"f1_5S_rRNA", "f1_miRNA", "f1_tRNA", "macro_f1", "accuracy"} <= set(row)
    split = result["splits"]
    assert result["data"]["valid"] == "0.2 of train (seed 0)"
    assert split["train"] + split["valid"] + result["removed_near_duplicates"] + result["removed_valid_near_train"] \
        == 90 and split["test"] == 30
    assert f"{result['removed_near_duplicates']} train/valid record(s)" in (out / "results.md").read_text()
    _, meta = load_finetuned(out)
    assert meta["task"] == "classify" and meta["classes"] == ["5S_rRNA", "miRNA", "tRNA"]

    again = classify.evaluate(classify.ClassifyConfig(model=BackboneConfig(path=str(out)),
                                                      data=UserDataConfig(test=str(test)),
                                                      train=TrainConfig(out_dir=str(tmp_path / "eval"), progress=False)))
    assert again["rows"]["test.tsv.gz"] == pytest.approx(row)

    fasta = tmp_path / "new.fa"
    fasta.write_text("".join(f">{rid}\n{seq}\n" for rid, seq, _ in test_rows[:5]))
    capsys.readouterr()
    assert run(["classify", "predict", f"--model={out}", f"--fasta={fasta}", f"--out={tmp_path / 'pred'}",
                "--progress=false"]) == 0
    lines = (tmp_path / "pred" / "predictions.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["id", "prediction", "p_5S_rRNA", "p_miRNA", "p_tRNA"]
    assert [ln.split("\t")[0] for ln in lines[1:]] == [rid for rid, _, _ in test_rows[:5]]
    assert all(ln.split("\t")[1] in CLASSES and sum(map(float, ln.split("\t")[2:])) == pytest.approx(1, abs=1e-3)
               for ln in lines[1:])
    fasta.write_text(">odd\nACGXUACGU\n")
    assert run(["classify", "predict", f"--model={out}", f"--fasta={fasta}", f"--out={tmp_path / 'odd'}",
                "--progress=false"]) == 0
    assert "1 record(s) contain letters outside the RiNALMo alphabet (X), read as <unk>; first: 'odd'" in \
        capsys.readouterr().err


def test_regress_trains_on_the_users_values_without_clamping_them(tiny_checkpoint, family_records, tmp_path):
    rows = [(rid, seq, f"{gc(seq) - 0.55:.4f}") for c in CLASSES for rid, seq, _ in family_records[c]]
    train = write_table(tmp_path / "train.csv", rows[::2], header=("name", "seq", "gc"))
    valid = write_table(tmp_path / "valid.csv", rows[1::4], header=("name", "seq", "gc"))
    test = write_table(tmp_path / "test.csv", rows[3::4], header=("name", "seq", "gc"))
    data = UserDataConfig(train=str(train), valid=str(valid), test=str(test), sequence_column="seq",
                          label_column="gc")
    cfg = regress.RegressConfig(model=BackboneConfig(path=str(tiny_checkpoint)), data=data,
                                train=TrainConfig(out_dir=str(tmp_path / "ft"), epochs=4, batch_size=16, lr=3e-3,
                                                  progress=False))
    result = regress.train(cfg)
    losses = [h["train_loss"] for h in result["history"]]
    assert losses[-1] < losses[0], losses
    assert set(result["rows"]) == {"all"} and result["rows"]["all"]["n"] == 30
    model, meta = load_finetuned(tmp_path / "ft")
    assert meta["task"] == "regress" and meta["scaler"]["min"] is None
    trained = regress.load_splits(data).train  # the training file minus near-duplicates of test records
    assert meta["scaler"]["mean"] == pytest.approx(np.mean([e.value for e in trained]))
    again = regress.evaluate(regress.RegressConfig(model=BackboneConfig(path=str(tmp_path / "ft")),
                                                   data=UserDataConfig(test=str(test)),  # columns: the model's
                                                   train=TrainConfig(out_dir=str(tmp_path / "eval"), progress=False)))
    assert again["rows"]["all"] == pytest.approx(result["rows"]["all"])
    first = regress.evaluate(regress.RegressConfig(model=BackboneConfig(path=str(tmp_path / "ft")),
                                                   data=UserDataConfig(test=str(test), limit_test=7),
                                                   train=TrainConfig(out_dir=str(tmp_path / "e7"), progress=False)))
    assert first["rows"]["all"]["n"] == 7
    assert (tmp_path / "eval" / "eval_results.md").read_text().startswith("### test.csv")
    with pytest.raises(ValueError, match="is a fine-tuned 'regress' model, not 'classify'"):
        classify.evaluate(classify.ClassifyConfig(model=BackboneConfig(path=str(tmp_path / "ft")), data=data))


def test_a_model_whose_training_run_was_killed_is_read_with_a_warning(tiny_checkpoint, family_records, tmp_path,
                                                                     monkeypatch, capsys):
    """Found by a crash-safety review: a run killed after its first epoch's save left a model that predict and
    evaluate used without a word once the run's lock was stale (no live holder)."""
    from finetune import trainer

    rows = [(rid, seq, f"{gc(seq):.4f}") for c in CLASSES for rid, seq, _ in family_records[c]]
    data = UserDataConfig(train=str(write_table(tmp_path / "train.csv", rows[::2])),
                          valid=str(write_table(tmp_path / "valid.csv", rows[1::4])),
                          test=str(write_table(tmp_path / "test.csv", rows[3::4])))
    cfg = regress.RegressConfig(model=BackboneConfig(path=str(tiny_checkpoint)), data=data,
                                train=TrainConfig(out_dir=str(tmp_path / "ft"), epochs=2, batch_size=16,
                                                  progress=False))
    epochs, real = [], trainer.train_epoch

    def killed_in_the_second_epoch(*a, **kw):
        epochs.append(1)
        if len(epochs) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    with monkeypatch.context() as m:
        m.setattr(trainer, "train_epoch", killed_in_the_second_epoch)
        with pytest.raises(KeyboardInterrupt):
            regress.train(cfg)
    capsys.readouterr()
    load_finetuned(tmp_path / "ft")
    assert f"warning: the run that trained {tmp_path / 'ft'} stopped before its end" in capsys.readouterr().err
    regress.train(cfg)
    capsys.readouterr()
    _, meta = load_finetuned(tmp_path / "ft")
    assert meta["finished"] is True and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("rows, header, parse, message", [
    ([("a", "ACGU", "x")], ("id", "seq", "label"), str, r"train\.csv: no column 'sequence' in the header"),
    ([("a", "ACGU", "x"), ("b", "AC1U", "y")], ("id", "sequence", "label"), str,
     r"train\.csv:3 has invalid characters '1'"),
    ([("a", "ACGU", "x"), ("b", "", "y")], ("id", "sequence", "label"), str, r"train\.csv:3: empty sequence"),
    ([("a", "ACGU", "")], ("id", "sequence", "label"), str, r"train\.csv:2: empty label"),
    ([("a", "ACGU", "1.5"), ("b", "ACGU", "high")], ("id", "sequence", "label"), regress.parse_value,
     r"train\.csv:3: label 'high' is not a number"),
    ([("a", "ACGU", "nan")], ("id", "sequence", "label"), regress.parse_value,
     r"train\.csv:2: label 'nan' is not a finite number"),
    ([], ("id", "sequence", "label"), str, r"train\.csv: no records"),
    ([("a", "ACGU")], ("id", "sequence", "label"), str, r"train\.csv:2: 2 field\(s\), the header has 3"),
    # (a user review: a comma in an unquoted id shifted the columns, the extra field dropped without a word)
    ([("a", "ACGU", "x"), ("b", "c", "GGCC", "y")], ("id", "sequence", "label"), str,
     r"train\.csv:3: 4 field\(s\), the header has 3 \(a value holding the separator must be quoted\)"),
])
def test_bad_files_are_named_with_line_and_reason(tmp_path, rows, header, parse, message):
    path = write_table(tmp_path / "train.csv", rows, header)
    with pytest.raises(StructureError, match=message):
        read_labelled(str(path), UserDataConfig(), lambda label, where: parse(label, where) if parse is not str
                      else label)


def test_a_test_label_unknown_to_training_and_a_single_class_are_refused(tmp_path):
    train = write_table(tmp_path / "train.csv", [("a", "ACGUAGCU", "yes"), ("b", "GGCCAAUU", "no")])
    test = write_table(tmp_path / "test.csv", [("c", "ACGUAGCA", "yes"), ("d", "UUUUAAAA", "maybe")])
    with pytest.raises(StructureError, match=r"test\.csv:3: label 'maybe' is not a class of the training file"):
        classify.load_splits(UserDataConfig(train=str(train), test=str(test)))
    one = write_table(tmp_path / "one.csv", [("a", "ACGUAGCU", "yes"), ("b", "GGCCAAUU", "yes")])
    with pytest.raises(ValueError, match="one class only"):
        classify.load_splits(UserDataConfig(train=str(one), test=str(test)))
    with pytest.raises(ValueError, match="--data.test is required"):
        classify.load_splits(UserDataConfig(train=str(train)))


def test_labels_sort_numbers_numerically_and_the_rest_as_text():
    assert classify.sorted_labels({"10", "2", "b", "a", "-1"}) == ["-1", "2", "10", "a", "b"]
    # nan compares false with everything: as a number its place depended on the set's (hash-seeded) order
    for labels in ({"2", "nan", "1", "10", "inf"}, {"inf", "10", "1", "nan", "2"}):
        assert classify.sorted_labels(labels) == ["1", "2", "10", "inf", "nan"]


def test_near_duplicates_of_test_records_leave_train_and_valid(family_records, capsys):
    recs = [(seq, i) for i, (_, seq, _) in enumerate(family_records["tRNA"][:20])]
    test = recs[:2]
    train, valid = recs[2:12] + [test[0]], recs[12:] + [(test[1][0][:-3], 99)]  # a copy, and a copy cut short
    s = user_splits(train, valid, test, lambda e: e[0], UserDataConfig())
    assert test[0] not in s.train and all(e[1] != 99 for e in s.valid) and s.removed_near_duplicates >= 2
    assert len(s.train) + len(s.valid) + s.removed_near_duplicates == len(train) + len(valid)
    kept = user_splits(train, valid, test, lambda e: e[0], UserDataConfig(near_dup_kmer=0))
    assert kept.removed_near_duplicates == 0 and (sorted(kept.train), sorted(kept.valid)) == (sorted(train), sorted(valid))
    assert kept.train != train  # shuffled (seeded): --data.limit_train on a file sorted by class is not one class
    assert kept.valid != valid  # and the user's validation file (--data.limit_valid)
    assert "validation sequences are also in the training data" not in capsys.readouterr().err
    user_splits(train, valid + [(train[0][0].lower().replace("u", "t"), 7)], test, lambda e: e[0], UserDataConfig())
    assert "warning: 1 of " in capsys.readouterr().err  # a copy in another case, DNA letters
    user_splits(train + [(valid[0][0].replace("U", "T"), 7)], valid, test, lambda e: e[0], UserDataConfig())
    assert "warning: 1 of " in capsys.readouterr().err  # the training copy in DNA letters
    run_only = user_splits(train, valid, test, lambda e: e[0], UserDataConfig(near_dup_kmer=0, near_dup_shared_run=30))
    assert run_only.removed_near_duplicates == 2  # the identical-stretch rule works without the k-mer rule
    drawn = user_splits(recs[2:], None, test, lambda e: e[0], UserDataConfig(valid_fraction=0.2, near_dup_kmer=0))
    assert len(drawn.valid) == 4 and sorted(drawn.train + drawn.valid) == sorted(recs[2:])


def test_ss_trains_on_the_users_structure_files_and_scores_rnafold_beside(tiny_checkpoint, shared_data, tmp_path):
    from finetune.predict import _write_dbn
    from finetune.ss_data import load_bprna
    from finetune.structure import write_bpseq

    bprna = load_bprna(shared_data)
    (tmp_path / "train").mkdir()
    for rec in bprna["TR0"][:12]:  # each twice: validation drawn from them holds near-copies of training records
        for name in (rec.id, f"{rec.id}_copy"):
            write_bpseq(rec, tmp_path / "train" / f"{name}.bpseq")
    _write_dbn(bprna["TS0"][:8], tmp_path)
    test = tmp_path / "test.dbn"
    (tmp_path / "predictions.dbn").rename(test)
    out = tmp_path / "ft"
    assert run(["ss", "train", f"--model.path={tiny_checkpoint}", "--data.dataset=files",
                f"--data.train={tmp_path / 'train'}", f"--data.test={test}", "--data.valid_fraction=0.25",
                f"--train.out_dir={out}", "--train.epochs=1", "--train.progress=false"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["test_set"] == "test.dbn" and result["rows"]["RNAfold"]["n"] == 8
    assert result["splits"]["test"] == 8
    data, note = result["data"], (out / "results.md").read_text()
    assert data["removed_valid_near_train"] > 0 and result["splits"]["valid"] > 0
    assert result["splits"]["train"] + result["splits"]["valid"] + data["removed_near_duplicates"] \
        + data["removed_valid_near_train"] == 24
    assert f"{data['removed_near_duplicates']} train/valid record(s)" in note
    assert f"so were {data['removed_valid_near_train']} validation record(s) drawn from train" in note
    assert run(["ss", "evaluate", f"--model.path={out}", "--data.dataset=files", f"--data.test={test}",
                f"--train.out_dir={tmp_path / 'eval'}", "--train.progress=false", "--eval.rnafold=false"]) == 0
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    model_row = next(k for k in result["rows"] if k != "RNAfold")
    assert list(again["rows"]) == [model_row]  # --eval.rnafold=false
    assert again["rows"][model_row] == pytest.approx(result["rows"][model_row])
    # from a user review: without --data.dataset it scored bpRNA TS0 (the default) with no word; now its own test
    assert run(["ss", "evaluate", f"--model.path={out}", f"--train.out_dir={tmp_path / 'own'}",
                "--train.progress=false", "--eval.rnafold=false"]) == 0
    own = json.loads((tmp_path / "own" / "eval_results.json").read_text())
    assert own["test_set"] == "test.dbn" and own["rows"][model_row] == pytest.approx(result["rows"][model_row])


@pytest.mark.parametrize("name, text, message", [
    ("cr.csv", "sequence,label\rACGU,a\rGGCC,b\r", r"cr\.csv:\d+: new-line character seen in unquoted field"),
    ("open.csv", 'sequence,label,note\nACGU,a,"partial 5\' end\nGGCC,b,x\n', r"open\.csv:\d+: unexpected end of data"),
    ("twice.csv", "label,sequence,label\nx,ACGU,y\n", r"twice\.csv: the header names column 'label' more than once"),
    ("short.csv", "sequence,note,label\nACGU,x\n", r"short\.csv:2: 2 field\(s\)"),
    ("blank.csv", "sequence,label\nACGU,a\n\n\nAC GU,b\n", r"blank\.csv:5 has invalid characters ' '"),
])
def test_csv_trouble_is_an_error_naming_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(StructureError, match=message):
        read_labelled(str(tmp_path / name), UserDataConfig(), lambda label, where: label)


def test_tsv_quotes_are_text_and_spaces_around_fields_do_not_count(tmp_path):
    rows = "".join(f" ACGU{'A' * i} \t{i % 2}\t\"partial 5' end\n" for i in range(5))
    (tmp_path / "notes.tsv").write_text("sequence \t label\tnote\n" + rows)
    got = read_labelled(str(tmp_path / "notes.tsv"), UserDataConfig(), lambda label, where: label)
    assert len(got) == 5 and got[4] == ("ACGUAAAA", "0")


def test_a_bad_data_file_at_train_start_keeps_the_model_already_in_out(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "ft"
    out.mkdir()
    earlier = {name: f"earlier {name}" for name in ("finetuned.safetensors", "finetune.json", "results.json")}
    for name, text in earlier.items():
        (out / name).write_text(text)
    train = write_table(tmp_path / "train.csv", [("a", "ACGUAGCU", "x"), ("b", "GG1CAAUU", "y")])
    base = ["classify", "train", f"--model.path={tiny_checkpoint}", f"--train.out_dir={out}"]
    assert run([*base, f"--data.train={train}"]) == 2  # no --data.test
    assert run([*base, f"--data.train={train}", f"--data.test={train}"]) == 2  # a bad line
    assert "train.csv:3 has invalid characters '1'" in capsys.readouterr().err
    ss = ["ss", "train", f"--model.path={tiny_checkpoint}", f"--train.out_dir={out}"]
    assert run([*ss, "--data.dataset=files", f"--data.train={tmp_path / 'nope'}", f"--data.test={train}"]) == 2
    two = tmp_path / "two.dbn"
    two.write_text(">a\nGGGAAACCC\n(((...)))\n>b\nGGGAAAACCC\n(((....)))\n")  # 0.1 of 2 leaves no validation
    assert run([*ss, "--data.dataset=files", f"--data.train={two}", f"--data.test={two}", "--data.near_dup_kmer=0"]) == 2
    assert run([*ss, f"--data.train={two}", f"--data.test={two}"]) == 2  # without --data.dataset=files
    err = capsys.readouterr().err
    assert "empty split" in err and "add --data.dataset=files" in err
    assert {name: (out / name).read_text() for name in earlier} == earlier


def test_evaluate_refuses_a_model_of_another_task(tiny_checkpoint, tmp_path):
    """splice evaluate scored a 2-class model's argmax against GUE's 3 labels; mrl and ss raised a KeyError."""
    from finetune.backbone import TaskModel, save_finetuned
    from finetune.heads import SpliceSiteHead
    from finetune.tasks import mrl, splice, ss
    from rnalm.io import load_pretrained

    lm = load_pretrained(tiny_checkpoint)
    save_finetuned(TaskModel(lm, SpliceSiteHead(lm.config.dim, 2)), tmp_path / "two", {"task": "classify",
                                                                                     "classes": ["a", "b"]})
    model = BackboneConfig(path=str(tmp_path / "two"))
    for module, cfg in ((splice, splice.SpliceConfig), (mrl, mrl.MRLConfig), (ss, ss.SSConfig)):
        with pytest.raises(ValueError, match=f"is a fine-tuned 'classify' model, not '{module.__name__.split('.')[-1]}'"):
            module.evaluate(cfg(model=model))


def test_ss_structure_file_options_without_the_files_dataset_are_refused(tmp_path):
    from finetune.tasks import ss

    with pytest.raises(ValueError, match="--data.train, --data.test name structure files: add --data.dataset=files"):
        ss.load_splits(ss.SSDataConfig(train=str(tmp_path), test=str(tmp_path / "t.ct")))
    with pytest.raises(ValueError, match="--data.test name structure files"):
        ss.test_records(ss.SSDataConfig(test=str(tmp_path / "t.ct")))


def test_regression_targets_are_standardised_before_float32_and_constant_ones_to_zero():
    batch = [regress.Example("ACGU", 1e8 + d) for d in (-1.0, 0.0, 1.0, 2.0)]
    scaler = regress.Scaler(mean=1e8 + 0.5, std=1.118)
    assert regress.standardised(scaler, batch).tolist() == pytest.approx([-1.3417, -0.4472, 0.4472, 1.3417], abs=1e-3)
    assert regress.Scaler.of(np.array([1.0, 2.0, 3.0, 4.0])) == regress.Scaler(2.5, pytest.approx(1.118, abs=1e-3))
    constant = regress.Scaler.of(np.array([3.0, 3.0]), clamp_min=0.0)
    assert constant == regress.Scaler(3.0, 1.0, 0.0) and regress.standardised(constant, batch[:1]).isfinite().all()


def test_fasta_files_carry_their_labels_in_the_headers(family_records, tmp_path):
    def fasta(path, rows, key="class"):
        path.write_text("".join(f">{rid} source=x {key}={label}\n{seq}\n" for rid, seq, label in rows))
        return path

    train = fasta(tmp_path / "train.fa", [r for c in CLASSES for r in family_records[c][:20]])
    test = fasta(tmp_path / "test.v2.fasta", [r for c in CLASSES for r in family_records[c][20:25]])
    splits, classes = classify.load_splits(UserDataConfig(train=str(train), test=str(test), label_column="class"))
    assert classes == ["5S_rRNA", "miRNA", "tRNA"] and len(splits.test) == 15
    assert splits.test[0] == (family_records["5S_rRNA"][20][1], 0)
    with pytest.raises(StructureError, match=r"train\.fa: record 'ncrna_\d+' has no label=\.\.\. in its header"):
        classify.load_splits(UserDataConfig(train=str(train), test=str(test)))
    twice = tmp_path / "twice.fa"
    twice.write_text(">r0 subclass=tRNA class=tRNA class= class=tRNA\nACGUACGU\n"  # one value, as in dataprep
                     ">r1 class=tRNA len=8 class=miRNA\nACGUACGU\n")
    with pytest.raises(StructureError, match=r"twice\.fa: record 'r1' gives class= twice: 'tRNA' and 'miRNA'"):
        classify.load_splits(UserDataConfig(train=str(train), test=str(twice), label_column="class"))
    odd = fasta(tmp_path / "odd.fa", [("r1", "ACGUACGU", "dog")])
    with pytest.raises(StructureError, match=r"odd\.fa: record 'r1': label 'dog' is not a class of the training"):
        classify.load_splits(UserDataConfig(train=str(train), test=str(odd), label_column="class"))


def test_evaluate_reads_the_models_columns_unless_the_options_name_any_even_the_default():
    from finetune.tasks.user_data import trained_columns

    meta = {"data": {"sequence_column": "seq", "label_column": "class"}}
    assert (trained_columns(UserDataConfig(), meta).sequence_column,
            trained_columns(UserDataConfig(), meta).label_column) == ("seq", "class")
    asked = trained_columns(UserDataConfig(label_column="label"), meta)  # the default name, given explicitly
    assert (asked.sequence_column, asked.label_column) == ("seq", "label")
