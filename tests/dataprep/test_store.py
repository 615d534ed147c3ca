"""dataprep.store: part stores merged in input order, the read side's checks (unit level; the builds in
test_build.py go through it end to end)."""
from __future__ import annotations

import numpy as np
import pytest

from dataprep.errors import DataprepError
from dataprep.normalize import NormalizeConfig, parse_chunk
from dataprep.store import Store, StoreWriter, _copy_range, merge_parts


def chunk(*records: tuple[str, str], first_line: int = 1):
    text = "".join(f">{rid}\n{seq}\n" for rid, seq in records)
    return parse_chunk(text.encode(), first_line, NormalizeConfig(min_len=1))


def write_part(directory, chunks) -> None:
    """chunks: (source, key, records, first line) each."""
    w = StoreWriter(directory, labels=False)
    for source, key, records, line in chunks:
        w.append(chunk(*records, first_line=line), source, key)
    w.close()


def test_parts_are_merged_in_the_order_of_their_chunk_keys(tmp_path):
    write_part(tmp_path / "a", [(0, 0, [("r0", "ACGU")], 1), (0, 2, [("r2", "GGGG"), ("r3", "CC")], 5)])
    write_part(tmp_path / "b", [(0, 1, [("r1", "UUUUU")], 3), (0, 3, [("r4", "A")], 9)])
    merge_parts([tmp_path / "a", tmp_path / "b"], tmp_path / "out")
    store = Store(tmp_path / "out")
    assert store.ids_of(np.arange(5)) == ["r0", "r1", "r2", "r3", "r4"]
    assert store.seq_bytes(np.arange(5)) == b"ACGUUUUUUGGGGCCA" and store.line.tolist() == [1, 3, 5, 7, 9]
    assert store.ids_of(np.array([], np.int64)) == []


def test_a_blob_its_lengths_do_not_add_up_to_is_a_damaged_stage(tmp_path):
    write_part(tmp_path / "s", [(0, 0, [("r0", "ACGU"), ("r1", "GG")], 1)])
    seq = tmp_path / "s" / "seq.bin"
    seq.write_bytes(seq.read_bytes()[:-1])
    with pytest.raises(DataprepError, match=r"seq.bin: 5 bytes where its lengths add up to 6: a damaged stage"):
        Store(tmp_path / "s")
    write_part(tmp_path / "t", [(0, 0, [("r0", "ACGU"), ("r1", "GG")], 1)])
    seq_len = tmp_path / "t" / "seq_len.bin"
    seq_len.write_bytes(seq_len.read_bytes()[:-8])    # the lengths cut short: the blob is the longer
    with pytest.raises(DataprepError, match=r"seq.bin: 6 bytes where its lengths add up to 4"):
        Store(tmp_path / "t")


def test_a_chunk_of_blank_lines_adds_nothing_to_a_labelled_store(tmp_path):
    w = StoreWriter(tmp_path / "s", labels=True)
    w.append(parse_chunk(b"\n\n", 1, NormalizeConfig(label_key="family")), 0, 0)
    w.close()
    assert len(Store(tmp_path / "s")) == 0


def test_a_failed_write_is_raised_by_a_later_append_or_by_close(tmp_path, monkeypatch):
    """At most MAX_PENDING chunks wait for the writer thread: the next append waits, and meets its error."""
    def disk_full(self, parts):
        raise OSError("No space left on device")

    monkeypatch.setattr(StoreWriter, "_write", disk_full)
    w = StoreWriter(tmp_path / "s", labels=False)
    with pytest.raises(OSError, match="No space"):
        for k in range(StoreWriter.MAX_PENDING + 1):
            w.append(chunk(("r", "ACGU")), 0, k)
    with pytest.raises(OSError, match="No space"):   # the write still pending failed too
        w.close()


def test_an_empty_store_reads_as_no_records(tmp_path):
    StoreWriter(tmp_path / "s", labels=True).close()
    store = Store(tmp_path / "s")
    assert len(store) == 0 and store.label_bytes(np.zeros(0, np.int64)) == b""


@pytest.mark.timeout(30)   # a source shorter than the range copied nothing, forever
def test_copying_past_the_end_of_a_part_file_is_an_error(tmp_path):
    (tmp_path / "src").write_bytes(b"0123456789")
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        _copy_range(src, dst, 4, 3)
        with pytest.raises(OSError, match="ended before byte 20"):
            _copy_range(src, dst, 8, 12)
    assert (tmp_path / "dst").read_bytes().startswith(b"45689")
