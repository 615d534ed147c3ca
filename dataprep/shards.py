"""Shard format: WebDataset tars whose members are zstd-compressed blocks of many records.

This module writes shards and reads them for checks and tests; the pretraining loader reads the tars itself
(pretrain.data.stream, seeking over the members before its range) and decodes blocks with `decode_block`. It is
torch-free.

A tar member `{block:06d}.rec.zst` holds one zstd frame (with content checksum; the header below is its first
zstd block alone, so `block_length` decompresses 40 bytes) whose content is:

    header  <4sIQQQQ  magic b"RNB1", flags (bit 0: has labels), n, seq_bytes, ids_bytes, labels_bytes
    int64   offsets[n+1]         record i is seq[offsets[i]:offsets[i+1]]
    int64   cluster_id[n], cluster_size[n], index_in_cluster[n]
    int32   source[n]
    bytes   ids      "id\\n" per record (UTF-8; an id ends at its header's first ASCII space or control byte;
                     Unicode spaces such as U+00A0 stay in it)
    bytes   labels   "label\\n" per record (UTF-8, may be empty), only when flags & 1
    bytes   seq      normalised sequences concatenated (upper-case ASCII, U not T)

Decoding is a handful of `np.frombuffer` views plus one `str.split` per block: no per-record Python.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import struct
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
import zstandard

from rnalm.files import atomic_write

BLOCK_EXT = "rec.zst"
MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_MAGIC = b"RNB1"
_HEADER = struct.Struct("<4sIQQQQ")
_FLAG_LABELS = 1
_MEMBER_RE = re.compile(r"^(\d{6})\.rec\.zst$")
# Level 2 over 3: on the ncRNA corpus's records 20 % faster for 2 % more bytes (3.29x vs 3.36x), on the synthetic
# corpus faster and smaller (BENCHMARKS.md, Dataprep).
ZSTD_LEVEL = 2
_MAX_BLOCK_BYTES = 1 << 31  # refuse to decompress a (corrupt) frame that claims more than 2 GiB
_ZSTD_FRAME_HEADER_MAX = 18  # bytes: magic, descriptor, window, dictionary id, content size (RFC 8878)


class ShardError(Exception):
    """A corrupt, truncated or unexpected shard; the message names the shard file (and member) and the reason."""


@dataclass(frozen=True)
class RecordBlock:
    seq: np.ndarray  # uint8, all normalised sequences concatenated
    offsets: np.ndarray  # int64 [n+1]
    ids: list[str]
    cluster_id: np.ndarray  # int64 [n]
    cluster_size: np.ndarray  # int64 [n]
    index_in_cluster: np.ndarray  # int64 [n]
    source: np.ndarray  # int32 [n]
    labels: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> bytes:
        return self.seq[self.offsets[i]: self.offsets[i + 1]].tobytes()

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def encode_block(block: RecordBlock) -> bytes:
    """Serialise a block (uncompressed); `compress_block` adds the zstd frame."""
    if len(block.ids) != len(block) or (block.labels is not None and len(block.labels) != len(block)):
        raise ValueError("ids/labels length does not match the number of records")
    ids = "".join(i + "\n" for i in block.ids).encode("utf-8")
    labels = None if block.labels is None else "".join(x + "\n" for x in block.labels).encode("utf-8")
    return encode_columns(block.seq, block.offsets, ids, labels, block.cluster_id, block.cluster_size,
                          block.index_in_cluster, block.source)


def encode_columns(seq, offsets: np.ndarray, ids: bytes, labels: bytes | None, cluster_id: np.ndarray,
                   cluster_size: np.ndarray, index_in_cluster: np.ndarray, source: np.ndarray) -> bytes:
    """`encode_block` from the raw columns: `seq` (bytes or uint8 array), "id\\n" per record as one UTF-8 blob,
    likewise the labels (None: no labels). The shard writer passes store bytes straight through."""
    n = len(offsets) - 1
    seq = seq if isinstance(seq, bytes) else np.ascontiguousarray(seq, dtype=np.uint8).tobytes()
    header = _HEADER.pack(_MAGIC, _FLAG_LABELS if labels is not None else 0,
                          n, len(seq), len(ids), len(labels or b""))
    parts = [header,
             np.ascontiguousarray(offsets, dtype="<i8").tobytes(),
             np.ascontiguousarray(cluster_id, dtype="<i8").tobytes(),
             np.ascontiguousarray(cluster_size, dtype="<i8").tobytes(),
             np.ascontiguousarray(index_in_cluster, dtype="<i8").tobytes(),
             np.ascontiguousarray(source, dtype="<i4").tobytes(),
             ids, labels or b"", seq]
    return b"".join(parts)


def compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def compress_block(block: RecordBlock, level: int = ZSTD_LEVEL) -> bytes:
    return compress_encoded(compressor(level), encode_block(block))


def compress_encoded(cctx: zstandard.ZstdCompressor, raw: bytes) -> bytes:
    """One zstd frame of an encoded block whose first zstd block holds the block's header alone: a reader counts
    the block's records from the member's first bytes (`block_length`) instead of its first ~100 KB."""
    cobj = cctx.compressobj(size=len(raw))
    return b"".join((cobj.compress(raw[:_HEADER.size]), cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK),
                     cobj.compress(raw[_HEADER.size:]), cobj.flush()))


def _decompress(payload: bytes, where: str) -> bytes:
    try:
        params = zstandard.get_frame_parameters(payload)
        if params.content_size > _MAX_BLOCK_BYTES:
            raise ShardError(f"{where}: block claims {params.content_size} bytes (corrupt header)")
        return zstandard.ZstdDecompressor().decompress(payload)
    except zstandard.ZstdError as e:
        raise ShardError(f"{where}: corrupt or truncated zstd block ({e})") from None


def block_length(payload: bytes | BinaryIO, where: str = "") -> int:
    """The record count of one tar member (its bytes, or a seekable file to read them from), from its header
    alone: only the first bytes are read and decompressed, so a reader skips the blocks before the records it
    wants. The frame's checksum covers the whole block, which is not read: the header's sizes must add up to the
    frame's content size instead (a flipped bit in the count would shift every later record of the shard)."""
    where = where or "<block>"
    try:
        if isinstance(payload, bytes):
            start = payload[:_ZSTD_FRAME_HEADER_MAX]
        else:
            at = payload.tell()
            start = payload.read(_ZSTD_FRAME_HEADER_MAX)
            payload.seek(at)
        frame_bytes = zstandard.get_frame_parameters(start).content_size
        with zstandard.ZstdDecompressor().stream_reader(payload, read_size=512, closefd=False) as reader:
            head = b""
            while len(head) < _HEADER.size and (chunk := reader.read(_HEADER.size - len(head))):
                head += chunk
    except zstandard.ZstdError as e:
        raise ShardError(f"{where}: corrupt or truncated zstd block ({e})") from None
    if len(head) < _HEADER.size or head[:4] != _MAGIC:
        raise ShardError(f"{where}: no dataprep record block header")
    _, _, n, seq_bytes, ids_bytes, labels_bytes = _HEADER.unpack_from(head)
    if _block_bytes(n, seq_bytes, ids_bytes, labels_bytes) != frame_bytes:
        size = "unknown size" if frame_bytes == zstandard.CONTENTSIZE_UNKNOWN else f"{frame_bytes} bytes"
        raise ShardError(f"{where}: block header ({n} records) does not match the frame's {size} (corrupt header)")
    return n


