"""Vectorised FASTA chunk parsing + normalisation: one numpy pass per step over a whole chunk.

Normalised sequence: upper-case, T->U, IUPAC codes (ACGU RYKMSWBDHVN) kept, whitespace and line breaks
removed. Records that cannot be kept get a reject (line, id, reason); nothing is dropped silently.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .arrays import concat_ranges, fill_ranges, offsets_from_lengths
from .digest import PAD, segment_digests
from .fasta import INDENTED_HEADER, text_before_header

IUPAC = b"ACGURYKMSWBDHVN"
_WS_BYTES = b" \t\r\v\f"  # '\n' is handled structurally
_WS_MARK, _BAD_MARK = 0xFE, 0xFF


def _norm_table() -> bytes:
    t = bytearray([_BAD_MARK] * 256)
    for c in IUPAC:
        t[c] = t[ord(chr(c).lower())] = c
    t[ord("T")] = t[ord("t")] = ord("U")
    for c in _WS_BYTES:
        t[c] = _WS_MARK
    return bytes(t)


NORM_TABLE = _norm_table()
_IS_CTRL = np.zeros(256, bool)
_IS_CTRL[[c for c in range(32) if c not in b"\t\r\n\v\f"]] = True  # (DEL, 127, is found apart: _header_rejects)
_IS_BLANK = np.zeros(256, bool)
_IS_BLANK[list(_WS_BYTES)] = True
_INDENTED_HEADER = re.compile(rb"\n[ \t\r\v\f]+>")


@dataclass(frozen=True)
class NormalizeConfig:
    min_len: int = 16
    max_len: int = 8192
    label_key: str | None = None  # header `key=value` copied into the record's label


@dataclass
class ParsedChunk:
    """Kept records of one chunk (arrays aligned by record) plus the rejects."""
    seq: np.ndarray  # uint8, concatenated normalised sequences
    seq_len: np.ndarray  # int64
    ids: bytes  # "id\n" per record
    id_len: np.ndarray  # int32, without the "\n"
    labels: bytes | None
    label_len: np.ndarray | None
    line: np.ndarray  # int64, header line number
    seqh: np.ndarray  # uint64 digest of the sequence (dedup candidate key)
    idh: np.ndarray  # uint64 digest of the id
    records_in: int = 0
    newlines: int = 0  # in the input chunk (FastaStream need not count them again)
    rejects: list[tuple[int, str, str]] = field(default_factory=list)  # (line, id, reason)
    stray: tuple[int, str] | None = None  # (line, reason): a line outside the FASTA grammar, which stops the run
    # (text before the first header, a header indented by whitespace); the chunk is then not parsed

    def __len__(self) -> int:
        return len(self.seq_len)


def _first_bad_per_record(norm: bytearray, at: int, raw_off: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(record, first invalid position) per record with an invalid byte, `at` being the first one: a memchr
    scan that skips to the next record after each hit (invalid records are few, their bad bytes maybe many)."""
    recs, pos, end = [], [], int(raw_off[-1])
    while 0 <= at < end:
        r = int(np.searchsorted(raw_off, at, side="right")) - 1
        recs.append(r)
        pos.append(at)
        at = norm.find(_BAD_MARK, int(raw_off[r + 1]), end)
    return np.array(recs, np.int64), np.array(pos, np.int64)


def _raw_to_input(pos: np.ndarray, line_start: np.ndarray, nl: np.ndarray, hk: np.ndarray) -> np.ndarray:
    """Input positions of the raw (sequence bytes only) positions `pos`: raw is the concatenation of the
    sequence lines, i.e. every line after the first header that is not a header line, without its newline."""
    is_seq = np.ones(len(nl), bool)
    is_seq[: hk[0]] = False
    is_seq[hk] = False
    lines = np.flatnonzero(is_seq)
    line_len = nl[lines] - line_start[lines]
    line_off = np.cumsum(line_len) - line_len
    j = np.searchsorted(line_off, pos, side="right") - 1  # empty lines share an offset; the last one is right
    return line_start[lines[j]] + (pos - line_off[j])


