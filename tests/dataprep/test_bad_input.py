"""Malformed and awkward FASTA: every case is a clear error or a reject line, never a silent drop."""
from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard

from dataprep.errors import InputError
from dataprep.shards import iter_blocks, read_manifest

from tests.dataprep.helpers import REPO, build_small, read_back, read_tsv

ACGU20 = "ACGUACGUACGUACGUACGU"


@pytest.fixture
def fasta(tmp_path):
    """Write text/bytes to a file in tmp_path and return its path."""
    def make(content: str | bytes, name: str = "in.fa") -> Path:
        p = tmp_path / name
        p.write_bytes(content.encode() if isinstance(content, str) else content)
        return p
    return make


def plain_or_gzip(tmp_path, content: bytes, compress: bool) -> Path:
    """tmp_path/in.fa, or gzip-compressed as tmp_path/in.fa.gz."""
    path = tmp_path / ("in.fa.gz" if compress else "in.fa")
    path.write_bytes(gzip.compress(content) if compress else content)
    return path


def rejects_of(tmp_path, path, **kw) -> tuple[dict[str, str], dict]:
    """Build; check nothing was lost (in = rejected + duplicates + kept); return {id: reason}, kept records."""
    res = build_small(tmp_path, [path], **kw)
    c = res.manifest.counts
    assert c["records_in"] == c["rejected"] + c["duplicates"] + c["kept"]
    rows = read_tsv(tmp_path / "out" / "rejects.tsv")
    assert len(rows) == c["rejected"]
    got = read_back(tmp_path / "out")
    assert len(got) == c["kept"]
    return {r["id"]: r["reason"] for r in rows}, got


# ------------------------------------------------------------------------------------ reject lines
@pytest.mark.parametrize("seq,reason", [
    ("ACGUXACGUACGUACGUACGU", r"invalid character 'X' \(0x58\) at sequence position 5"),
    ("ACGU*ACGUACGUACGUACGU", "invalid character '\\*'"),
    ("ACGU-ACGU-ACGU-ACGU-A", "invalid character '-'"),
    ("ACGU.ACGUACGUACGUACGU", "invalid character '.'"),
    ("ACGU1234ACGUACGUACGUA", "invalid character '1'"),
    ("ACGUACGUACGUACGUACGU>", "invalid character '>'"),  # '>' ending a line: no header can hide behind it
    ("ACGUACGUACGUACGUACGU> \t", "invalid character '>'"),  # so is '>' before blanks only
    ("ACGU\x00ACGUACGUACGUACGU", r"invalid character '\\x00'"),  # binary inside a sequence
    ("ACGUÄACGUACGUACGUACGU", r"invalid character '\\xc3'"),
    ("ACGUA", "too short: 5 nt < min_len 16"),
    ("G", "too short: 1 nt < min_len 16"),  # the shortest non-empty record (not the empty one's reason)
    ("ACGUACGUACGUACG", "too short: 15 nt < min_len 16"),
    ("ACGU ACGU\tACG*UACGUACGU", r"'\*' \(0x2a\) at sequence position 12$"),  # whitespace is not counted
    ("ACGUACGUAC\r\nACGUACGUAC\r\nACG*ACGUAC\r", r"'\*' \(0x2a\) at sequence position 24$"),  # nor CR
], ids=["X", "star", "gap-dash", "gap-dot", "digits", "gt-at-line-end", "gt-before-blanks", "nul", "non-ascii",
        "short", "one-nt", "one-below-min_len", "after-spaces", "after-crlf-lines"])
def test_invalid_sequence_is_rejected_with_reason(tmp_path, fasta, seq, reason):
    path = fasta(f">good1\n{ACGU20}\n>bad\n{seq}\n>good2\n{ACGU20}GG\n")
    rejects, kept = rejects_of(tmp_path, path)
    assert list(rejects) == ["bad"]
    assert re.search(reason, rejects["bad"]), rejects["bad"]
    assert set(kept) == {"good1", "good2"}


def test_records_of_exactly_min_len_and_max_len_are_kept(tmp_path, fasta):
    rejects, kept = rejects_of(tmp_path, fasta(f">min\n{ACGU20[:16]}\n>max\n{ACGU20}GGGG\n>over\n{ACGU20}GGGGA\n"),
                               max_len=24)
    assert set(kept) == {"min", "max"} and rejects == {"over": "too long: 25 nt > max_len 24"}


def test_reject_line_has_source_and_line_number(tmp_path, fasta):
    path = fasta(f">a\n{ACGU20}\n>b\nACGU\nXX\n>c\n{ACGU20}C\n")
    build_small(tmp_path, [path])
    rows = read_tsv(tmp_path / "out" / "rejects.tsv")
    assert rows == [{"source": str(path), "id": "b", "line": "3",
                     "reason": "invalid character 'X' (0x58) at sequence position 5"}]  # ACGU then X: 1-based


def test_too_long(tmp_path, fasta):
    rejects, kept = rejects_of(tmp_path, fasta(f">long\n{'A' * 101}\n>ok\n{'A' * 100}\n"), max_len=100)
    assert rejects == {"long": "too long: 101 nt > max_len 100"} and set(kept) == {"ok"}


def test_empty_sequence_between_headers(tmp_path, fasta):
    rejects, _ = rejects_of(tmp_path, fasta(f">a\n>b\n{ACGU20}\n"))
    assert rejects == {"a": "empty sequence (header without sequence)"}


def test_header_without_sequence_at_end_of_file(tmp_path, fasta):
    rejects, _ = rejects_of(tmp_path, fasta(f">a\n{ACGU20}\n>last"))
    assert rejects == {"last": "empty sequence (header without sequence)"}