def _block_bytes(n: int, seq_bytes: int, ids_bytes: int, labels_bytes: int) -> int:
    """An encoded block's size from its header: header, offsets, 3 int64 and 1 int32 per record, then bytes."""
    return _HEADER.size + 8 * (n + 1) + 3 * 8 * n + 4 * n + ids_bytes + labels_bytes + seq_bytes


def decode_block(payload: bytes, where: str = "") -> RecordBlock:
    """Decompress and decode one tar member; raises ShardError naming `where` on any inconsistency."""
    where = where or "<block>"
    raw = _decompress(payload, where)
    if len(raw) < _HEADER.size:
        raise ShardError(f"{where}: block shorter than its header ({len(raw)} bytes)")
    magic, flags, n, seq_bytes, ids_bytes, labels_bytes = _HEADER.unpack_from(raw, 0)
    if magic != _MAGIC:
        raise ShardError(f"{where}: bad block magic {magic!r} (not a dataprep record block)")
    need = _block_bytes(n, seq_bytes, ids_bytes, labels_bytes)
    if need != len(raw):
        raise ShardError(f"{where}: block size {len(raw)} does not match its header (expected {need})")
    pos = _HEADER.size

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal pos
        arr = np.frombuffer(raw, dtype=dtype, count=count, offset=pos)
        pos += arr.nbytes
        return arr

    offsets = take("<i8", n + 1)
    cluster_id, cluster_size, index_in_cluster = take("<i8", n), take("<i8", n), take("<i8", n)
    source = take("<i4", n)
    ids = _split_lines(raw[pos: pos + ids_bytes], n, where, "ids")
    pos += ids_bytes
    labels = _split_lines(raw[pos: pos + labels_bytes], n, where, "labels") if flags & _FLAG_LABELS else None
    pos += labels_bytes
    seq = np.frombuffer(raw, dtype=np.uint8, count=seq_bytes, offset=pos)
    if n and (offsets[0] != 0 or offsets[-1] != seq_bytes or np.any(np.diff(offsets) < 0)):
        raise ShardError(f"{where}: record offsets are not monotonic from 0 to {seq_bytes}")
    if n and (np.any(index_in_cluster < 0) or np.any(index_in_cluster >= cluster_size)):  # (so cluster_size >= 1)
        raise ShardError(f"{where}: index_in_cluster outside 0..cluster_size-1")
    return RecordBlock(seq=seq, offsets=offsets, ids=ids, cluster_id=cluster_id, cluster_size=cluster_size,
                       index_in_cluster=index_in_cluster, source=source, labels=labels)


