"""Reading FASTA inputs (plain, gzip, zstd, stdin) as large byte chunks cut at record boundaries.

Compression is detected from the magic bytes, not the file name. Every chunk starts at a '>' header line
(except possibly the first, which the parser checks) and ends just before one, so records never straddle
chunks. A record larger than `max_record_bytes` is not held in memory: it is streamed past and reported
as an oversized record (its header and length), which the parser turns into a reject line. A plain file is
memory-mapped: its chunks are views of the page cache, not copies.
"""
from __future__ import annotations

import codecs
import gzip
import hashlib
import mmap
import os
import stat
import sys
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import zstandard

from .errors import InputError

GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_WS = b" \t\r\n\v\f"


def _compression(head: bytes) -> str:
    """"gzip", "zstd" or "none" from a file's first 4 bytes."""
    skippable = len(head) == 4 and int.from_bytes(head, "little") & 0xFFFFFFF0 == 0x184D2A50  # pzstd starts so
    return "gzip" if head.startswith(GZIP_MAGIC) else "zstd" if head == ZSTD_MAGIC or skippable else "none"


class _Hasher:
    """sha256 (when asked) and byte count of the raw input, the checksum in the manifest.

    The hash is updated on a helper thread (hashlib releases the GIL), so it overlaps with parsing."""

    def __init__(self, checksum: bool = True):
        self.bytes = 0
        self._sha = hashlib.sha256() if checksum else None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="sha256") if checksum else None

    def update(self, data: bytes | memoryview) -> None:
        if self._pool is not None and len(data):
            self._pool.submit(self._sha.update, data)  # one worker thread: updates stay in order
        self.bytes += len(data)

    def hexdigest(self) -> str:
        if self._pool is None:
            return ""
        self._pool.shutdown(wait=True)
        return self._sha.hexdigest()


class _HashingReader(_Hasher):
    """Raw byte reader that hashes what it reads."""

    def __init__(self, f, checksum: bool = True):
        super().__init__(checksum)
        self._f = f

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.update(data)
        return data


def decompressed(raw, head: bytes):
    """(compression, reader) for a byte reader whose first bytes `head` were read already: gzip, zstd or plain,
    told by the magic bytes. `reader.read(n)` raises EOFError on a truncated stream."""
    compression = _compression(head)
    if compression == "gzip":
        return compression, gzip.GzipFile(fileobj=_Prefixed(raw, head), mode="rb")
    if compression == "zstd":
        return compression, _ZstdReader(raw, head)
    return compression, _Prefixed(raw, head)


class _ZstdReader:
    """Multi-frame zstd stream that raises on truncation (zstandard's stream_reader returns short data)."""

    def __init__(self, raw, head: bytes):
        self._raw, self._buf, self._obj = raw, head, zstandard.ZstdDecompressor().decompressobj()

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            data = self._buf or self._raw.read(1 << 20)
            self._buf = b""
            if not data:
                if not self._obj.eof:
                    raise EOFError("zstd stream ended before the end of its frame (truncated file)")
                break
            if self._obj.eof:  # next frame
                self._obj = zstandard.ZstdDecompressor().decompressobj()
            out += self._obj.decompress(data)
            if self._obj.eof and self._obj.unused_data:
                self._buf = self._obj.unused_data
        return bytes(out)


class _Prefixed:
    """A reader that first returns `head` (the sniffed magic bytes), then the rest of `raw`."""

    def __init__(self, raw, head: bytes):
        self._raw, self._head = raw, head

    def read(self, n: int = -1) -> bytes:
        if not self._head:
            return self._raw.read(n)
        if 0 <= n <= len(self._head):
            out, self._head = self._head[:n], self._head[n:]
            return out
        head, self._head = self._head, b""
        return head + self._raw.read(n - len(head) if n > 0 else -1)


@dataclass
class Chunk:
    data: bytes | memoryview  # whole records (or, for the first chunk, whatever precedes the first header too)
    first_line: int  # 1-based line number of data[0]
    oversized: tuple[bytes, int] | None = None  # (header line, sequence length) of a streamed-past record
    newlines: int | None = None  # a consumer that counted the newlines in `data` sets this; the stream then
    # does not count them again to number the next chunk's lines


# A line whose first non-blank character is '>' but that does not start with '>' is an error naming the file and
# line, wherever it stands, in both FASTA readers (this package's and finetune.structure.read_fasta): as a header
# it would start a record that other readers do not see, as sequence it would fold that record into the one before.
INDENTED_HEADER = "header indented by whitespace (a header line must start with '>')"