@pytest.mark.parametrize("header, why", [(">", "nothing after '>'"), (">  \r", "nothing after '>'"),
                                         # (a user review: these said "nothing after '>'" too)
                                         ("> description only", "whitespace right after '>'"),
                                         (">\tx", "whitespace right after '>'")])
def test_empty_id(tmp_path, fasta, header, why):
    rejects, _ = rejects_of(tmp_path, fasta(f"{header}\n{ACGU20}\n>ok\n{ACGU20}A\n"))
    assert list(rejects) == [""] and rejects[""].startswith(f"empty record id ({why}")


@pytest.mark.parametrize("bad", [b"\xff\xfe", b"\x80"], ids=["ff-fe", "only-0x80"])  # 0x80: the smallest non-ASCII
def test_non_utf8_header(tmp_path, fasta, bad):
    body = ACGU20.encode()
    rejects, _ = rejects_of(tmp_path, fasta(b">bad" + bad + b"id x\n" + body + b"\n>ok\n" + body + b"\n"))
    (rid, reason), = rejects.items()
    assert "not valid UTF-8" in reason and rid.startswith("bad")


def test_utf8_header_is_fine(tmp_path, fasta):
    _, kept = rejects_of(tmp_path, fasta(f">säq1 Größe\n{ACGU20}\n"))
    assert set(kept) == {"säq1"}


@pytest.mark.parametrize("ctrl", ["\x01", "\x1f"])  # the first and the last below the space
def test_control_character_in_header(tmp_path, fasta, ctrl):
    rejects, _ = rejects_of(tmp_path, fasta(f">bin{ctrl}ary\n{ACGU20}\n>ok\n{ACGU20}\n"))
    assert rejects == {"bin": f"control character 0x{ord(ctrl):02x} in header (binary data?)"}


def test_del_in_header_next_to_non_ascii_bytes(tmp_path, fasta):
    seq = "ACGU" * 5
    rejects, _ = rejects_of(tmp_path, fasta(f">del\x7f\n{seq}\n>ok caf\u00e9\n{seq}\n>bad\n{seq}\u00e9\n".encode()))
    assert rejects["del\x7f"] == "control character 0x7f in header (binary data?)"
    assert "ok" not in rejects and rejects["bad"].startswith("invalid character")


def test_a_label_key_given_twice_with_different_values_rejects_the_record(tmp_path, fasta):
    """It took the first value silently: `>x rfam_acc=RF00001 ... rfam_acc=RF00005` was labelled RF00001."""
    path = fasta(f">two rfam_acc=RF00001 note rfam_acc=RF00005\n{ACGU20}\n>same rfam_acc=RF1 rfam_acc=RF1\n{ACGU20}A\n"
                 f">one x=1 rfam_acc=RF2\n{ACGU20}G\n>none\n{ACGU20}C\n>empty rfam_acc= rfam_acc=RF3\n{ACGU20}U\n"
                 f">tab\trfam_acc=RF4\n{ACGU20}GG\n"  # a tab before the key, as a spreadsheet export writes
                 f">glued note_rfam_acc=RF5\n{ACGU20}CC\n")  # another key that ends in this one's name
    rejects, kept = rejects_of(tmp_path, path, label_key="rfam_acc")
    assert rejects == {"two": "label key 'rfam_acc' given twice: 'RF00001' and 'RF00005'"}
    assert set(kept) == {"same", "one", "none", "empty", "tab", "glued"}
    out = tmp_path / "out"
    labels = {}
    for s in read_manifest(out).shards:
        for b in iter_blocks(out / s.path):
            labels.update(zip(b.ids, b.labels))
    # `key=` labels nothing, nor does a key that only ends in its name
    assert labels == {"same": "RF1", "one": "RF2", "none": "", "empty": "RF3", "tab": "RF4", "glued": ""}


def test_duplicate_id_with_different_sequence(tmp_path, fasta):
    rejects, kept = rejects_of(tmp_path, fasta(f">x\n{ACGU20}\n>y\n{ACGU20}A\n>x\n{ACGU20}GG\n"))
    assert rejects == {"x": f"duplicate id with a different sequence (first seen at {tmp_path / 'in.fa'}:1)"}
    assert kept["x"][0] == ACGU20.encode()


def test_duplicate_id_with_same_sequence_is_a_duplicate(tmp_path, fasta):
    rejects, kept = rejects_of(tmp_path, fasta(f">x\n{ACGU20}\n>x\n{ACGU20.lower()}\n"))
    assert rejects == {} and set(kept) == {"x"}
    assert read_tsv(tmp_path / "out" / "duplicates.tsv")[0]["duplicate_line"] == "3"


def test_huge_single_record_is_streamed_past(tmp_path, fasta):
    """A record far larger than any chunk is rejected without being held in memory; neighbours survive."""
    from dataprep.fasta import FastaStream

    huge = ("ACGU" * 20 + "\n") * 50_000  # 4 Mnt
    path = fasta(f">a\n{ACGU20}\n>huge desc\n{huge}>b\n{ACGU20}C\n")
    chunks = list(FastaStream(str(path), chunk_bytes=1 << 16, max_record_bytes=1 << 20))
    assert any(c.oversized == (b">huge desc", 4_000_000) for c in chunks)
    assert max(len(c.data) for c in chunks) < 2 << 20
    rejects, kept = rejects_of(tmp_path, path, chunk_mb=1)
    assert rejects["huge"].startswith("too long: 4000000 nt > max_len 8192")
    assert set(kept) == {"a", "b"}
    assert read_tsv(tmp_path / "out" / "rejects.tsv")[0]["line"] == "3"