def _split_lines(buf: bytes, n: int, where: str, what: str) -> list[str]:
    try:
        items = buf.decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ShardError(f"{where}: {what} are not valid UTF-8 ({e})") from None
    if items[-1] != "" or len(items) != n + 1:
        raise ShardError(f"{where}: expected {n} {what}, found {len(items) - 1}")
    items.pop()
    return items


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def iter_blocks(shard_path: str | os.PathLike, verify_checksum: bool = False,
                expected_sha256: str | None = None) -> Iterator[RecordBlock]:
    """Yield the record blocks of one shard in order.

    With `verify_checksum`, the file's sha256 is checked first against `expected_sha256`, or, when that is None,
    against the manifest.json two levels up (OUT/manifest.json for OUT/<split>/shard-*.tar). Every block is
    also protected by its zstd content checksum, so corruption is reported even without the file checksum.
    """
    shard_path = Path(shard_path)
    if verify_checksum:
        expected = expected_sha256 or _manifest_sha256(shard_path)
        actual = file_sha256(shard_path)
        if actual != expected:
            raise ShardError(f"{shard_path}: sha256 {actual} does not match the expected {expected}")
    try:
        with tarfile.open(shard_path, mode="r|") as tar:
            expected_block = 0
            for member in tar:
                where = f"{shard_path}:{member.name}"
                m = _MEMBER_RE.match(member.name)
                if not member.isfile() or m is None:
                    raise ShardError(f"{where}: unexpected tar member (want NNNNNN.{BLOCK_EXT})")
                if int(m.group(1)) != expected_block:
                    raise ShardError(f"{where}: block {int(m.group(1))} out of order (expected {expected_block})")
                yield decode_block(tar.extractfile(member).read(), where)  # (tarfile raises on a cut member)
                expected_block += 1
            _check_tar_end(shard_path, tar.offset, expected_block)
    except ShardError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardError(f"{shard_path}: corrupt or truncated tar ({type(e).__name__}: {e})") from None


def _check_tar_end(path: Path, offset: int, blocks: int) -> None:
    """tarfile's stream mode ends quietly at a damaged member header, or at a cut between members: a whole shard
    has the tar end marker (two zero blocks) right after its last member."""
    with open(path, "rb") as f:
        f.seek(offset)
        end = f.read(2 * tarfile.BLOCKSIZE)
    if len(end) < 2 * tarfile.BLOCKSIZE or any(end):
        raise ShardError(f"{path}: truncated, or a damaged tar header, after {blocks} whole block(s)")


def iter_records(shard_path: str | os.PathLike) -> Iterator[tuple[str, bytes, int, int, int]]:
    """(id, sequence, cluster_id, cluster_size, index_in_cluster) per record; convenience for tests."""
    for block in iter_blocks(shard_path):
        for i in range(len(block)):
            yield (block.ids[i], block.sequence(i), int(block.cluster_id[i]), int(block.cluster_size[i]),
                   int(block.index_in_cluster[i]))


# ---------------------------------------------------------------------------------------------- writing
class _HashingFile:
    """A file opened for writing that keeps the sha256 and size of what was written (no re-read at the end)."""

    def __init__(self, path: Path):
        self._f, self.sha256, self.bytes = open(path, "wb"), hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def tell(self) -> int:
        return self.bytes

    def sync_and_close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def close(self) -> None:
        self._f.close()


