"""Readers and writers for dot-bracket, bpseq, ct and FASTA: round trips and clear errors."""
from __future__ import annotations

import gzip
import itertools
import re

import numpy as np
import pytest
import zstandard

from finetune.structure import (BRACKETS, FastaRecord, StructureError, StructureRecord, header_label,
                                nucleotide_codes, pairs_to_matrix, parse_dot_bracket, read_bpseq, read_ct, read_fasta,
                                read_structure_csv, read_structures, to_dot_bracket, warn_unknown_letters, write_bpseq,
                                write_ct)


def as_set(pairs):
    return {tuple(p) for p in pairs.tolist()}


def test_dot_bracket_nested_and_pseudoknot():
    #            0123456789012345
    db = "((..[[..))..]]Aa"
    assert as_set(parse_dot_bracket(db)) == {(0, 9), (1, 8), (4, 13), (5, 12), (14, 15)}


def test_dot_bracket_writer_puts_crossing_pairs_on_new_levels():
    pairs = np.array([[0, 10], [2, 14], [5, 17], [6, 8]])  # (0,10) x (2,14) x (5,17) all cross each other
    db = to_dot_bracket(pairs, 18)
    assert db == "(.[..{(.).)...]..}"
    assert as_set(parse_dot_bracket(db)) == as_set(pairs)


def test_dot_bracket_writes_every_bracket_level_and_names_a_structure_that_needs_more():
    """n pairs that all cross each other need n levels: the 30 of BRACKETS are written and read back; 31 are an
    error that says so."""
    levels = len(BRACKETS)
    knot = np.array([[i, i + levels] for i in range(levels)])
    db = to_dot_bracket(knot, 2 * levels)
    assert db == "".join(o for o, _ in BRACKETS) + "".join(c for _, c in BRACKETS)
    assert as_set(parse_dot_bracket(db)) == as_set(knot)
    with pytest.raises(StructureError, match=f"structure needs more than {levels} bracket levels"):
        to_dot_bracket(np.array([[i, i + levels + 1] for i in range(levels + 1)]), 2 * levels + 2)


