"""RiNALMo's 22-token alphabet, with vectorised (lookup-table) encoding.

Token ids and order are the original's: special tokens first, then nucleotides in DNA letters.
U and T share one id (RNA is stored as DNA letters, as the original); IUPAC codes, inosine and
gap keep their own ids; any other byte maps to <unk>.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

VOCAB: tuple[str, ...] = (
    "<cls>", "<pad>", "<eos>", "<unk>", "<mask>",
    "A", "C", "G", "T", "I", "R", "Y", "K", "M", "S", "W", "B", "D", "H", "V", "N", "-",
)
CLS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
VOCAB_SIZE = len(VOCAB)
TOKEN_TO_ID = {tok: i for i, tok in enumerate(VOCAB)}
NUCLEOTIDE_IDS = tuple(range(5, VOCAB_SIZE))
# Ids the MLM 10%-random replacement draws from: the four standard nucleotides.
STANDARD_NUCLEOTIDE_IDS = tuple(TOKEN_TO_ID[c] for c in "ACGT")


def _build_lut() -> np.ndarray:
    lut = np.full(256, UNK_ID, dtype=np.uint8)
    for tok, i in TOKEN_TO_ID.items():
        if len(tok) == 1:
            lut[ord(tok)] = i
            lut[ord(tok.lower())] = i
    lut[ord("U")] = lut[ord("u")] = TOKEN_TO_ID["T"]
    return lut


BYTE_TO_ID: np.ndarray = _build_lut()
# <unk> as X and <mask> as ?: one letter per position (both encode back to <unk>); <cls>/<pad>/<eos> are dropped
_ID_TO_RNA = np.frombuffer(b"???X?ACGUIRYKMSWBDHVN-", dtype=np.uint8)
_ID_TO_DNA = np.frombuffer(b"???X?ACGTIRYKMSWBDHVN-", dtype=np.uint8)
_DROPPED = (CLS_ID, PAD_ID, EOS_ID)


def encode_bytes(buf: bytes | np.ndarray) -> np.ndarray:
    """Map raw sequence bytes (any case, U or T) to token ids (uint8), one lookup per byte."""
    arr = np.frombuffer(buf, dtype=np.uint8) if isinstance(buf, (bytes, bytearray, memoryview)) else buf
    return BYTE_TO_ID[arr]


def encode(seq: str | bytes, add_special: bool = True) -> np.ndarray:
    """Encode one sequence to int64 ids, as `[<cls>] + seq + [<eos>]` when add_special."""
    raw = seq.encode("ascii", errors="replace") if isinstance(seq, str) else seq
    body = encode_bytes(raw).astype(np.int64)
    if not add_special:
        return body
    out = np.empty(len(body) + 2, dtype=np.int64)
    out[0], out[1:-1], out[-1] = CLS_ID, body, EOS_ID
    return out


def batch_encode(seqs: Sequence[str | bytes], add_special: bool = True,
                 pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Encode and right-pad with <pad>; returns (ids [B, L] int64, lengths [B] int64, CLS and EOS counted)."""
    if isinstance(seqs, (str, bytes)):
        raise TypeError("batch_encode takes a list of sequences, got one sequence: batch_encode([seq]), or encode(seq)")
    encoded = [encode(s, add_special) for s in seqs]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    width = max(int(lengths.max(initial=0)), pad_to or 0)
    ids = np.full((len(encoded), width), PAD_ID, dtype=np.int64)
    for row, e in zip(ids, encoded):
        row[: len(e)] = e
    return ids, lengths


def decode(ids: Sequence[int] | np.ndarray, rna: bool = True) -> str:
    """One sequence's ids to a string (U for T when rna): <cls>, <pad> and <eos> are dropped, <unk> is written X and
    <mask> ?, so every other position keeps its letter. Ids outside the vocabulary and 2-D input are errors."""
    arr = np.asarray(ids)
    if arr.size and arr.dtype.kind not in "iu":  # (5.7 was read as 5, a row of probabilities as <cls>s)
        raise ValueError(f"decode takes integer ids, got {arr.dtype} values")
    arr = arr.astype(np.int64)
    if arr.ndim != 1:
        raise ValueError(f"decode takes one sequence's ids (1-D), got shape {arr.shape}: decode a batch row by row")
    bad = arr[(arr < 0) | (arr >= VOCAB_SIZE)]
    if bad.size:
        raise ValueError(f"id {int(bad[0])} is outside the {VOCAB_SIZE}-token vocabulary")
    arr = arr[~np.isin(arr, _DROPPED)]
    table = _ID_TO_RNA if rna else _ID_TO_DNA
    return table[arr].tobytes().decode("ascii")