class ShardWriter:
    """Writes one shard tar atomically: to `path.tmp-<pid>`, renamed over `path` by `close()`."""

    def __init__(self, path: str | os.PathLike, level: int = ZSTD_LEVEL):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self._file = _HashingFile(self._tmp)
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._cctx = compressor(level)
        self.blocks = self.records = self.tokens = 0

    def write(self, block: RecordBlock) -> None:
        self.write_payload(compress_encoded(self._cctx, encode_block(block)), len(block), int(block.offsets[-1]))

    def write_payload(self, payload: bytes, records: int, tokens: int) -> None:
        """Append an already compressed block (one zstd frame of `encode_block`, as the writer's threads make)."""
        info = tarfile.TarInfo(f"{self.blocks:06d}.{BLOCK_EXT}")
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        self._tar.addfile(info, io.BytesIO(payload))
        self.blocks += 1
        self.records += records
        self.tokens += tokens

    def close(self) -> tuple[int, str]:
        """Finish the tar, fsync, rename into place; returns (bytes, sha256)."""
        self._tar.close()
        self._file.sync_and_close()
        os.replace(self._tmp, self.path)
        return self._file.bytes, self._file.sha256.hexdigest()

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------- manifest
@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the output dir
    split: str  # "train" / "valid"
    records: int
    blocks: int
    tokens: int  # nucleotides
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    shards: list[ShardInfo]
    sources: list[dict]  # per input: path, sha256, bytes, records, rejected, duplicates, kept
    params: dict
    tools: dict
    counts: dict = field(default_factory=dict)  # records_in, rejected, duplicates, kept, clusters, per split
    warnings: list[str] = field(default_factory=list)  # what the build printed as warnings (e.g. empty valid split)
    version: int = FORMAT_VERSION
    out_dir: str = ""  # where it was read from (not stored)

    def split_shards(self, split: str) -> list[ShardInfo]:
        return [s for s in self.shards if s.split == split]

    def shard_path(self, shard: ShardInfo) -> Path:
        return Path(self.out_dir) / shard.path

    def to_json(self) -> str:
        d = asdict(self)
        d.pop("out_dir")
        return json.dumps(d, indent=1)


def read_manifest(out_dir: str | os.PathLike) -> Manifest:
    path = Path(out_dir) / MANIFEST_NAME
    try:
        d = json.loads(path.read_text())
        shards = [ShardInfo(**s) for s in d.pop("shards")]
        if d.get("version") != FORMAT_VERSION:
            raise ShardError(f"{path}: unsupported manifest version {d.get('version')} (want {FORMAT_VERSION})")
        return Manifest(shards=shards, out_dir=str(out_dir), **d)
    except (FileNotFoundError, NotADirectoryError):
        raise ShardError(_no_manifest(Path(out_dir))) from None
    except (json.JSONDecodeError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise ShardError(f"{path}: malformed manifest ({type(e).__name__}: {e})") from None


def shard_set_digest(out_dir: str | os.PathLike) -> str:
    """The identity of a shard set: the SHA-256 of its manifest, which lists every shard with its own SHA-256."""
    return hashlib.sha256((Path(out_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def _no_manifest(out_dir: Path) -> str:
    """Why `out_dir` has no manifest, with the likely mix-up: a file or a folder inside the build's output."""
    if out_dir.is_file():
        return (f"{out_dir} is a file, not the output folder of dataprep/build_shards.py (the folder that holds "
                f"{MANIFEST_NAME})" + (f": give {out_dir.parent}" if out_dir.name == MANIFEST_NAME else ""))
    if (out_dir.parent / MANIFEST_NAME).is_file():
        return f"{out_dir / MANIFEST_NAME}: no manifest; give the build's output folder {out_dir.parent}"
    if not out_dir.exists():
        return f"{out_dir}: no such folder (the output folder of dataprep/build_shards.py)"
    return f"{out_dir / MANIFEST_NAME}: no manifest (was build_shards interrupted or never run?)"


def write_manifest(out_dir: str | os.PathLike, manifest: Manifest) -> None:
    atomic_write(Path(out_dir) / MANIFEST_NAME, manifest.to_json(), durable=True)


def _manifest_sha256(shard_path: Path) -> str:
    out_dir = shard_path.resolve().parent.parent
    manifest = read_manifest(out_dir)
    rel = str(shard_path.resolve().relative_to(out_dir.resolve()))
    for s in manifest.shards:
        if s.path == rel:
            return s.sha256
    raise ShardError(f"{shard_path}: not listed in {out_dir / MANIFEST_NAME}")


def blocks_from_arrays(seq: np.ndarray, offsets: np.ndarray, ids: list[str], cluster_id: np.ndarray,
                       cluster_size: np.ndarray, index_in_cluster: np.ndarray, source: np.ndarray,
                       labels: list[str] | None, block_records: int) -> Iterable[RecordBlock]:
    """Cut contiguous record arrays into blocks of `block_records` (offsets rebased to 0 per block)."""
    n = len(offsets) - 1
    for a in range(0, n, block_records):
        b = min(a + block_records, n)
        lo, hi = offsets[a], offsets[b]
        yield RecordBlock(seq=seq[lo:hi], offsets=offsets[a: b + 1] - lo, ids=ids[a:b],
                          cluster_id=cluster_id[a:b], cluster_size=cluster_size[a:b],
                          index_in_cluster=index_in_cluster[a:b], source=source[a:b],
                          labels=None if labels is None else labels[a:b])