def test_dot_bracket_round_trip_random():
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(10, 80))
        perm = rng.permutation(n)[: 2 * int(rng.integers(0, n // 2))]
        pairs = np.sort(perm.reshape(-1, 2), axis=1)
        pairs = pairs[np.argsort(pairs[:, 0])]
        assert as_set(parse_dot_bracket(to_dot_bracket(pairs, n))) == as_set(pairs)


@pytest.mark.parametrize("db, msg", [("((..)", "unmatched '('"), ("..)", "unmatched ')'"), ("(.*.)", "invalid dot-bracket character")])
def test_dot_bracket_errors(db, msg):
    with pytest.raises(StructureError, match=re.escape(msg)):
        parse_dot_bracket(db, where="rec1")


def test_normalize_pairs_orders_merges_and_refuses_impossible_pairs():
    from finetune.structure import normalize_pairs

    # (j, i) ordered, a pair listed from both ends (bpseq, ct) kept once, sorted by i
    assert normalize_pairs([(5, 2), (0, 9), (2, 5)], 10).tolist() == [[0, 9], [2, 5]]
    assert normalize_pairs([(0, 9)], 10).tolist() == [[0, 9]]       # the last base pairs
    for pairs, msg in (([(0, 10)], "pair position out of range 1..10"), ([(-1, 4)], "out of range"),
                       ([(3, 3)], "a base is paired with itself at position 4"),
                       ([(0, 5), (0, 7)], "base 1 has more than one partner"),
                       ([(2, 6), (6, 9)], "base 7 has more than one partner")):
        with pytest.raises(StructureError, match=re.escape(msg)):
            normalize_pairs(pairs, 10, where="rec")


def test_ct_writer_follows_the_format():
    """Columns: index, base, index - 1, index + 1 (0 after the last base), partner (0: none), index."""
    from finetune.structure import format_ct

    text = format_ct(StructureRecord("hairpin", "GGAAACC", np.array([[0, 6], [1, 5]])))
    assert text == "7 hairpin\n1 G 0 2 7 1\n2 G 1 3 6 2\n3 A 2 4 0 3\n4 A 3 5 0 4\n5 A 4 6 0 5\n6 C 5 7 2 6\n7 C 6 0 1 7\n"


def test_bpseq_and_ct_round_trip(tmp_path):
    rec = StructureRecord("my rna", "GGGAAACCCAUGCAUAUGCAU", parse_dot_bracket("(((.[[)))...]]..(..)"[:20] + "."))
    write_bpseq(rec, tmp_path / "a.bpseq")
    back = read_bpseq(tmp_path / "a.bpseq")
    assert back.sequence == rec.sequence and as_set(back.pairs) == as_set(rec.pairs) and back.id == "a"
    other = StructureRecord("second", "ACGUACGUACGUAC", np.array([[0, 9], [3, 12]]))  # crossing pairs
    write_ct([rec, other], tmp_path / "two.ct")
    got = read_ct(tmp_path / "two.ct")
    assert [r.id for r in got] == ["my", "second"]  # ct titles: first word is the id
    assert as_set(got[0].pairs) == as_set(rec.pairs) and as_set(got[1].pairs) == {(0, 9), (3, 12)}
    assert got[1].sequence == other.sequence


def test_bpseq_inconsistent_partner_names_file_and_bases(tmp_path):
    path = tmp_path / "bad.bpseq"
    path.write_text("1 G 5\n2 A 0\n3 A 0\n4 A 0\n5 C 2\n")
    with pytest.raises(StructureError, match=r"bad\.bpseq.*base 1 pairs with 5 but base 5 pairs with 2"):
        read_bpseq(path)


def test_self_pairs_and_empty_ct_records_are_refused(tmp_path):
    """A base paired with itself was read as unpaired; a ct record of 0 bases as an empty structure."""
    (tmp_path / "self.bpseq").write_text("1 G 0\n2 A 2\n3 C 0\n")
    with pytest.raises(StructureError, match=r"self\.bpseq: base 2 pairs with itself"):
        read_bpseq(tmp_path / "self.bpseq")
    (tmp_path / "self.ct").write_text("3 x\n1 G 0 2 0 1\n2 A 1 3 2 2\n3 C 2 0 0 3\n")
    with pytest.raises(StructureError, match="record 'x': base 2 pairs with itself"):
        read_ct(tmp_path / "self.ct")
    (tmp_path / "zero.ct").write_text("0 empty\n3 y\n1 G 0 2 0 1\n2 A 1 3 0 2\n3 C 2 0 0 3\n")
    with pytest.raises(StructureError, match=r"zero\.ct:1: record 'empty' declares 0 bases"):
        read_ct(tmp_path / "zero.ct")


@pytest.mark.parametrize("header, rid", [("5 ENERGY = -1.2   myseq extra", "myseq"),          # RNAstructure, b2ct
                                         ("5  dG = -1.20 [initially -1.50] tRNA-1", "tRNA-1"),  # mfold
                                         ("5 energy=-1.2", "e_1"), ("5 plain title", "plain")])
def test_ct_ids_skip_the_free_energy_of_folding_programs(tmp_path, header, rid):
    (tmp_path / "e.ct").write_text(header + "\n" + "".join(f"{i} A {i - 1} {(i + 1) % 6} 0 {i}\n" for i in range(1, 6)))
    assert read_ct(tmp_path / "e.ct")[0].id == rid


@pytest.mark.parametrize("lines", [2, 4])  # 4: the last base line alone is missing
def test_ct_truncated_record(tmp_path, lines):
    path = tmp_path / "short.ct"
    path.write_text("5 rec\n" + "".join(f"{i} G {i - 1} {i + 1} 0 {i}\n" for i in range(1, lines + 1)))
    with pytest.raises(StructureError, match=f"declares 5 bases but has {lines}"):
        read_ct(path)


def test_fasta_errors_name_file_line_and_record(tmp_path):
    bad = tmp_path / "bad.fa"
    bad.write_text(">ok\nACGU\n>weird\nACGU\nACG1*\n")   # the line of the bad letters, not of the header
    with pytest.raises(StructureError, match=r"bad\.fa:5: record 'weird' has invalid characters '\*1'"):
        read_fasta(bad)
    (tmp_path / "dup.fa").write_text(">a\nACGU\n>a\nACGU\n")
    with pytest.raises(StructureError, match="duplicate record id 'a'"):
        read_fasta(tmp_path / "dup.fa")
    (tmp_path / "empty.fa").write_text(">a\n>b\nACGU\n")
    with pytest.raises(StructureError, match="record 'a' has an empty sequence"):
        read_fasta(tmp_path / "empty.fa")
    (tmp_path / "plain.txt").write_text("ACGUACGU\n")
    with pytest.raises(StructureError, match="before the first '>'"):
        read_fasta(tmp_path / "plain.txt")
    with pytest.raises(StructureError, match="file not found"):
        read_fasta(tmp_path / "missing.fa")
    with pytest.raises(StructureError, match=f"{tmp_path}: cannot read"):
        read_fasta(tmp_path)  # a directory
    many = "".join(f">r{i}\nACGU\n" for i in range(1000)).encode()
    (tmp_path / "cut.fa.gz").write_bytes(gzip.compress(many)[:200])
    with pytest.raises(StructureError, match=r"cut\.fa\.gz: cannot read"):
        read_fasta(tmp_path / "cut.fa.gz")
    (tmp_path / "cut.fa.zst").write_bytes(zstandard.ZstdCompressor().compress(many)[:200])
    with pytest.raises(StructureError, match=r"cut\.fa\.zst: cannot read .*truncated"):
        read_fasta(tmp_path / "cut.fa.zst")
    (tmp_path / "binary.fa").write_bytes(b">a\n\xff\xfe\n")
    with pytest.raises(StructureError, match=r"binary\.fa: not a text file"):
        read_fasta(tmp_path / "binary.fa")
    (tmp_path / "bom.fa").write_bytes(b"\xef\xbb\xbf>a\nACGU\n")  # a byte-order mark is not data
    assert [(r.id, r.sequence) for r in read_fasta(tmp_path / "bom.fa")] == [("a", "ACGU")]


@pytest.mark.parametrize("text,line,indented", [(">a\nACGU\n >b\nGGCC\n>c\nAAUU\n", 3, " >b"),
                                                 ("\t>a\nACGU\n>b\nGGCC\n", 1, "\t>a")],
                         ids=["inside", "first-line"])
def test_fasta_header_indented_by_whitespace_is_an_error(tmp_path, text, line, indented):
    """It was read as a header (record b of three), where dataprep's build of the same FASTA folded b into a: both
    readers now stop with the same error naming the file and line, the line shown as it stands."""
    path = tmp_path / "indented.fa"
    path.write_text(text)
    error = f"indented.fa:{line}: header indented by whitespace (a header line must start with '>'): {indented!r}"
    with pytest.raises(StructureError, match=re.escape(error) + "$"):
        read_fasta(path)


def test_fasta_compression_is_told_by_the_content_and_stdin_is_read(tmp_path, monkeypatch):
    """As dataprep reads its inputs: gzip and zstd by their magic bytes, whatever the name; '-' is stdin."""
    import io
    import sys

    text = b">a desc\nACGU\n>b\nGGGAAACCC\n"
    want = [("a", "ACGU"), ("b", "GGGAAACCC")]
    for name, data in (("plain.fa.gz", text), ("gzipped.fa", gzip.compress(text)),
                       ("two_frames.fa.zst", zstandard.ZstdCompressor().compress(text[:13])
                        + zstandard.ZstdCompressor().compress(text[13:]))):
        (tmp_path / name).write_bytes(data)
        assert [(r.id, r.sequence) for r in read_fasta(tmp_path / name)] == want, name
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(zstandard.ZstdCompressor().compress(text))))
    assert [(r.id, r.sequence) for r in read_fasta("-")] == want


def test_letters_outside_the_alphabet_are_reported(tmp_path, capsys):
    path = tmp_path / "odd.fa"
    path.write_text(">a\nACGU\n>b\nACXP\n>c\nggnn\n")
    recs = read_fasta(path)
    assert warn_unknown_letters(recs, path) == 1
    err = capsys.readouterr().err
    assert "1 record(s) contain letters outside the RiNALMo alphabet (PX), read as <unk>; first: 'b'" in err
    assert warn_unknown_letters(recs, path, structures=True) == 1   # 'never paired' meant nothing for embeddings
    assert "read as <unk> and never paired; first: 'b'" in capsys.readouterr().err


def test_fasta_gzip_and_description(tmp_path):
    path = tmp_path / "x.fa.gz"
    with gzip.open(path, "wt") as f:
        f.write(">r1 class=tRNA len=8\nACGU\nacgu\n>r2\nGGGG\n")
    recs = read_fasta(path)
    assert [(r.id, r.sequence, r.description) for r in recs] == [("r1", "ACGUacgu", "class=tRNA len=8"),
                                                                  ("r2", "GGGG", "")]


def test_archiveii_pair_lists_match_dot_bracket(shared_data):
    """The CSV's exact pair list and its dot-bracket column describe the same structure (pseudoknots included)."""
    rows = list(itertools.islice(read_structure_csv(shared_data / "ss" / "archiveII_3975.csv.gz"), 400))
    knotted = 0
    for rec, row in rows:
        assert as_set(rec.pairs) == as_set(parse_dot_bracket(row["structure"])), rec.id
        assert len(rec.pairs) == int(row["n_pairs"])
        knotted += int(row["pseudoknotted"])
    assert knotted > 0


def test_structure_files_of_every_kind_and_directories_are_read(tmp_path, capsys):
    from finetune.predict import _write_dbn
    from finetune.structure import read_structures

    recs = [StructureRecord("hairpin", "GGGAAACCC", parse_dot_bracket("(((...)))")),
            StructureRecord("knot", "GGAACCAAGGUU", parse_dot_bracket("((..[[..))]]")),
            StructureRecord("open", "ACGU", parse_dot_bracket("...."))]
    d = tmp_path / "mixed"
    d.mkdir()
    write_bpseq(recs[0], d / "a.bpseq")
    write_ct(recs[1:], d / "b.ct")
    _write_dbn(recs, tmp_path)  # predict-ss's output is training input
    with gzip.open(d / "c.csv.gz", "wt") as f:
        f.write("id,sequence,structure\nhairpin2,GGGAAACCC,(((...)))\n")
    (d / "notes.txt").write_text("not a structure")
    assert [(r.id, r.sequence, as_set(r.pairs)) for r in read_structures(tmp_path / "predictions.dbn")] == \
        [(r.id, r.sequence, as_set(r.pairs)) for r in recs]
    got = read_structures(d)  # every structure file, in name order; other files left alone, and said so
    assert [r.id for r in got] == ["a", "knot", "open", "hairpin2"]
    assert f"warning: {d}: 1 file(s) not read (not .bpseq, .ct, .dbn, .csv): notes.txt" in capsys.readouterr().err
    assert as_set(got[1].pairs) == as_set(recs[1].pairs) and as_set(got[3].pairs) == as_set(recs[0].pairs)
    with pytest.raises(StructureError, match=r"notes\.txt: not a structure file"):
        read_structures(d / "notes.txt")
    with pytest.raises(StructureError, match=r"empty: no \.bpseq, \.ct, \.dbn, \.csv files"):
        (tmp_path / "empty").mkdir()
        read_structures(tmp_path / "empty")


@pytest.mark.parametrize("text, message", [
    (">a\nGGGAAACCC\n(((...))\n", r"x\.dbn:3 \(record 'a'\): structure length 8 != sequence length 9"),
    (">a\nGGGAAACCC\n>b\nACGU\n....\n", r"x\.dbn:1: expected a record of three lines"),
    (">a\nGGG1AACCC\n(((...)))\n", r"x\.dbn:2: record 'a' has invalid characters '1'"),
    (">a\nGGGAAACCC\n(((...)).\n", r"x\.dbn:3 \(record 'a'\)"),
    ("\n", r"x\.dbn: no structures found"),
])
def test_dbn_errors_name_file_line_and_record(tmp_path, text, message):
    from finetune.structure import read_structures

    (tmp_path / "x.dbn").write_text(text)
    with pytest.raises(StructureError, match=message):
        read_structures(tmp_path / "x.dbn")


@pytest.mark.parametrize(("bpseq", "bpseq_error", "ct", "ct_error"), [
    # `2 PSU 0` (a modified base by name, PDB-derived files) made the sequence one letter longer per extra letter
    # and moved every later pair onto another base, silently
    ("1 G 6\n2 PSU 0\n3 A 0\n4 A 0\n5 A 0\n6 C 1\n", r":2: base 'PSU' is not one letter",
     "3 x\n1 G 0 2 0 1\n2 m1A 1 3 0 2\n3 C 2 0 0 3\n", r":3: record 'x': base 'm1A' is not one letter"),
    # a lost line would shift every later base and pair by one: the base numbers must run 1, 2, 3...
    ("1 G 0\n3 A 0\n4 C 0\n", r":2: index 3 out of order \(expected 2\)",
     "3 x\n1 G 0 2 0 1\n3 A 1 3 0 3\n3 C 2 0 0 3\n",
     r":3: record 'x': expected 'i base i-1 i\+1 partner i' for base 2"),
], ids=["several-letters", "skipped-index"])
def test_a_base_line_that_would_shift_the_structure_is_refused(tmp_path, bpseq, bpseq_error, ct, ct_error):
    (tmp_path / "m.bpseq").write_text(bpseq)
    with pytest.raises(StructureError, match=r"m\.bpseq" + bpseq_error):
        read_bpseq(tmp_path / "m.bpseq")
    (tmp_path / "m.ct").write_text(ct)
    with pytest.raises(StructureError, match=r"m\.ct" + ct_error):
        read_ct(tmp_path / "m.ct")


def test_compressed_structure_files_are_named_without_their_suffixes(tmp_path):
    rec = StructureRecord("r", "GGGAAACCC", parse_dot_bracket("(((...)))"))
    write_bpseq(rec, tmp_path / "x.bpseq")
    (tmp_path / "x.bpseq.gz").write_bytes(gzip.compress((tmp_path / "x.bpseq").read_bytes()))
    assert read_bpseq(tmp_path / "x.bpseq.gz").id == "x"
    (tmp_path / "t.ct.zst").write_bytes(zstandard.compress(b"3\n1 G 0 2 3 1\n2 A 1 3 0 2\n3 C 2 0 1 3\n"))
    assert read_ct(tmp_path / "t.ct.zst")[0].id == "t_1"
    (tmp_path / "X.BPSEQ.GZ").write_bytes((tmp_path / "x.bpseq.gz").read_bytes())  # suffixes in any case
    assert [r.id for r in read_structures(tmp_path / "X.BPSEQ.GZ")] == ["X"]


def test_csv_with_both_columns_reads_the_structure_where_base_pairs_is_blank(tmp_path):
    """A blank base_pairs cell was read as no pairs, the row's dot-bracket ignored."""
    path = tmp_path / "s.csv"
    path.write_text("id,sequence,structure,base_pairs\nr1,GGGAAAUCCC,(((....))),\nr2,GGGAAAUCCC,,1-10\n"
                    "r3,GGGAAAUCCC,,\nr4,GGGAAAUCCC,(((....))),1-10;2-9;3-8\nr5,GGGAAAUCCC,(((....))), \n")
    got = {rec.id: as_set(rec.pairs) for rec, _ in read_structure_csv(path)}
    assert got == {"r1": {(0, 9), (1, 8), (2, 7)}, "r2": {(0, 9)}, "r3": set(), "r4": {(0, 9), (1, 8), (2, 7)},
                   "r5": {(0, 9), (1, 8), (2, 7)}}  # r5: a base_pairs cell of blanks is blank too
    path.write_text("id,sequence,structure,base_pairs\nr1,GGGAAAUCCC,(((....))),1-10\n")
    with pytest.raises(StructureError, match=r"s\.csv:2 \(record 'r1'\): its base_pairs and its structure disagree"):
        list(read_structure_csv(path))


@pytest.mark.parametrize("sequence, message", [("", "empty sequence"),
                                               ("GG1AAUCC", "has invalid characters '1'")])
def test_a_csv_row_with_an_empty_or_invalid_sequence_is_named(tmp_path, sequence, message):
    """From a user review: an empty sequence was read (RNAfold then crashed after training, or it counted with
    F1 0), and digits were accepted, where the FASTA and dot-bracket readers refuse both."""
    path = tmp_path / "s.csv"
    path.write_text(f"id,sequence,structure\nr1,GGGAAAUCCC,(((....)))\nr2,{sequence},{'.' * len(sequence)}\n")
    with pytest.raises(StructureError, match=rf"s\.csv:3 \(record 'r2'\):? {message}"):
        list(read_structure_csv(path))


_CORRUPT_ZST = bytearray(zstandard.ZstdCompressor().compress(b">a\nACGU\n" * 1000))
_CORRUPT_ZST[20:70] = b"\xff" * 50


@pytest.mark.parametrize("name, content, message", [
    ("p.bpseq", "1 G 3\n2 A x\n3 C 1\n", r"p\.bpseq:2: expected 'index base partner', got '2 A x'"),
    ("p.bpseq", "# a comment only\n", r"p\.bpseq: no bases found"),
    ("p.bpseq", "1 G 6\n2 A 0\n3 C 0\n4 A 0\n5 A 0\n", r"p\.bpseq: base 1 has partner 6 outside 0\.\.5"),
    ("h.ct", "t 3\n1 G 0 2 0 1\n", r"h\.ct:1: expected a header 'length title', got 't 3'"),
    ("f.ct", "2 t\n1 G 0 2 0 1\n2 C 1 0 0\n", r"f\.ct:3: record 't': expected 'i base i-1 i\+1 partner i' for base 2"),
    ("e.ct", "# nothing\n", r"e\.ct: no structures found"),
    ("m.ct", "2 t\n1 G 0 2 0 1\n2 Um 1 0 0 2\n", r"m\.ct:3: record 't': base 'Um' is not one letter"),
    ("n.csv", "name,sequence,structure\nr1,GGAACC,((..))\n", r"n\.csv: needs columns 'id', 'sequence'"),
    ("c.csv", "id,sequence,family\nr1,GGAACC,x\n", r"c\.csv: needs columns 'id', 'sequence' and 'base_pairs' or"),
    ("b.csv", "id,sequence,structure\nr1,GGAACC,\n", r"b\.csv:2 \(record 'r1'\): structure length 0 != sequence length 6"),
    ("l.csv", "id,sequence,base_pairs\nr1,GGAACC,1-6-2\n", r"l\.csv:2 \(record 'r1'\): base_pairs entries must look like"),
    ("s.csv", "id,sequence,base_pairs\nr1,GGAACC,1-6;2\n", r"s\.csv:2 \(record 'r1'\): base_pairs entries must look like"),
    ("x.fa", ">r1\nACGU\n>\nACGU\n", r"x\.fa:3: empty FASTA header"),
    ("x.fa", "; a comment only\n", r"x\.fa: no FASTA records found"),
    ("c.fa.zst", bytes(_CORRUPT_ZST), r"c\.fa\.zst: cannot read .*corruption"),
], ids=["bpseq-partner-not-a-number", "bpseq-empty", "bpseq-partner-past-the-end", "ct-header-not-a-length",
        "ct-line-of-five-fields", "ct-empty", "ct-base-of-two-letters", "csv-without-id", "csv-without-structure",
        "csv-blank-structure", "csv-pair-of-three", "csv-pair-of-one", "fasta-empty-header", "fasta-empty",
        "zstd-corrupt"])
def test_malformed_files_are_refused_naming_file_and_reason(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(StructureError, match=message):
        read_fasta(path) if ".fa" in name else read_structures(path)


def test_bprna_bpseq_headers_and_trailing_semicolons_are_read(tmp_path):
    (tmp_path / "bprna.bpseq").write_text("Filename: bpRNA_1.bpseq\nOrganism: Homo sapiens\nAccession Numbers: X1\n"
                                          "Citation and related information available at http://x\n1 G 3\n2 A 0\n3 C 1\n")
    assert as_set(read_bpseq(tmp_path / "bprna.bpseq").pairs) == {(0, 2)}
    (tmp_path / "t.csv").write_text("id,sequence,base_pairs\nr1,GGAACC,1-6;2-5;\n")
    assert as_set(next(read_structure_csv(tmp_path / "t.csv"))[0].pairs) == {(0, 5), (1, 4)}


def test_header_labels_are_whole_keys():
    rec = FastaRecord("r", "ACGU", "subfamily=tRNA-Sec family=tRNA")
    assert header_label("x.fa", rec, "family") == "tRNA" and header_label("x.fa", rec, "clan") is None
    assert header_label("x.fa", FastaRecord("r", "ACGU", "family=tRNA n=1 family=tRNA"), "family") == "tRNA"
    with pytest.raises(StructureError, match=r"x\.fa: record 'r' gives family= twice: 'tRNA' and '5S'"):
        header_label("x.fa", FastaRecord("r", "ACGU", "family=tRNA family=5S"), "family")


def test_nucleotide_codes_and_contact_matrix():
    assert nucleotide_codes("ACGUTacgutN-").tolist() == [0, 1, 2, 3, 3, 0, 1, 2, 3, 3, -1, -1]
    mat = pairs_to_matrix(np.array([[0, 3], [1, 2]]), 4)
    assert mat.dtype == np.float32 and (mat == mat.T).all() and mat.sum() == 4 and mat[3, 0] == mat[2, 1] == 1


def test_rnafold_baseline_gives_the_mfe_pairs_of_dna_or_rna_input():
    from finetune.rnafold import rnafold_pairs

    #                                0123456789012345678901: (((....)))((((....))))
    assert as_set(rnafold_pairs("gggaaatcccGCGCGAAAGCGC")) == {(0, 9), (1, 8), (2, 7), (10, 21), (11, 20), (12, 19),
                                                                (13, 18)}
    assert rnafold_pairs("AAAAAAAA").shape == (0, 2)
