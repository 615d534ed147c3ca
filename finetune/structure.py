"""RNA secondary structures: a pair list, and readers/writers for dot-bracket, bpseq and ct.

A structure is an int64 array `pairs[n, 2]` of 0-based positions with i < j, sorted by i; every base has at
most one partner. Pseudoknots are allowed (any crossing pairs). Readers raise `StructureError` naming the
file, record and reason.
"""
from __future__ import annotations

import csv
import io
import re
import string
import sys
import zlib
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

from dataprep.fasta import INDENTED_HEADER, decompressed
from rnalm.files import atomic_write


# Bracket levels in the order pseudoknot depth is written: () [] {} <> then Aa Bb ... Zz.
BRACKETS: tuple[tuple[str, str], ...] = (("(", ")"), ("[", "]"), ("{", "}"), ("<", ">")) + tuple(
    (u, u.lower()) for u in string.ascii_uppercase)
_OPEN = {o: lvl for lvl, (o, _) in enumerate(BRACKETS)}
_CLOSE = {c: lvl for lvl, (_, c) in enumerate(BRACKETS)}
UNPAIRED_CHARS = frozenset(".,:_-~")
_NUCLEOTIDE_CODE = np.full(256, -1, dtype=np.int64)
for _i, _c in enumerate("ACGU"):
    _NUCLEOTIDE_CODE[ord(_c)] = _NUCLEOTIDE_CODE[ord(_c.lower())] = _i
_NUCLEOTIDE_CODE[ord("T")] = _NUCLEOTIDE_CODE[ord("t")] = 3


def nucleotide_codes(seq: str) -> np.ndarray:
    """int64 per letter: 0-3 for A, C, G, U/T (either case), -1 for any other letter."""
    return _NUCLEOTIDE_CODE[np.frombuffer(seq.encode("ascii", "replace"), dtype=np.uint8)]


def to_rna(seq: str) -> str:
    """Upper case, T as U: the form sequences are compared and written in."""
    return seq.upper().replace("T", "U")


class StructureError(ValueError):
    """Malformed structure input; the message names the file/record and the reason."""


@dataclass
class StructureRecord:
    id: str
    sequence: str
    pairs: np.ndarray  # int64 [n, 2], 0-based, i < j

    def __len__(self) -> int:
        return len(self.sequence)


def empty_pairs() -> np.ndarray:
    return np.zeros((0, 2), dtype=np.int64)


def normalize_pairs(pairs: Iterable[tuple[int, int]] | np.ndarray, length: int, where: str = "") -> np.ndarray:
    """Order each pair as (i < j), sort, and check range and one partner per base."""
    arr = np.asarray(list(pairs) if not isinstance(pairs, np.ndarray) else pairs, dtype=np.int64).reshape(-1, 2)
    arr = np.sort(arr, axis=1)
    arr = np.unique(arr, axis=0)
    if len(arr):
        if arr.min() < 0 or arr.max() >= length:
            raise StructureError(f"{where}: pair position out of range 1..{length}")
        if np.any(arr[:, 0] == arr[:, 1]):
            raise StructureError(f"{where}: a base is paired with itself at position {arr[arr[:, 0] == arr[:, 1]][0, 0] + 1}")
        bases, counts = np.unique(arr.ravel(), return_counts=True)
        if np.any(counts > 1):
            raise StructureError(f"{where}: base {bases[counts > 1][0] + 1} has more than one partner")
    return arr


def pairs_to_partner(pairs: np.ndarray, length: int) -> np.ndarray:
    """partner[i] = 0-based partner of i, or -1 when unpaired."""
    partner = np.full(length, -1, dtype=np.int64)
    partner[pairs[:, 0]] = pairs[:, 1]
    partner[pairs[:, 1]] = pairs[:, 0]
    return partner


def pairs_to_matrix(pairs: np.ndarray, length: int) -> np.ndarray:
    """Symmetric float32 [L, L] contact matrix."""
    mat = np.zeros((length, length), dtype=np.float32)
    mat[pairs[:, 0], pairs[:, 1]] = 1.0
    mat[pairs[:, 1], pairs[:, 0]] = 1.0
    return mat