def text_before_header(data: bytes | memoryview) -> tuple[int, str] | None:
    """(lines into `data`, reason with the raw line) for text that stands before its first header line, outside
    any record (a header indented by whitespace, a sequence without a header): None when only white space does."""
    if data[:1] == b">":
        return None
    data = bytes(data)
    first = data.find(b"\n>")
    head = data[:first + 1] if first >= 0 else data
    text = head.lstrip(_WS)
    if not text:
        return None
    start = head.rfind(b"\n", 0, len(head) - len(text)) + 1  # the start of the text's line, indentation kept
    line = head[start:].split(b"\n", 1)[0][:40]
    reason = INDENTED_HEADER if text[:1] == b">" else ("text outside any record (a record starts with a line whose "
                                                        "first character is '>')")
    return head.count(b"\n", 0, start), f"{reason}: {line!r}"


def regular_file(path: str) -> bool:
    """Whether `path` can be re-read, memory-mapped and cut into byte ranges: False for stdin ("-"), a named pipe
    or a process substitution (/dev/fd/N), which can only be read once, as a stream."""
    if path == "-":
        return False
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError as e:
        raise InputError(f"{path}: cannot read input ({e.strerror})") from None


def split_points(path: str, n: int, probe: int = 1 << 20) -> list[int] | None:
    """n + 1 byte offsets cutting a plain FASTA file into n ranges that each start at a header line, so that n
    readers can each parse one range without reading the others; None for streams and compressed files."""
    if not regular_file(path):
        return None
    try:
        with open(path, "rb") as f:
            if _compression(f.read(4)) != "none":
                return None
            size = f.seek(0, 2)
            cuts = [0]
            for r in range(1, n):
                at = max(size * r // n - 1, cuts[-1])
                f.seek(at)
                while True:  # the first "\n>" at or after `at`: the next header (a huge record is scanned past)
                    block = f.read(probe + 1)
                    hit = block.find(b"\n>")
                    if hit >= 0 or len(block) <= 1:
                        at = at + hit + 1 if hit >= 0 else size
                        break
                    at += len(block) - 1
                    f.seek(at)
                cuts.append(at)
    except OSError as e:
        raise InputError(f"{path}: cannot read input ({e.strerror})") from None
    return cuts + [size]


class FastaStream:
    """Iterate a FASTA input as `Chunk`s; `.sha256` / `.bytes` describe the raw (compressed) input once done,
    `.newlines` the line breaks read. With `byte_range` (plain files only, see `split_points`) only that part of
    the file is read; its line numbers then count from the start of the range."""

    def __init__(self, path: str, chunk_bytes: int = 16 << 20, max_record_bytes: int = 64 << 20,
                 checksum: bool = True, byte_range: tuple[int, int] | None = None):
        self.path, self.chunk_bytes, self.max_record_bytes = path, chunk_bytes, max_record_bytes
        self.checksum, self.byte_range = checksum, byte_range
        self.compression = "none"
        self.newlines = 0
        self._raw: _Hasher | None = None
        self._file = None

    @property
    def sha256(self) -> str:
        return self._raw.hexdigest() if self._raw else ""

    @property
    def bytes(self) -> int:
        return self._raw.bytes if self._raw else 0

    def _open(self):
        """The stream to read, or None for a plain file (then iterated memory-mapped)."""
        if self.path == "-":
            f = sys.stdin.buffer
        else:
            try:
                f = open(self.path, "rb")
            except OSError as e:
                raise InputError(f"{self.path}: cannot open input ({e.strerror})") from None
        self._file = f
        if f is not sys.stdin.buffer and stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            plain = _compression(f.read(4)) == "none"
            f.seek(0)
            if plain:
                return None
        if self.byte_range is not None:  # a compressed file or a stream cannot be cut into byte ranges
            raise ValueError(f"{self.path}: byte_range needs a plain file")
        self._raw = _HashingReader(f, self.checksum)
        self.compression, stream = decompressed(self._raw, self._raw.read(4))
        return stream

    def _read(self, stream, n: int) -> bytes:
        try:
            return stream.read(n)
        except EOFError as e:
            raise InputError(f"{self.path}: truncated {self.compression} input after {self.bytes} bytes "
                             f"({e})") from None
        except (OSError, zlib.error, zstandard.ZstdError) as e:
            raise InputError(f"{self.path}: corrupt {self.compression} input after {self.bytes} bytes ({e})") from None

    def __iter__(self) -> Iterator[Chunk]:
        try:
            stream = self._open()
            yield from self._chunks(stream) if stream is not None else self._mapped_chunks()
        finally:
            if self._file not in (None, sys.stdin.buffer):
                self._file.close()

    def _check_start(self, first: bytes) -> None:
        if first.startswith(codecs.BOM_UTF8):
            raise InputError(f"{self.path}:1: starts with a UTF-8 byte-order mark (bytes EF BB BF, written by some "
                             "Windows editors) before its first '>': remove it, e.g. sed -i '1s/^\\xEF\\xBB\\xBF//' FILE")
        if b"\r" in first and b"\n" not in first:
            raise InputError(f"{self.path}: its lines end in a carriage return alone (classic Mac OS line endings), so "
                             "the whole file would read as one line: convert them, e.g. tr '\\r' '\\n' < FILE > NEW")
        lead = first.lstrip(_WS)[:1]
        if lead and lead != b">":
            raise InputError(f"{self.path}:1: does not start with a '>' header (not FASTA, or binary data?): "
                             f"first bytes {first[:16]!r}")

    def _mapped_chunks(self) -> Iterator[Chunk]:
        """A plain file's chunks as views of its memory map (no copies; the sha256 is taken from the map too)."""
        size = os.fstat(self._file.fileno()).st_size
        start, end = self.byte_range or (0, size)
        self._raw = _Hasher(self.checksum)
        if end <= start:
            return
        mm = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
        view = memoryview(mm)
        self._check_start(bytes(view[start: start + self.chunk_bytes]))
        pos = start
        while pos < end:
            cut, single = min(pos + self.chunk_bytes, end), False
            if cut < end:
                hit = mm.rfind(b"\n>", pos, cut + 1)  # the last header starting inside the window
                if hit < pos:  # none: one record longer than a chunk
                    hit, single = mm.find(b"\n>", cut, end), True
                cut = hit + 1 if hit >= 0 else end
            piece = view[pos: cut]
            self._raw.update(piece)
            if single and cut - pos > self.max_record_bytes and piece[:1] == b">":
                header, seq_len, lines = _tally((bytes(piece[a: a + self.chunk_bytes])
                                                 for a in range(0, len(piece), self.chunk_bytes)))
                yield Chunk(b"", self.newlines + 1, oversized=(header, seq_len))
                self.newlines += lines
            else:
                yield from self._counted(Chunk(piece, self.newlines + 1), piece, len(piece))
            pos = cut

    def _chunks(self, stream) -> Iterator[Chunk]:
        carry = b""
        data = self._read(stream, self.chunk_bytes)
        self._check_start(data)
        while True:
            buf = carry + data if carry else data
            if not data:  # end of input
                if buf:
                    yield from self._counted(Chunk(buf, self.newlines + 1), buf, len(buf))
                return
            cut = buf.rfind(b"\n>")
            if cut >= 0:
                carry = buf[cut + 1:]
                yield from self._counted(Chunk(memoryview(buf)[: cut + 1], self.newlines + 1), buf, cut + 1)
            elif len(buf) > self.max_record_bytes and buf.startswith(b">"):
                header, seq_len, lines, carry = self._stream_past(stream, buf)
                yield Chunk(b"", self.newlines + 1, oversized=(header, seq_len))
                self.newlines += lines
            else:
                carry = buf
            data = self._read(stream, self.chunk_bytes)

    def _counted(self, chunk: Chunk, buf: bytes | memoryview, end: int) -> Iterator[Chunk]:
        """Yield `chunk` (= buf[:end], no copy), then count its line breaks unless the consumer did."""
        yield chunk
        if chunk.newlines is None:
            chunk.newlines = (buf if isinstance(buf, bytes) else bytes(buf)).count(b"\n", 0, end)
        self.newlines += chunk.newlines

    def _stream_past(self, stream, buf: bytes) -> tuple[bytes, int, int, bytes]:
        """Read past one oversized record without keeping it: (header line, sequence length, lines, rest)."""
        rest = b""

        def pieces() -> Iterator[bytes]:  # buf, then what follows up to the next header line
            nonlocal rest
            data, last = buf, b""
            while data:
                if last == b"\n" and data[:1] == b">":  # the record ended with the previous piece
                    rest = data
                    return
                cut = data.find(b"\n>")
                if cut >= 0:
                    rest = data[cut + 1:]
                    yield data[: cut + 1]
                    return
                yield data
                last, data = data[-1:], self._read(stream, self.chunk_bytes)

        header, seq_len, lines = _tally(pieces())
        return header, seq_len, lines, rest


def _tally(pieces: Iterator[bytes]) -> tuple[bytes, int, int]:
    """(header line, sequence length without whitespace, line breaks) of one record given in pieces."""
    header, seq_len, lines, in_header = b"", 0, 0, True
    for body in pieces:
        if in_header:
            nl = body.find(b"\n")
            header += body if nl < 0 else body[:nl]
            if nl < 0:
                continue
            in_header, lines, body = False, 1, body[nl + 1:]
        seq_len += len(body) - sum(body.count(bytes([c])) for c in _WS)
        lines += body.count(b"\n")
    return header, seq_len, lines