def parse_chunk(data: bytes, first_line: int, cfg: NormalizeConfig) -> ParsedChunk:
    """Parse whole FASTA records in `data` (which starts with '>' or with blank lines before one; other text
    there, or a header indented by whitespace anywhere, is returned as `stray`)."""
    stray = text_before_header(data)
    if stray:
        return _empty(0, stray=(first_line + stray[0], stray[1]))
    added_newline = data[-1:] != b"\n"
    if added_newline:
        data = bytes(data) + b"\n"
    a = np.frombuffer(data, np.uint8)
    low = np.flatnonzero(a <= 32)  # whitespace and control characters, every newline included
    nl = low[a[low] == 10]
    newlines_in_data = len(nl) - added_newline
    line_start = np.concatenate(([0], nl[:-1] + 1))
    first = a[line_start]
    hk = np.flatnonzero(first == 62)  # header line numbers within the chunk
    if len(hk) == 0:
        out = _empty(0)
        out.newlines = newlines_in_data
        return out
    misplaced = _indented_header(data, first, line_start, nl, int(hk[0])) or _header_inside_line(a, first, nl)
    if misplaced:
        return _empty(0, stray=(first_line + misplaced[0], misplaced[1]))
    hs, he = line_start[hk], nl[hk]  # '>' position, header-ending newline
    n = len(hk)
    lines = first_line + hk

    # ---- headers: ">text\n" at a[hs:he + 1]; the id is the text up to the first whitespace/control character
    id_start = hs + 1
    id_end = low[np.searchsorted(low, id_start)]  # at most he
    id_len = (id_end - id_start).astype(np.int32)

    padded, seq_len, reasons = _sequences(data, hk, hs, he, nl, line_start)
    seq_off = offsets_from_lengths(seq_len)
    _header_rejects(a, hs, he, low, id_len, reasons)
    _length_rejects(seq_len, cfg, reasons)

    id_blob = a[concat_ranges(id_start, id_len + 1)]  # id + the whitespace after it, which becomes "\n"
    id_off = offsets_from_lengths(id_len + 1)
    id_blob[id_off[1:] - 1] = 10
    labels = label_len = None
    if cfg.label_key:
        labels, label_len = _labels(a[concat_ranges(hs, he - hs + 1)], offsets_from_lengths(he - hs + 1),
                                    cfg.label_key, reasons)

    ok = np.ones(n, bool)
    rejects = []
    if reasons:
        bad = np.fromiter(reasons.keys(), np.int64)
        ok[bad] = False
        for r in sorted(reasons):
            rid = bytes(id_blob[id_off[r]: id_off[r + 1] - 1]).decode("utf-8", "backslashreplace")
            rejects.append((int(lines[r]), rid, reasons[r]))
    seqh = segment_digests(padded, seq_off)
    ids = id_blob.tobytes()
    idh = segment_digests(np.frombuffer(ids + bytes(PAD), np.uint8), id_off)  # id plus its "\n"
    out = ParsedChunk(seq=padded[: seq_off[-1]], seq_len=seq_len.astype(np.int64), ids=ids, id_len=id_len,
                      labels=labels, label_len=label_len, line=lines.astype(np.int64), seqh=seqh, idh=idh,
                      records_in=n, rejects=rejects, newlines=newlines_in_data)
    return out if ok.all() else _select(out, ok, seq_off, id_off)