# ---------------------------------------------------------------- dot-bracket
def parse_dot_bracket(db: str, where: str = "") -> np.ndarray:
    """Pairs of a dot-bracket string with any bracket level ((), [], {}, <>, Aa..Zz)."""
    stacks: list[list[int]] = [[] for _ in BRACKETS]
    pairs = []
    for pos, ch in enumerate(db):
        if ch in _OPEN:
            stacks[_OPEN[ch]].append(pos)
        elif ch in _CLOSE:
            stack = stacks[_CLOSE[ch]]
            if not stack:
                raise StructureError(f"{where}: unmatched {ch!r} at position {pos + 1}")
            pairs.append((stack.pop(), pos))
        elif ch not in UNPAIRED_CHARS:
            raise StructureError(f"{where}: invalid dot-bracket character {ch!r} at position {pos + 1}")
    for lvl, stack in enumerate(stacks):
        if stack:
            raise StructureError(f"{where}: unmatched {BRACKETS[lvl][0]!r} at position {stack[-1] + 1}")
    return normalize_pairs(pairs, len(db), where) if pairs else empty_pairs()


def to_dot_bracket(pairs: np.ndarray, length: int) -> str:
    """Dot-bracket with pseudoknots on extra levels: each pair (by 5' end) goes to the first level it does not cross."""
    chars = ["."] * length
    levels: list[list[tuple[int, int]]] = []
    for i, j in sorted(map(tuple, pairs.tolist())):
        for lvl, members in enumerate(levels):
            if not any(a < i < b < j for a, b in members):  # members start before i: pairs go by 5' end
                members.append((i, j))
                break
        else:
            lvl = len(levels)
            if lvl >= len(BRACKETS):
                raise StructureError(f"structure needs more than {len(BRACKETS)} bracket levels")
            levels.append([(i, j)])
        chars[i], chars[j] = BRACKETS[lvl]
    return "".join(chars)


# ---------------------------------------------------------------- bpseq
def read_bpseq(path: str | Path) -> StructureRecord:
    """One structure per bpseq file: lines `index base partner` (1-based, 0 = unpaired); '#' lines skipped."""
    path = Path(path)
    bases, partners = [], []
    with open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#") or line.lower().startswith(("filename", "organism", "accession", "citation")):
                continue
            parts = line.split()
            if len(parts) != 3 or not parts[0].isdigit() or not parts[2].lstrip("-").isdigit():
                raise StructureError(f"{path}:{lineno}: expected 'index base partner', got {line!r}")
            if int(parts[0]) != len(bases) + 1:
                raise StructureError(f"{path}:{lineno}: index {parts[0]} out of order (expected {len(bases) + 1})")
            _check_one_letter(parts[1], f"{path}:{lineno}")
            bases.append(parts[1])
            partners.append(int(parts[2]))
    if not bases:
        raise StructureError(f"{path}: no bases found")
    return _record_from_partners(_stem(path), "".join(bases), partners, str(path))


def write_bpseq(record: StructureRecord, path: str | Path) -> None:
    partner = pairs_to_partner(record.pairs, len(record))
    lines = [f"# {record.id}"] + [f"{i + 1} {b} {p + 1}" for i, (b, p) in enumerate(zip(record.sequence, partner))]
    atomic_write(path, "\n".join(lines) + "\n")


# ---------------------------------------------------------------- ct
def read_ct(path: str | Path) -> list[StructureRecord]:
    """All structures in a ct file: header `N title`, then N lines `i base i-1 i+1 partner i`."""
    path = Path(path)
    records: list[StructureRecord] = []
    with open_text(path) as f:
        lines = [(n, line.split()) for n, line in enumerate(f, 1) if line.strip() and not line.startswith("#")]
    k = 0
    while k < len(lines):
        lineno, head = lines[k]
        if not head[0].isdigit():
            raise StructureError(f"{path}:{lineno}: expected a header 'length title', got {' '.join(head)!r}")
        n, title = int(head[0]), ct_title(head[1:]) or f"{_stem(path)}_{len(records) + 1}"
        if n < 1:
            raise StructureError(f"{path}:{lineno}: record {title!r} declares {n} bases")
        body = lines[k + 1:k + 1 + n]
        if len(body) < n:
            raise StructureError(f"{path}: record {title!r} declares {n} bases but has {len(body)} lines")
        bases, partners = [], []
        for idx, (ln, parts) in enumerate(body, 1):
            if len(parts) < 6 or not parts[0].isdigit() or int(parts[0]) != idx or not parts[4].isdigit():
                raise StructureError(f"{path}:{ln}: record {title!r}: expected 'i base i-1 i+1 partner i' for base {idx}")
            _check_one_letter(parts[1], f"{path}:{ln}: record {title!r}")
            bases.append(parts[1])
            partners.append(int(parts[4]))
        records.append(_record_from_partners(title.split()[0], "".join(bases), partners, f"{path}: record {title!r}"))
        k += 1 + n
    if not records:
        raise StructureError(f"{path}: no structures found")
    return records


