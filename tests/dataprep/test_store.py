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
    assert store.seq_bytes(np.arange(5)) == b"ACGUUUUUUGGGGCCA" and store.in_input_order
    assert store.ids_of(np.array([], np.int64)) == []


def test_records_of_several_inputs_are_ordered_by_input_then_line(tmp_path):
    """Two inputs' line numbers overlap: file 0's line 5 comes before file 1's line 1."""
    write_part(tmp_path / "s", [(1, 0, [("late", "ACGU")], 1), (0, 1, [("early", "GGGG")], 5)])
    store = Store(tmp_path / "s")
    assert not store.in_input_order and np.argsort(store.order_key).tolist() == [1, 0]


def test_input_order_is_checked_across_its_chunks_of_a_million_records(tmp_path):
    n = (1 << 20) + 1
    (tmp_path / "ids.bin").write_bytes(b"\n" * n)
    for name, dtype in (("seq_len", np.int64), ("id_len", np.int32), ("source", np.int32)):
        np.zeros(n, dtype).tofile(tmp_path / f"{name}.bin")
    line = np.arange(n, dtype=np.int64)
    line.tofile(tmp_path / "line.bin")
    assert Store(tmp_path).in_input_order
    line[1 << 20] = 0                              # the first record of the second chunk goes back
    line.tofile(tmp_path / "line.bin")
    assert not Store(tmp_path).in_input_order


def test_a_blob_its_lengths_do_not_add_up_to_is_a_damaged_stage(tmp_path):
    write_part(tmp_path / "s", [(0, 0, [("r0", "ACGU"), ("r1", "GG")], 1)])
    seq = tmp_path / "s" / "seq.bin"
    seq.write_bytes(seq.read_bytes()[:-1])
    with pytest.raises(DataprepError, match=r"seq.bin: 5 bytes where its lengths add up to 6: a damaged stage"):
        Store(tmp_path / "s")


def test_an_empty_store_reads_as_no_records(tmp_path):
    StoreWriter(tmp_path / "s", labels=True).close()
    store = Store(tmp_path / "s")
    assert len(store) == 0 and store.in_input_order and store.label_bytes(np.zeros(0, np.int64)) == b""


@pytest.mark.timeout(30)   # a source shorter than the range copied nothing, forever
def test_copying_past_the_end_of_a_part_file_is_an_error(tmp_path):
    (tmp_path / "src").write_bytes(b"0123456789")
    with open(tmp_path / "src", "rb") as src, open(tmp_path / "dst", "wb") as dst:
        _copy_range(src, dst, 4, 3)
        with pytest.raises(OSError, match="ended before byte 20"):
            _copy_range(src, dst, 8, 12)
    assert (tmp_path / "dst").read_bytes().startswith(b"45689")