@pytest.mark.parametrize("compress", [False, True], ids=["plain-mmap", "gzip-stream"])
def test_oversized_record_ending_exactly_at_a_read_boundary(tmp_path, compress):
    """The record after an oversized one survives even when the oversized record's last newline is the last byte
    of a read (1024-byte reads, streamed past after 5 of them: 5120 + 2 x 1024 bytes)."""
    from dataprep.fasta import FastaStream

    seq_lines = "A" * 60 + "\n"
    big = ">big\n" + seq_lines * 117 + "A" * 25 + "\n"
    assert len(big) == 5120 + 2 * 1024
    text = (big + ">b\n" + ACGU20 + "\n").encode()
    path = plain_or_gzip(tmp_path, text, compress)
    chunks = list(FastaStream(str(path), chunk_bytes=1024, max_record_bytes=4096))
    assert [c.oversized for c in chunks if c.oversized] == [(b">big", 60 * 117 + 25)]
    rest = b"".join(bytes(c.data) for c in chunks if not c.oversized)
    assert rest == b">b\n" + ACGU20.encode() + b"\n"
    assert [c.first_line for c in chunks if not c.oversized] == [120]


def test_a_header_right_at_a_chunk_end_starts_a_record_of_its_own(tmp_path):
    """A 1,024-byte record, the chunk size, then a 600-byte one: the header at the chunk's last byte is found (a
    search that stopped one byte short took both for one 1,624-byte record, over max_record_bytes, and lost b)."""
    from dataprep.fasta import FastaStream

    first = ">a\n" + "A" * 1020 + "\n"
    second = ">b\n" + "C" * 596 + "\n"
    assert (len(first), len(second)) == (1024, 600)
    path = tmp_path / "in.fa"
    path.write_text(first + second)
    chunks = list(FastaStream(str(path), chunk_bytes=1024, max_record_bytes=1500))
    assert not any(c.oversized for c in chunks)
    assert b"".join(bytes(c.data) for c in chunks) == (first + second).encode()


@pytest.mark.parametrize("compress", [False, True], ids=["plain-mmap", "gzip-stream"])
def test_a_record_longer_than_a_chunk_but_within_max_record_bytes_is_read_whole(tmp_path, compress):
    """Only a record over max_record_bytes is streamed past: a 2,000-byte one read in 1,024-byte chunks is parsed,
    also when blank lines stand before its header (the first chunk then starts with them)."""
    from dataprep.fasta import FastaStream

    text = b"\n \n>long\n" + b"ACGU" * 500 + b"\n>b\n" + ACGU20.encode() + b"\n"
    path = plain_or_gzip(tmp_path, text, compress)
    chunks = list(FastaStream(str(path), chunk_bytes=1024, max_record_bytes=4096))
    assert not any(c.oversized for c in chunks)
    assert b"".join(bytes(c.data) for c in chunks) == text


@pytest.mark.parametrize("compress", [False, True], ids=["plain-mmap", "gzip-stream"])
def test_oversized_text_before_the_first_header_is_an_error_not_a_streamed_past_record(tmp_path, compress):
    """More blank lines than a chunk, then text and no header for longer than max_record_bytes: the piece does not
    start with a header, so it is parsed (text outside any record, an error), not streamed past as an oversized
    record with an empty header, which would drop the text as one nameless reject."""
    from dataprep.fasta import FastaStream
    from dataprep.normalize import NormalizeConfig, parse_chunk

    text = b"\n" * 3000 + b"orphan" + b"ACGU" * 1500 + b"\n>a\n" + ACGU20.encode() + b"\n"
    path = plain_or_gzip(tmp_path, text, compress)
    first = next(iter(FastaStream(str(path), chunk_bytes=1024, max_record_bytes=4096)))
    assert first.oversized is None
    stray = parse_chunk(first.data, first.first_line, NormalizeConfig()).stray
    assert stray[0] == 3001 and stray[1].startswith("text outside any record")


def test_an_oversized_records_length_counts_nucleotides_only(tmp_path):
    from dataprep.fasta import FastaStream

    path = tmp_path / "crlf.fa"
    path.write_bytes(b">big x\r\n" + (b"ACGU " * 12 + b"\r\n") * 100 + b">b\r\nACGU\r\n")
    chunks = list(FastaStream(str(path), chunk_bytes=1024, max_record_bytes=4096))
    assert [c.oversized for c in chunks if c.oversized] == [(b">big x\r", 4800)]  # the header line as written