def _check_one_letter(base: str, where: str) -> None:
    """A modified base written by name (PSU, m1A: PDB-derived files) would shift every later pair by its extra
    letters."""
    if len(base) != 1:
        raise StructureError(f"{where}: base {base!r} is not one letter: write a modified base as its parent "
                             "nucleotide or N")


COMPRESSED_SUFFIXES = (".gz", ".zst")


def content_suffixes(path: str | Path) -> list[str]:
    """A file's suffixes, lowercase, without those of its compression (x.CT.gz -> ['.ct'])."""
    return [s.lower() for s in Path(path).suffixes if s.lower() not in COMPRESSED_SUFFIXES]


def _stem(path: Path) -> str:
    """The file's name without its compression and structure suffixes (x.bpseq.gz -> x)."""
    while path.suffix.lower() in COMPRESSED_SUFFIXES:
        path = path.with_suffix("")
    return path.stem


def ct_title(words: list[str]) -> str:
    """The title of a ct header after its length, without the free energy that RNAstructure, mfold and
    ViennaRNA's b2ct put first (`ENERGY = -25.3 tRNA`, `dG = -25.3 [initially -26.0] tRNA`)."""
    return re.sub(r"^(energy|dg)\s*=\s*\S+(\s*\[[^]]*\])?\s*", "", " ".join(words), flags=re.IGNORECASE)


def format_ct(record: StructureRecord) -> str:
    n = len(record)
    partner = pairs_to_partner(record.pairs, n)
    lines = [f"{n} {record.id}"]
    lines += [f"{i + 1} {b} {i} {i + 2 if i + 1 < n else 0} {p + 1} {i + 1}"
              for i, (b, p) in enumerate(zip(record.sequence, partner))]
    return "\n".join(lines) + "\n"


def write_ct(records: StructureRecord | Iterable[StructureRecord], path: str | Path) -> None:
    recs = [records] if isinstance(records, StructureRecord) else list(records)
    atomic_write(path, "".join(format_ct(r) for r in recs))


# ---------------------------------------------------------------- dot-bracket text (as predict-ss writes it)
def read_dbn(path: str | Path) -> list[StructureRecord]:
    """Records of three lines each: `>id`, the sequence, its dot-bracket (blank lines and ';' comments skipped)."""
    path = Path(path)
    lines = [(n, line.strip()) for n, line in enumerate(open_text(path), 1)
             if line.strip() and not line.startswith(";")]
    records = []
    for k in range(0, len(lines), 3):
        (lineno, head), body = lines[k], lines[k + 1:k + 3]
        if not head.startswith(">") or len(body) < 2 or any(text.startswith(">") for _, text in body):
            raise StructureError(f"{path}:{lineno}: expected a record of three lines: '>id', the sequence, its "
                                 f"dot-bracket structure")
        rid, (seq_line, seq), (db_line, db) = (head[1:].split() or [""])[0], *body
        where = f"{path}:{db_line} (record {rid!r})"
        check_letters(seq, f"{path}:{seq_line}: record {rid!r}")
        if len(db) != len(seq):
            raise StructureError(f"{where}: structure length {len(db)} != sequence length {len(seq)}")
        records.append(StructureRecord(rid, seq, parse_dot_bracket(db, where)))
    if not records:
        raise StructureError(f"{path}: no structures found")
    return records


STRUCTURE_READERS = {".bpseq": lambda p: [read_bpseq(p)], ".ct": read_ct, ".dbn": read_dbn,
                     ".csv": lambda p: [rec for rec, _ in read_structure_csv(p)]}