def _sequences(data: bytes, hk: np.ndarray, hs: np.ndarray, he: np.ndarray, nl: np.ndarray,
               line_start: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """The records' normalised sequences, concatenated and followed by PAD, their lengths, and the invalid
    character each record has first (record index -> reason)."""
    # "raw": every byte that is neither a newline nor in a header line, in order, normalised in one pass: header
    # bytes (and blank lines before the first header) are overwritten with newlines in a copy, and `translate`
    # maps every byte while deleting the newlines.
    a, n = np.frombuffer(data, np.uint8), len(hk)
    scratch = bytearray(data)
    blank = np.frombuffer(scratch, np.uint8)
    fill_ranges(blank, hs, he - hs + 1, 10)
    blank[: hs[0]] = 10
    del blank  # (a bytearray cannot be resized while exported)
    next_hs = np.append(hs[1:], len(a))
    newlines_in_seq = np.diff(np.append(hk, len(nl))) - 1
    raw_len = next_hs - he - 1 - newlines_in_seq
    raw_off = offsets_from_lengths(raw_len)
    norm = scratch.translate(NORM_TABLE, b"\n")
    del scratch
    norm += bytes(PAD)  # PAD: the digest reads whole words

    reasons: dict[int, str] = {}
    bad_at = norm.find(_BAD_MARK)
    if bad_at >= 0:
        recs, pos = _first_bad_per_record(norm, bad_at, raw_off)
        original = _raw_to_input(pos, line_start, nl, hk)
        for r, p, q in zip(recs.tolist(), pos.tolist(), original.tolist()):
            c = int(a[q])
            shown = chr(c) if 32 < c < 127 else f"\\x{c:02x}"
            at = p - raw_off[r] - norm.count(_WS_MARK, raw_off[r], p) + 1  # whitespace is not in the sequence
            reasons[r] = f"invalid character '{shown}' (0x{c:02x}) at sequence position {at}"
    padded = np.frombuffer(norm, np.uint8)
    seq_len = raw_len
    if norm.find(bytes([_WS_MARK])) >= 0:  # spaces, tabs, CR inside sequences: drop them
        ws_pos = np.flatnonzero(padded == _WS_MARK)
        ws_rec = np.searchsorted(raw_off, ws_pos, side="right") - 1
        seq_len = raw_len - np.bincount(ws_rec, minlength=n)
        padded = np.delete(padded, ws_pos)
    return padded, seq_len, reasons


def _length_rejects(seq_len: np.ndarray, cfg: NormalizeConfig, reasons: dict[int, str]) -> None:
    for r in np.flatnonzero(seq_len == 0).tolist():
        reasons.setdefault(r, "empty sequence (header without sequence)")
    for r in np.flatnonzero((seq_len > 0) & (seq_len < cfg.min_len)).tolist():
        reasons.setdefault(r, f"too short: {seq_len[r]} nt < min_len {cfg.min_len}")
    for r in np.flatnonzero(seq_len > cfg.max_len).tolist():
        reasons.setdefault(r, f"too long: {seq_len[r]} nt > max_len {cfg.max_len}")


def _indented_header(data: bytes, first: np.ndarray, line_start: np.ndarray, nl: np.ndarray,
                     after: int) -> tuple[int, str] | None:
    """(line index, reason) of the first header indented by whitespace past line `after`, the first header line
    (`text_before_header` judges the lines before it). The regular expression runs only on a chunk in which a
    line starts with a blank (few inputs have one), from that line on, so the check costs one gather per line."""
    blank = np.flatnonzero(_IS_BLANK[first[after:]])
    if len(blank) == 0:
        return None
    m = _INDENTED_HEADER.search(data, int(line_start[after + blank[0]]) - 1)
    if m is None:
        return None
    k = int(np.searchsorted(nl, m.start())) + 1  # the line after the newline that m starts with
    return k, f"{INDENTED_HEADER}: {bytes(data[m.start() + 1: nl[k]][:40])!r}"


def _header_inside_line(a: np.ndarray, first: np.ndarray, nl: np.ndarray) -> tuple[int, str] | None:
    """(line index, reason) of the first '>' with text after it inside a sequence line, or after a carriage return
    alone anywhere: a header that does not start its line, which would be read as part of the record before it,
    and be lost. `cat a.fa b.fa` makes one when a.fa lacks its last line break, or b.fa starts with a byte-order
    mark or has classic Mac OS line ends. ('>' ending a sequence line is an invalid character of its record.)"""
    gt = np.flatnonzero(a[1:] == 62) + 1
    gt = gt[a[gt - 1] != 10]
    if len(gt) == 0:
        return None
    line = np.searchsorted(nl, gt)
    after_cr = a[gt - 1] == 13
    text_after = ~_IS_BLANK[a[gt + 1]] & (a[gt + 1] != 10)  # a[-1] is a line break: gt + 1 is in range
    bad = np.flatnonzero(after_cr | ((first[line] != 62) & text_after))
    if len(bad) == 0:
        return None
    p, k = int(gt[bad[0]]), int(line[bad[0]])
    if after_cr[bad[0]]:
        return k, ("lines end in a carriage return alone from here on (classic Mac OS line endings), so its records "
                   "would read as one line: convert them, e.g. tr '\\r' '\\n' < FILE > NEW")
    shown = bytes(a[max(p - 20, int(nl[k - 1]) + 1 if k else 0): min(p + 20, int(nl[k]))])
    return k, f"'>' inside a sequence line (a header that does not start its line?): {shown!r}"


def _header_rejects(a: np.ndarray, hs: np.ndarray, he: np.ndarray, low: np.ndarray, id_len: np.ndarray,
                    reasons: dict[int, str]) -> None:
    """Empty ids, control characters and invalid UTF-8 in the headers a[hs[r]:he[r] + 1]."""
    for r in np.flatnonzero(id_len == 0).tolist():
        nothing = not bytes(a[hs[r] + 1:he[r]]).strip()
        reasons.setdefault(r, "empty record id (" + ("nothing after '>')" if nothing else
                                                     "whitespace right after '>': the id is the header's text up "
                                                     "to its first whitespace)"))
    top = int(a.max())
    ctrl = low[_IS_CTRL[a[low]]]
    if top >= 127:  # DEL (not `== 127`: a byte >= 0x80 elsewhere in the chunk must not hide it)
        ctrl = np.union1d(ctrl, np.flatnonzero(a == 127))
    recs, pos = _in_headers(ctrl, hs, he)
    if len(recs):
        recs, first = np.unique(recs, return_index=True)
        for r, p in zip(recs.tolist(), pos[first].tolist()):
            reasons.setdefault(r, f"control character 0x{a[p]:02x} in header (binary data?)")
    if top >= 0x80:
        for r in np.unique(_in_headers(np.flatnonzero(a >= 0x80), hs, he)[0]).tolist():
            try:
                a[hs[r]: he[r] + 1].tobytes().decode("utf-8")
            except UnicodeDecodeError as e:
                reasons.setdefault(r, f"header is not valid UTF-8 ({e.reason} at byte {e.start})")


def _in_headers(pos: np.ndarray, hs: np.ndarray, he: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(record, position) of the sorted positions `pos` that lie in a header line [hs[r], he[r]]."""
    rec = np.searchsorted(hs, pos, side="right") - 1
    inside = rec >= 0
    inside[inside] = pos[inside] <= he[rec[inside]]
    return rec[inside], pos[inside]


def _labels(hdr: np.ndarray, hdr_off: np.ndarray, key: str, reasons: dict[int, str]) -> tuple[bytes, np.ndarray]:
    """Each record's `key=value` label; a record giving the key twice with different values is rejected."""
    text = hdr.tobytes()
    n = len(hdr_off) - 1
    values: list[bytes | None] = [None] * n
    pat = re.compile(rb"[ \t]" + re.escape(key.encode()) + rb"=([^\s]*)")
    for m in pat.finditer(text):
        r, value = int(np.searchsorted(hdr_off, m.start(), side="right")) - 1, m.group(1)
        if not value:  # `key=` labels nothing
            continue
        if values[r] is None:
            values[r] = value
        elif values[r] != value:
            shown = [v.decode("utf-8", "backslashreplace") for v in (values[r], value)]
            reasons.setdefault(r, f"label key {key!r} given twice: {shown[0]!r} and {shown[1]!r}")
    values = [v or b"" for v in values]
    return b"".join(v + b"\n" for v in values), np.fromiter(map(len, values), np.int32, n)


def _keep_ranges(blob, offsets: np.ndarray, bad: np.ndarray):
    """Concatenate blob[offsets[i]:offsets[i+1]] for every i not in the sorted `bad` (one slice per gap)."""
    cuts = np.concatenate(([0], np.ravel(np.column_stack((offsets[bad], offsets[bad + 1]))), [offsets[-1]]))
    pieces = [blob[a:b] for a, b in zip(cuts[0::2].tolist(), cuts[1::2].tolist())]
    return np.concatenate(pieces) if isinstance(blob, np.ndarray) else b"".join(pieces)


def _select(p: ParsedChunk, ok: np.ndarray, seq_off: np.ndarray, id_off: np.ndarray) -> ParsedChunk:
    """Drop the rejected records (few): copy the runs of kept records between them."""
    bad = np.flatnonzero(~ok)
    labels = label_len = None
    if p.labels is not None:
        labels = _keep_ranges(p.labels, offsets_from_lengths(p.label_len.astype(np.int64) + 1), bad)
        label_len = p.label_len[ok]
    return ParsedChunk(seq=_keep_ranges(p.seq, seq_off, bad), seq_len=p.seq_len[ok],
                       ids=_keep_ranges(p.ids, id_off, bad), id_len=p.id_len[ok], labels=labels,
                       label_len=label_len, line=p.line[ok], seqh=p.seqh[ok], idh=p.idh[ok],
                       records_in=p.records_in, rejects=p.rejects, newlines=p.newlines)


def _empty(records_in: int, stray: tuple[int, str] | None = None) -> ParsedChunk:
    z = np.zeros(0, np.int64)
    return ParsedChunk(seq=np.zeros(0, np.uint8), seq_len=z, ids=b"", id_len=np.zeros(0, np.int32), labels=None,
                       label_len=None, line=z, seqh=z.astype(np.uint64), idh=z.astype(np.uint64), records_in=records_in,
                       stray=stray)


def oversized_reject(header: bytes, seq_len: int, line: int, cfg: NormalizeConfig) -> tuple[int, str, str]:
    rid = header[1:].split(None, 1)[0].decode("utf-8", "backslashreplace") if header[1:].strip() else ""
    return line, rid, f"too long: {seq_len} nt > max_len {cfg.max_len} (record streamed past, not loaded)"
