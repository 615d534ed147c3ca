import numpy as np
import pytest

from rnalm import tokenizer as tk


def test_vocabulary_is_the_originals_in_order():
    assert tk.VOCAB == ("<cls>", "<pad>", "<eos>", "<unk>", "<mask>", "A", "C", "G", "T", "I", "R", "Y",
                        "K", "M", "S", "W", "B", "D", "H", "V", "N", "-")
    assert (tk.CLS_ID, tk.PAD_ID, tk.EOS_ID, tk.UNK_ID, tk.MASK_ID, tk.VOCAB_SIZE) == (0, 1, 2, 3, 4, 22)


def test_u_and_t_share_an_id_and_case_is_ignored():
    assert list(tk.encode("UuTt", add_special=False)) == [8, 8, 8, 8]
    assert list(tk.encode("acgn", add_special=False)) == [5, 6, 7, 20]


def test_iupac_inosine_and_gap_keep_their_ids_and_anything_else_is_unk():
    assert list(tk.encode("IRYKMSWBDHVN-", add_special=False)) == list(range(9, 22))
    assert list(tk.encode("X.*E ", add_special=False)) == [tk.UNK_ID] * 5
    # a non-ASCII letter is one <unk>, not dropped: every later position would shift by one
    assert list(tk.encode("A\u00c4C", add_special=False)) == [5, tk.UNK_ID, 6]


def test_lookup_table_matches_a_per_character_definition_for_every_byte():
    expected = np.full(256, tk.UNK_ID)
    for i, tok in enumerate(tk.VOCAB):
        if len(tok) == 1:
            expected[ord(tok)] = expected[ord(tok.lower())] = i
    expected[ord("U")] = expected[ord("u")] = 8
    assert np.array_equal(tk.encode_bytes(bytes(range(256))), expected)


def test_encode_wraps_in_cls_eos_and_batch_pads_right():
    assert list(tk.encode("AC")) == [0, 5, 6, 2]
    ids, lengths = tk.batch_encode(["ACG", "A"], pad_to=7)
    assert ids.shape == (2, 7) and list(lengths) == [5, 3]
    assert list(ids[1]) == [0, 5, 2, 1, 1, 1, 1]


@pytest.mark.parametrize("seq", ["ACGUN-IRY", "IRYKMSWBDHVN-", "a", ""])  # every letter (S and W swapped passed)
def test_decode_inverts_encode_in_rna_letters(seq):
    assert tk.decode(tk.encode(seq)) == seq.upper()
    assert tk.decode(tk.encode("ACGU"), rna=False) == "ACGT"


def test_decode_keeps_every_position_and_refuses_what_is_no_sequence():
    """<unk> and <mask> were dropped (the string no longer lined up with the ids), ids outside the vocabulary were
    dropped silently, and a [B, L] batch came back as one string of all its rows."""
    ids = tk.encode("ACGXZ.*U")
    assert tk.decode(ids) == "ACGXXXXU" and np.array_equal(tk.encode(tk.decode(ids)), ids)
    assert tk.decode([tk.CLS_ID, 5, tk.MASK_ID, 6, tk.EOS_ID, tk.PAD_ID]) == "A?C"
    for bad in ([0, 5, 99], [5, -1], [5, tk.VOCAB_SIZE]):  # the first id past the vocabulary too
        with pytest.raises(ValueError, match="outside the 22-token vocabulary"):
            tk.decode(bad)
    with pytest.raises(ValueError, match="decode a batch row by row"):
        tk.decode(tk.batch_encode(["ACGU", "GG"])[0])
    with pytest.raises(ValueError, match="decode takes integer ids, got float64"):  # (5.7 was read as 5: A)
        tk.decode(np.array([5.7, 6.2]))
    assert tk.decode([]) == "" and tk.decode(np.array([5, 6], dtype=np.uint8)) == "AC"


@pytest.mark.parametrize("one", ["ACGU", b"ACGU"])
def test_batch_encode_refuses_one_sequence_it_would_read_as_a_batch_of_letters(one):
    with pytest.raises(TypeError, match=r"batch_encode takes a list of sequences"):
        tk.batch_encode(one)