def read_structures(path: str | Path) -> list[StructureRecord]:
    """Every structure in a .bpseq, .ct, .dbn or dot-bracket .csv file (gzip/zstd fine: `x.ct.gz`), or in every
    such file of a directory (in name order; its subdirectories are not read)."""
    path = Path(path)
    if not path.exists():
        raise StructureError(f"{path}: no such file or directory")
    if path.is_dir():
        entries = sorted(f for f in path.iterdir() if f.is_file())
        files = [f for f in entries if _structure_suffix(f)]
        if not files:
            raise StructureError(f"{path}: no {', '.join(STRUCTURE_READERS)} files in this directory")
        if skipped := [f.name for f in entries if f not in files]:
            print(f"warning: {path}: {len(skipped)} file(s) not read (not {', '.join(STRUCTURE_READERS)}): "
                  f"{', '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}", file=sys.stderr)
        return [rec for f in files for rec in read_structures(f)]
    suffix = _structure_suffix(path)
    if suffix is None:
        raise StructureError(f"{path}: not a structure file (read: {', '.join(STRUCTURE_READERS)}, compressed "
                             "or not, or a directory of them)")
    return STRUCTURE_READERS[suffix](path)


def _structure_suffix(path: Path) -> str | None:
    suffixes = content_suffixes(path)
    return suffixes[-1] if suffixes and suffixes[-1] in STRUCTURE_READERS else None


# ---------------------------------------------------------------- dot-bracket CSV / FASTA-like text
def read_structure_csv(path: str | Path, id_column: str = "id") -> Iterator[tuple[StructureRecord, dict[str, str]]]:
    """Rows of a (gzip) CSV with `sequence` and `base_pairs` ("i-j;..." 1-based) or `structure` (dot-bracket).

    Yields (record, row) so callers can use the other columns (split, family, ...).
    """
    path = Path(path)
    with open_text(path) as f:
        reader = csv.DictReader(f)
        cols = set(reader.fieldnames or ())
        if "sequence" not in cols or not cols & {"base_pairs", "structure"} or id_column not in cols:
            raise StructureError(f"{path}: needs columns {id_column!r}, 'sequence' and 'base_pairs' or 'structure'; "
                                 f"has {sorted(cols)}")
        for lineno, row in enumerate(reader, 2):
            rid, seq = row[id_column], row["sequence"]
            where = f"{path}:{lineno} (record {rid!r})"
            if not seq:
                raise StructureError(f"{where}: empty sequence")
            check_letters(seq, where)
            listed, db = (row.get("base_pairs") or "").strip(), row.get("structure") or ""
            pairs = parse_pair_list(listed, len(seq), where)  # a blank cell: none
            if db or "base_pairs" not in cols:  # a blank base_pairs cell: the structure's
                if len(db) != len(seq):
                    raise StructureError(f"{where}: structure length {len(db)} != sequence length {len(seq)}")
                from_db = parse_dot_bracket(db, where)
                if listed and not np.array_equal(from_db, pairs):
                    raise StructureError(f"{where}: its base_pairs and its structure disagree")
                pairs = from_db
            yield StructureRecord(rid, seq, pairs), row


def parse_pair_list(text: str, length: int, where: str = "") -> np.ndarray:
    """`"4-20;5-19"` (1-based) -> pairs."""
    text = text.strip()
    if not text:
        return empty_pairs()
    try:
        pairs = [tuple(int(x) - 1 for x in item.split("-")) for item in text.split(";") if item]
    except ValueError as e:
        raise StructureError(f"{where}: bad base_pairs entry ({e})") from e
    if any(len(p) != 2 for p in pairs):
        raise StructureError(f"{where}: base_pairs entries must look like 'i-j'")
    return normalize_pairs(pairs, length, where)


@dataclass
class FastaRecord:
    id: str           # first word of the header
    sequence: str
    description: str  # rest of the header (e.g. "family=tRNA len=76")


def header_label(path: str | Path, record: FastaRecord, key: str) -> str | None:
    """The value of `key=value` in the record's header, or None (`key=` labels nothing). Different values of the key
    in one header are an error, as dataprep rejects such a record."""
    values = dict.fromkeys(re.findall(rf"(?:^|\s){re.escape(key)}=(\S+)", record.description))
    if len(values) > 1:
        raise StructureError(f"{path}: record {record.id!r} gives {key}= twice: {' and '.join(map(repr, values))}")
    return next(iter(values), None)