@pytest.mark.parametrize("probe", [1, 2, 3, 5, 8, 64])
def test_split_points_are_the_first_header_at_or_after_each_share(tmp_path, probe):
    """Found by reading `probe` bytes at a time, a header whose newline ends one read and whose '>' starts the next
    included; records longer than a probe are scanned past."""
    from dataprep.fasta import split_points

    rng = np.random.default_rng(probe)
    data = b"".join(b">r%d\n" % i + b"A" * int(n) + b"\n" for i, n in enumerate(rng.integers(0, 40, 30)))
    path = tmp_path / "in.fa"
    path.write_bytes(data)
    for n in (2, 3, 5, 9):
        cuts, expected = split_points(str(path), n, probe=probe), [0]
        for r in range(1, n):
            at = data.find(b"\n>", max(len(data) * r // n - 1, expected[-1]))
            expected.append(at + 1 if at >= 0 else len(data))
        assert cuts == expected + [len(data)], (n, cuts)


def test_a_byte_range_of_a_compressed_file_is_refused(tmp_path):
    import gzip

    from dataprep.fasta import FastaStream

    path = tmp_path / "in.fa.gz"
    path.write_bytes(gzip.compress(b">a\nACGU\n"))
    with pytest.raises(ValueError, match="byte_range needs a plain file"):
        list(FastaStream(str(path), byte_range=(0, 4)))


# -------------------------------------------------------------------------------- normalisation
def test_crlf_lowercase_dna_whitespace_are_normalised(tmp_path, fasta):
    path = fasta(">a desc\r\nacgt acgt\tACGT\r\nTT\vTT\f\r\n>b\r\nRYKMSWBDHVNacgun\r\n")  # \v, \f: whitespace too
    rejects, kept = rejects_of(tmp_path, path)
    assert rejects == {}
    assert kept["a"][0] == b"ACGUACGUACGUUUUU"
    assert kept["b"][0] == b"RYKMSWBDHVNACGUN"


def test_records_spanning_chunks(tmp_path):
    """Chunk boundaries never split a record: a 1 MiB-chunked read of a multi-MiB file gives the same records."""
    from dataprep.synth import SynthConfig, write_fasta

    path = tmp_path / "s.fa"
    write_fasta(SynthConfig(20_000, seed=3, wrap=60), path)
    small = build_small(tmp_path, [path], out="small", chunk_mb=1)
    big = build_small(tmp_path, [path], out="big", chunk_mb=64)
    assert small.manifest.counts == big.manifest.counts
    assert read_back(tmp_path / "small") == read_back(tmp_path / "big")


# ---------------------------------------------------------------------------------- fatal errors
def test_no_header(tmp_path, fasta):
    with pytest.raises(InputError, match=r"in.fa:1: does not start with a '>' header"):
        build_small(tmp_path, [fasta(f"{ACGU20}\n>a\n{ACGU20}\n")])


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("content,error", [
    (b"\xef\xbb\xbf>a\n" + ACGU20.encode() + b"\n", r"in.fa(.gz)?:1: starts with a UTF-8 byte-order mark"),
    (f">a\r{ACGU20}\r>b\r{ACGU20}\r".encode(), r"in.fa(.gz)?: its lines end in a carriage return alone"),
], ids=["byte-order-mark", "cr-line-ends"])
def test_a_byte_order_mark_or_lone_cr_line_ends_are_named(tmp_path, fasta, content, error, compress):
    """A BOM made the file 'not FASTA, or binary data?'; CR-only line ends made it one empty record, rejected, and
    the build went on without the file's records (or failed with 'no records left' when it was the only input)."""
    path = plain_or_gzip(tmp_path, content, compress)
    with pytest.raises(InputError, match=error):
        build_small(tmp_path, [fasta(f">ok\n{ACGU20}\n", "ok.fa"), path])


@pytest.mark.parametrize("content,error", [
    (f" >a\n{ACGU20}\n>b\n{ACGU20}GG\n", "1: header indented by whitespace .*: b' >a'"),  # record a was lost
    ("\n" * 200 + f"orphan{ACGU20}\n>a\n{ACGU20}\n", "201: text outside any record.*: b'orphanACGU"),  # past
    ("\n" * 200 + f"  orphan{ACGU20}\n>a\n{ACGU20}\n", "201: text outside any record.*: b'  orphanACGU"),  # a
], ids=["indented-header", "orphan-after-blank-chunk", "indented-orphan"])                    # chunk of blank lines
@pytest.mark.parametrize("chunk_mb", [2, 1e-4])
def test_text_outside_any_record_is_an_error(tmp_path, fasta, content, error, chunk_mb):
    """All were dropped without a trace (the orphans with small chunks only), the input's other records kept. The
    line is shown as it stands: the message of the first one showed b'>a', hiding the space that caused it."""
    with pytest.raises(InputError, match=rf"in.fa:({error}|1: does not start with)"):
        build_small(tmp_path, [fasta(content)], chunk_mb=chunk_mb)


@pytest.mark.parametrize("indent", [" ", "\t"], ids=["space", "tab"])
@pytest.mark.parametrize("at,compress,chunk_mb", [(1, False, 2), (2500, False, 2), (2500, False, 0.01),
                                                  (2500, True, 0.01)],
                         ids=["second-record", "second-byte-range", "small-chunks", "gzip"])
def test_indented_header_inside_the_input_is_an_error(tmp_path, fasta, indent, at, compress, chunk_mb):
    """A header indented by whitespace after the first one was read as a sequence line of the record before: that
    record was rejected for its '>' and the indented one was in no output under its own id (exit status 0), while
    finetune.structure.read_fasta read it as a record. Now both name the file and line (counted from the start of
    the input, also in the second of two byte ranges)."""
    text = "".join(f"{indent if i == at else ''}>r{i}\n{ACGU20}\n" for i in range(3000))
    path = fasta(gzip.compress(text.encode()) if compress else text)
    error = f"in.fa:{2 * at + 1}: header indented by whitespace (a header line must start with '>'): "
    with pytest.raises(InputError, match=re.escape(error + repr(f"{indent}>r{at}".encode()))):
        build_small(tmp_path, [path], chunk_mb=chunk_mb)


@pytest.mark.parametrize("content,error", [
    (f">a\n{ACGU20}>b desc\n{ACGU20}GG\n",                       # cat a.fa b.fa, a.fa without its last line break
     r"in.fa:2: '>' inside a sequence line \(a header that does not start its line\?\): b'ACGU.*U>b desc'$"),
    (f">a\n{ACGU20}\n\ufeff>b\n{ACGU20}GG\n",                      # b.fa starts with a byte-order mark
     r"in.fa:3: '>' inside a sequence line .*: b'\\xef\\xbb\\xbf>b'$"),
    (f">a\n{ACGU20}\n>b\r{ACGU20}\r>c\r{ACGU20}GG\r",                # b.fa has classic Mac OS line ends
     r"in.fa:3: lines end in a carriage return alone from here on"),
    (f">a\r\n{ACGU20}\r\n>b\r{ACGU20}\r>c\r{ACGU20}GG\r",            # CRLF, then CR alone
     r"in.fa:3: lines end in a carriage return alone from here on"),
], ids=["no-last-line-break", "byte-order-mark", "cr-line-ends", "crlf-then-cr"])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_header_inside_a_line_is_an_error(tmp_path, fasta, content, error, workers):
    """Files joined with cat hid a header inside a line: with CR-only line ends past the first chunk every record
    after it read as one header line (one 'empty sequence' reject for 10 records); after a byte-order mark or a
    missing last line break, the header was read as sequence of the record before, which was rejected for its
    '>', and its own record was counted nowhere."""
    with pytest.raises(InputError, match=error):
        build_small(tmp_path, [fasta(content.encode())], workers=workers)


def test_lines_led_by_blanks_that_are_no_header_are_read(tmp_path, fasta):
    """CRLF blank lines, indented sequence lines and a '>' inside a header: the indented-header check looks
    closer at such chunks and must let them through."""
    path = fasta(f">a\r\n\r\n  {ACGU20}\r\n \t\n>b x>y\n\t{ACGU20[:10]}\n {ACGU20[10:]}>\n>c\n{ACGU20}GG\n")
    rejects, kept = rejects_of(tmp_path, path)
    assert rejects == {"b": "invalid character '>' (0x3e) at sequence position 21"}
    assert {k: v[0] for k, v in kept.items()} == {"a": ACGU20.encode(), "c": ACGU20.encode() + b"GG"}


@pytest.mark.parametrize("workers", [1, 2])
def test_blank_lines_before_the_first_header_belong_to_no_record(tmp_path, fasta, workers):
    """Blank lines (spaces and tabs in them too) before the first header: no byte of them enters a sequence or
    shifts the reported position of an invalid character, and lines are numbered past them. With 2 workers they
    are more than half the file, so the first byte range holds only them and the second counts its lines on."""
    lead = " \t\n\n  \n" * 40
    path = fasta(f"{lead}>bad\nACGUX{ACGU20}\n>ok\n{ACGU20}\n")
    rejects, kept = rejects_of(tmp_path, path, workers=workers)
    assert rejects == {"bad": "invalid character 'X' (0x58) at sequence position 5"}
    assert {k: v[0] for k, v in kept.items()} == {"ok": ACGU20.encode()}
    assert read_tsv(tmp_path / "out" / "rejects.tsv")[0]["line"] == str(lead.count("\n") + 1)


def test_a_chunk_counts_its_own_line_breaks(tmp_path):
    """ParsedChunk.newlines: the line breaks in the chunk as given (the reader numbers the next chunk's lines by
    them), not the one the parser adds to a last line without one, also in a chunk without a header."""
    from dataprep.normalize import NormalizeConfig, parse_chunk

    cfg = NormalizeConfig()
    assert parse_chunk(f">a\n{ACGU20}".encode(), 1, cfg).newlines == 1
    assert parse_chunk(f">a\n{ACGU20}\n".encode(), 1, cfg).newlines == 2
    assert parse_chunk(b"\n \n\n", 1, cfg).newlines == 3


@pytest.mark.parametrize("header,rid", [(b">huge desc", "huge"), (b">", ""), (b">  \t", "")])
def test_an_oversized_record_is_rejected_under_its_id_blank_or_not(header, rid):
    from dataprep.normalize import NormalizeConfig, oversized_reject

    assert oversized_reject(header, 9000, 7, NormalizeConfig(max_len=8192)) == (
        7, rid, "too long: 9000 nt > max_len 8192 (record streamed past, not loaded)")


def test_more_shares_than_records_leave_empty_shares_that_merge(tmp_path, fasta):
    """Shares whose byte range holds no record (or only rejected ones) write empty part stores."""
    path = fasta(f">a\n{ACGU20}\n>b\nAC\n>c\n{ACGU20}GG\n")
    rejects, kept = rejects_of(tmp_path, path, workers=8)
    assert list(rejects) == ["b"] and list(kept) == ["a", "c"]


def test_progress_estimate_of_a_small_compressed_input(tmp_path, fasta, capsys):
    """A compressed input is parsed by chunks taken in turn by the shares: one of 2 shares that had parsed the
    only chunk but the last (the last record) estimated twice the input's records ('~5,998' for 3,000)."""
    from dataprep.pipeline import BuildConfig, build

    path = fasta(gzip.compress("".join(f">r{i}\n{ACGU20}\n" for i in range(3000)).encode()))
    build(BuildConfig(inputs=(str(path),), out=str(tmp_path / "out"), no_cluster=True, report=False, workers=2))
    shown = re.search(r"~([\d,]+) records so far \(estimated from 1 of 2 shares\)", capsys.readouterr().err)
    assert shown and int(shown[1].replace(",", "")) == 2999


def test_ids_with_unicode_line_separators_reach_the_reject_list(tmp_path, fasta):
    """U+2028 / U+0085 in an id split str.splitlines() rows of rejects.tsv: the build ended in a traceback."""
    path = fasta(f">short\u2028x\nACGU\n>odd\u0085y\nACG*UACGUACGUACGUAC\n>ok\n{ACGU20}\n")
    rejects, kept = rejects_of(tmp_path, path)
    assert rejects.keys() == {"short\u2028x", "odd\u0085y"} and list(kept) == ["ok"]


@pytest.mark.parametrize("magic", [0x184D2A50, 0x184D2A5F])  # the first and last of zstd's 16 skippable magics
def test_zstd_that_starts_with_a_skippable_frame_is_read(tmp_path, fasta, magic):
    """pzstd writes one first; the input was refused as 'not FASTA'."""
    skippable = magic.to_bytes(4, "little") + (4).to_bytes(4, "little") + b"pzst"
    path = fasta(skippable + zstandard.ZstdCompressor().compress(f">a\n{ACGU20}\n".encode()), "p.fa.zst")
    assert list(rejects_of(tmp_path, path)[1]) == ["a"]


def test_binary_file(tmp_path, fasta):
    path = fasta(np.random.default_rng(0).bytes(5000), "random.bin")
    with pytest.raises(InputError, match="random.bin.*not FASTA, or binary data"):
        build_small(tmp_path, [path])


@pytest.mark.parametrize("content", [b"", b"\n\n  \n"], ids=["empty", "blank"])
def test_empty_file(tmp_path, fasta, content):
    with pytest.raises(InputError, match="in.fa: no FASTA records"):
        build_small(tmp_path, [fasta(content)])


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.fa: cannot read input"):
        build_small(tmp_path, [tmp_path / "nope.fa"])


def test_truncated_gzip(tmp_path, fasta):
    data = gzip.compress((f">a\n{ACGU20}\n" * 20000).encode())
    with pytest.raises(InputError, match=r"in.fa.gz: truncated gzip input"):
        build_small(tmp_path, [fasta(data[: len(data) // 2], "in.fa.gz")])


def test_corrupt_gzip(tmp_path, fasta):
    data = bytearray(gzip.compress((f">a\n{ACGU20}\n" * 20000).encode()))
    data[100:110] = b"\x00" * 10
    with pytest.raises(InputError, match=r"in.fa.gz: (corrupt|truncated) gzip input"):
        build_small(tmp_path, [fasta(bytes(data), "in.fa.gz")])


def test_truncated_zstd(tmp_path, fasta):
    data = zstandard.ZstdCompressor().compress((f">a\n{ACGU20}\n" * 20000).encode())
    with pytest.raises(InputError, match=r"in.fa.zst: truncated zstd input"):
        build_small(tmp_path, [fasta(data[: len(data) // 2], "in.fa.zst")])


def test_all_records_rejected(tmp_path, fasta):
    """The error pointed to OUT/.work/normalise/rejects.tsv, which the failed build then removed with OUT."""
    with pytest.raises(InputError, match=r"no records left after normalisation and dedup: 2 rejected, e\.g\. "
                                         r".*in.fa:1 'a': too short: 4 nt < min_len 16; .*in.fa:3 'b': invalid "
                                         r"character 'X' \(0x58\) at sequence position 1$"):
        build_small(tmp_path, [fasta(">a\nACGU\n>b\nXXXXXXXXXXXXXXXXXXXXX\n")])


@pytest.mark.parametrize("out", ["file", "file/sub"])
def test_output_is_a_file(tmp_path, fasta, out):
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=f"{out}: cannot create the output directory \\(Not a directory"):
        build_small(tmp_path, [fasta(f">a\n{ACGU20}\n")], out=out)


@pytest.mark.parametrize("image,out,named", [(True, "o", "image.fa"), (False, "image.fa/sub", "image.fa/sub")],
                         ids=["binary-input", "output-under-a-file"])
def test_cli_error_is_one_line_not_a_traceback(tmp_path, fasta, image, out, named):
    path = fasta(b"\x89PNG\r\n\x1a\n" + bytes(200) if image else f">a\n{ACGU20}\n", "image.fa")
    r = subprocess.run([sys.executable, str(REPO / "dataprep" / "build_shards.py"), "--input", str(path),
                        "--out", str(tmp_path / out), "--no-cluster"], capture_output=True, text=True,
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and named in r.stderr and "Traceback" not in r.stderr


def test_rejected_input_leaves_no_new_output_directory_and_an_old_shard_set_as_it_was(tmp_path, fasta, capsys):
    """A build refused for its input left OUT/.work/normalise.tmp behind, and a new OUT with it. A build of other
    inputs or parameters replaced the shard set in OUT without a word."""
    from dataprep.build_shards import main

    bad, good = fasta(b"\xef\xbb\xbf>a\nACGU\n", "bom.fa"), fasta(f">a\n{ACGU20}\n>b\n{ACGU20}GG\n", "good.fa")
    assert main(["--input", str(good), str(bad), "--out", str(tmp_path / "new"), "--no-cluster"]) == 2
    assert not (tmp_path / "new").exists()
    out = tmp_path / "old"
    assert main(["--input", str(good), "--out", str(out), "--no-cluster", "--no-report"]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert main(["--input", str(good), str(bad), "--out", str(out), "--no-cluster", "--no-report"]) == 2
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before and set(read_back(out)) == {"a", "b"}
    assert "bom.fa:1: starts with a UTF-8 byte-order mark" in capsys.readouterr().err
    assert main(["--input", str(good), "--out", str(out), "--no-cluster", "--no-report", "--quiet"]) == 0
    assert capsys.readouterr().err == ""     # up to date: no word
    assert main(["--input", str(good), "--out", str(out), "--no-cluster", "--no-report", "--quiet", "--seed", "1"]) == 0
    assert f"warning: {out / 'manifest.json'} is another build's" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--zstd-level", "23"], "--zstd-level must be in -131072..22"),
    (["--zstd-level", "-131073"], "--zstd-level must be in"),
    (["--seed", "-1"], "--seed must be >= 0"),
    (["--shard-records", "-5"], "--shard-records must be >= 0"),
    (["--shard-mb", "0"], "--shard-mb must be a number > 0"),
    (["--chunk-mb", "1e-7"], "--chunk-mb 1e-07 is less than one byte"),
    (["--min-seq-id", "2"], "--min-seq-id must be in [0, 1]"),
    (["--coverage", "-0.1"], "--coverage must be in [0, 1]"),
    (["--cov-mode", "6"], "--cov-mode: invalid choice: 6"),
    (["--label-key", ""], "--label-key '': want a header key"),
    (["--label-key", "a=b"], "--label-key 'a=b': want a header key"),
    (["--input", "-", "-"], "stdin (-) is given more than once"),
    (["--shard-mb", "inf"], "--shard-mb must be a number > 0"),        # OverflowError after normalise and dedup
    (["--shard-mb", "nan"], "--shard-mb must be a number > 0"),
    (["--chunk-mb", "nan"], "--chunk-mb must be a number > 0"),        # ValueError (traceback) at parsing
    (["--input", "in.fa", "./in.fa"], "--input names in.fa twice"),   # every record a duplicate, without a word
    (["--input", "-", "in.fa", "./in.fa"], "--input names in.fa twice"),  # (named '-': stdin shifted the lists)
    # from a user review: a MemoryError traceback, a build into the current directory, a key that never matches,
    # a tab that split rejects.tsv's columns
    (["--chunk-mb", "100000"], "--chunk-mb must be at most 1024"),
    (["--out", ""], "--out must name a directory"),
    (["--label-key", "a\x01"], "--label-key 'a\\x01': want a header key"),
    (["--input", "in\tx.fa"], "--input 'in\\tx.fa': a file name with a tab"),
], ids=["zstd-high", "zstd-low", "seed", "shard-records", "shard-mb", "chunk-mb", "min-seq-id", "coverage", "cov-mode",
        "label-empty", "label-eq", "stdin-twice", "shard-mb-inf", "shard-mb-nan", "chunk-mb-nan", "input-twice",
        "input-twice-after-stdin", "chunk-mb-huge", "out-empty", "label-control", "input-tab"])
def test_bad_argument_is_refused_before_any_work(tmp_path, capsys, args, message):
    from dataprep.build_shards import main

    with pytest.raises(SystemExit) as e:
        main(["--input", "in.fa", "--out", str(tmp_path / "o"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_one_file_under_two_names_is_refused(tmp_path, capsys):
    """From a user review: a hard link passed the "named twice" check (realpath), and its records all counted as
    duplicates."""
    from dataprep.build_shards import main

    (tmp_path / "a.fa").write_text(f">a\n{ACGU20}\n")
    os.link(tmp_path / "a.fa", tmp_path / "hard.fa")
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path / "a.fa"), str(tmp_path / "hard.fa"), "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and f"--input names {tmp_path / 'a.fa'} twice (as {tmp_path / 'hard.fa'}: the same " \
        "file, or a link to it)" in capsys.readouterr().err


def test_an_input_error_under_mpi_leaves_the_unfinished_stages_to_the_next_build(tmp_path, monkeypatch, capsys):
    """From a user review: rank 0 removed the unfinished stages while another rank still wrote into them, which
    printed a FileNotFoundError traceback after the one-line error."""
    import dataprep.build_shards as cli
    import dataprep.comm

    class Rank0Of2:
        rank, size, aborted = 0, 2, []

        def abort(self, code: int) -> None:
            self.aborted.append(code)
            raise SystemExit(code)

    def failing(cfg, comm):
        (tmp_path / "out" / ".work" / "normalise.tmp").mkdir(parents=True)
        raise InputError(f"{tmp_path / 'in.fa'}:3: bad record")

    (tmp_path / "in.fa").write_text(f">a\n{ACGU20}\n")
    monkeypatch.setattr(dataprep.comm, "MpiComm", Rank0Of2)
    monkeypatch.setattr(cli, "build", failing)
    with pytest.raises(SystemExit) as e:
        cli.main(["--mpi", "--input", str(tmp_path / "in.fa"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and Rank0Of2.aborted == [2] and "bad record" in capsys.readouterr().err
    assert (tmp_path / "out" / ".work" / "normalise.tmp").is_dir()


def test_input_given_twice_reads_both(tmp_path):
    """`--input a.fa --out o --input b.fa` read b.fa alone, with no word of a.fa."""
    from dataprep.build_shards import parse_args

    cfg, _ = parse_args(["--input", "a.fa", "--out", str(tmp_path / "o"), "--input", "b.fa", "c.fa"])
    assert cfg.inputs == ("a.fa", "b.fa", "c.fa")


def test_help_shows_each_default_once(capsys):
    """--min-seq-id, --coverage, --seed and --zstd-level showed no default; --cov-mode showed two, one "None"."""
    from dataprep.build_shards import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    for option, default in (("--min-seq-id MIN_SEQ_ID", "0.7"), ("-c COVERAGE", "0.8"), ("--seed SEED", "0"),
                            ("--zstd-level ZSTD_LEVEL", "2")):
        assert re.search(re.escape(option) + r" (?:(?!\(default:).)*\(default: " + re.escape(default) + r"\)", out), option
    assert "(default: MMseqs2's own" in out and "(default: None)" not in out


def test_a_second_build_into_an_out_in_use_is_refused(tmp_path, fasta):
    """Two builds into one OUT removed each other's unfinished stages: one died of a FileNotFoundError (or
    'mmseqs linclust failed'), and nothing kept their shard sets apart."""
    from dataprep.errors import DataprepError
    from rnalm.runlock import RunLock

    path = fasta(f">a\n{ACGU20}\n")
    with RunLock(tmp_path / "out" / ".work"):
        with pytest.raises(DataprepError, match=rf"out/.work is in use by another run: pid {os.getpid()} .*use "
                                                r"another --out"):
            build_small(tmp_path, [path])
    build_small(tmp_path, [path])
    assert not (tmp_path / "out" / ".work" / "run.lock").exists()


def test_a_full_disk_is_a_one_line_error_that_frees_the_unfinished_stages(tmp_path, fasta, monkeypatch, capsys):
    """No space left (or a read-only or over-quota OUT) was a traceback, and the unfinished stages kept the disk
    full; the finished stages and the published set stay."""
    import errno

    from dataprep import pipeline
    from dataprep.build_shards import main

    good = fasta(f">a\n{ACGU20}\n>b\n{ACGU20}GG\n")
    out = tmp_path / "out"
    assert main(["--input", str(good), "--out", str(out), "--no-cluster", "--no-report", "--quiet"]) == 0
    published = sorted(p.relative_to(out) for p in out.glob("*/shard-*.tar"))

    def full(cfg, out, *_):
        staging = pipeline._staging(out)
        staging.mkdir(parents=True, exist_ok=True)
        (staging / "part").write_bytes(b"x")
        raise OSError(errno.ENOSPC, "No space left on device", str(staging / "part"))

    monkeypatch.setattr(pipeline, "_write_shards", full)
    assert main(["--input", str(good), "--out", str(out), "--no-cluster", "--no-report", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: No space left on device: ") and "Traceback" not in err
    assert not list((out / ".work").glob("*.tmp"))
    assert (out / ".work" / "normalise").is_dir() and (out / ".work" / "dedup").is_dir()   # finished: kept
    assert sorted(p.relative_to(out) for p in out.glob("*/shard-*.tar")) == published
    assert set(read_back(out)) == {"a", "b"}


def test_a_full_disk_when_publishing_keeps_the_earlier_shard_set_and_names_out(tmp_path, fasta, monkeypatch, capsys):
    """The earlier manifest was deleted and its shards replaced before the new manifest was written: a full disk
    there left no manifest and the new shards, and the error said 'None' where the file goes."""
    import errno

    from dataprep import pipeline
    from dataprep.build_shards import main

    good = fasta(">a\n" + ACGU20 + "\n>b\n" + ACGU20 + "GG\n>c\n" + ACGU20 + "CC\n")
    out = tmp_path / "out"
    args = ["--input", str(good), "--out", str(out), "--no-cluster", "--no-report", "--quiet", "--shard-records", "1"]
    assert main(args) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.glob("*/shard-*.tar")}
    manifest = (out / "manifest.json").read_bytes()

    def full(*_):
        raise OSError(errno.ENOSPC, "No space left on device")  # as a write() gives it: no file name

    monkeypatch.setattr(pipeline, "write_manifest", full)
    assert main([*args, "--seed", "3"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: No space left on device: {out} ")
    assert (out / "manifest.json").read_bytes() == manifest
    assert {p.relative_to(out): p.read_bytes() for p in out.glob("*/shard-*.tar")} == before


def test_a_publish_cut_short_is_finished_by_the_next_build(tmp_path, fasta, monkeypatch):
    """A crash among the shard renames left OUT without a manifest and with old and new shards mixed; the staged
    set was then deleted and written again. Now the next build finishes the renames from the staged manifest."""
    from dataprep import pipeline

    class Crash(BaseException):
        pass

    path = fasta("".join(f">r{i}\n{ACGU20}{'ACGU'[i % 4] * (i + 1)}\n" for i in range(6)))
    build_small(tmp_path, [path], records_per_shard=2)
    real, moved = os.replace, []

    def crashing(src, dst):
        if str(src).endswith(".tar"):
            if len(moved) == 1:
                raise Crash
            moved.append(dst)
        real(src, dst)

    monkeypatch.setattr(pipeline.os, "replace", crashing)
    with pytest.raises(Crash):
        build_small(tmp_path, [path], records_per_shard=2, seed=5)
    monkeypatch.setattr(pipeline.os, "replace", real)
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()             # no reader takes the mixed set meanwhile
    result = build_small(tmp_path, [path], records_per_shard=2, seed=5)
    assert "shards" in result.skipped                       # finished, not written again
    m = read_manifest(out)
    assert m.params["seed"] == 5 and sorted(read_back(out)) == [f"r{i}" for i in range(6)]
    for info in m.shards:                                   # every shard is the new set's
        list(iter_blocks(out / info.path, verify_checksum=True, expected_sha256=info.sha256))


def test_a_damaged_finished_stage_is_named_not_published(tmp_path, fasta):
    """A stage whose files a node crash left short (they were not flushed before its rename) was taken as
    finished: the build exited 0 with shards that could not be read."""
    from dataprep.errors import DataprepError

    path = fasta(">a\n" + ACGU20 + "\n>b\n" + ACGU20 + "GG\n")
    build_small(tmp_path, [path])
    seq = tmp_path / "out" / ".work" / "normalise" / "seq.bin"
    seq.write_bytes(seq.read_bytes()[:10])
    with pytest.raises(DataprepError, match=rf"{seq}: 10 bytes where its lengths add up to 42: a damaged stage"):
        build_small(tmp_path, [path], seed=2)


def test_duplicates_tsv_lists_every_duplicate_in_input_order_when_written_in_batches(tmp_path, fasta, monkeypatch):
    import dataprep.pipeline as pipeline

    monkeypatch.setattr(pipeline, "TSV_BATCH", 2)
    rows = [("a", ACGU20), ("b", ACGU20), ("c", ACGU20 + "A"), ("d", ACGU20.lower()), ("e", ACGU20 + "a"),
            ("f", ACGU20 + "G"), ("g", ACGU20)]
    _, kept = rejects_of(tmp_path, fasta("".join(f">{rid}\n{seq}\n" for rid, seq in rows)))
    assert set(kept) == {"a", "c", "f"}
    got = [(r["kept_id"], r["duplicate_id"], r["duplicate_line"])
           for r in read_tsv(tmp_path / "out" / "duplicates.tsv")]
    assert got == [("a", "b", "3"), ("a", "d", "7"), ("c", "e", "9"), ("a", "g", "13")]