def read_fasta(path: str | Path) -> list[FastaRecord]:
    """Records of a FASTA (plain, gzip or zstd; '-' for standard input). Errors name the file, line, record and
    reason (empty, duplicate id, bad letters, a header indented by whitespace, as in dataprep)."""
    path = Path(path)
    records: list[FastaRecord] = []
    seen: set[str] = set()
    rid, desc, chunks, start = None, "", [], 0
    for lineno, raw in enumerate(open_text(path), 1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        if line.startswith(">"):
            if not raw.startswith(">"):
                shown = raw.rstrip("\r\n")[:40]
                raise StructureError(f"{path}:{lineno}: {INDENTED_HEADER}: {shown!r}")
            if rid is not None:
                records.append(_fasta_record(path, rid, desc, chunks, start))
            words = line[1:].split(maxsplit=1)
            rid, desc = (words[0], words[1] if len(words) > 1 else "") if words else ("", "")
            if not rid:
                raise StructureError(f"{path}:{lineno}: empty FASTA header")
            if rid in seen:
                raise StructureError(f"{path}:{lineno}: duplicate record id {rid!r}")
            seen.add(rid)
            chunks, start = [], lineno
        elif rid is None:
            raise StructureError(f"{path}:{lineno}: sequence data before the first '>' header (not FASTA?)")
        else:
            check_letters(line, f"{path}:{lineno}: record {rid!r}")
            chunks.append(line)
    if rid is not None:
        records.append(_fasta_record(path, rid, desc, chunks, start))
    if not records:
        raise StructureError(f"{path}: no FASTA records found")
    return records


# Letters of the RiNALMo alphabet (any case; U and T alike). Other letters (X, P, modified bases) are read as
# <unk> and reported by `warn_unknown_letters`; anything that is not a letter or '-' is an error.
ALPHABET = frozenset("ACGUTIRYKMSWBDHVN-acgutirykmswbdhvn")
_LETTERS = frozenset(string.ascii_letters + "-")


def check_letters(seq: str, where: str) -> None:
    if bad := set(seq) - _LETTERS:
        raise StructureError(f"{where} has invalid characters {''.join(sorted(bad))!r} "
                             "(a sequence holds letters and '-' only)")


def _fasta_record(path: Path, rid: str, desc: str, chunks: list[str], lineno: int) -> FastaRecord:
    seq = "".join(chunks)
    if not seq:
        raise StructureError(f"{path}:{lineno}: record {rid!r} has an empty sequence")
    return FastaRecord(rid, seq, desc)


def warn_unknown_letters(records: list[FastaRecord], path: str | Path, structures: bool = False) -> int:
    """Print one warning naming how many records hold letters outside the alphabet (read as <unk>; `structures`:
    and never paired)."""
    odd = [(r.id, sorted(set(r.sequence) - ALPHABET)) for r in records if not set(r.sequence) <= ALPHABET]
    if odd:
        letters = sorted({c for _, cs in odd for c in cs})
        print(f"warning: {path}: {len(odd)} record(s) contain letters outside the RiNALMo alphabet "
              f"({''.join(letters)}), read as <unk>{' and never paired' if structures else ''}; first: {odd[0][0]!r}",
              file=sys.stderr)
    return len(odd)


# ---------------------------------------------------------------- helpers
def _record_from_partners(rid: str, seq: str, partners: list[int], where: str) -> StructureRecord:
    n = len(seq)
    pairs = []
    for i, p in enumerate(partners, 1):
        if p < 0 or p > n:
            raise StructureError(f"{where}: base {i} has partner {p} outside 0..{n}")
        if p == i:
            raise StructureError(f"{where}: base {i} pairs with itself")
        if p and partners[p - 1] != i:
            raise StructureError(f"{where}: base {i} pairs with {p} but base {p} pairs with {partners[p - 1]}")
        if p > i:
            pairs.append((i - 1, p - 1))
    return StructureRecord(rid, seq, normalize_pairs(pairs, n, where) if pairs else empty_pairs())


def open_text(path: Path) -> io.StringIO:
    """The whole text of a plain, gzip or zstd file (told by the magic bytes, as dataprep reads FASTA), or of
    standard input for '-'. Errors name the file."""
    try:
        with nullcontext(sys.stdin.buffer) if str(path) == "-" else open(path, "rb") as raw:
            _, reader = decompressed(raw, raw.read(4))
            data = b"".join(iter(lambda: reader.read(1 << 20), b""))
        # utf-8-sig: a byte-order mark (some Windows editors write one) is not data
        return io.StringIO(data.decode("utf-8-sig"))
    except FileNotFoundError:
        raise StructureError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise StructureError(f"{path}: not a text file ({e.reason})") from None
    except (OSError, EOFError, zlib.error, zstandard.ZstdError) as e:  # a directory, damaged or truncated data
        raise StructureError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})") from None
