"""On-disk record store written by the normalise stage: flat binary columns, read back as memmaps.

Nothing per record lives in Python objects: sequences and ids are concatenated byte files, every other
field is one fixed-width column file. The store is append-only while it is written.
"""
from __future__ import annotations

import mmap
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .arrays import offsets_from_lengths
from .errors import DataprepError
from .normalize import ParsedChunk

COLUMNS: dict[str, type] = {"seq_len": np.int64, "id_len": np.int32, "label_len": np.int32, "line": np.int64,
                            "source": np.int32, "seqh": np.uint64, "idh": np.uint64}
BLOBS = ("seq", "ids", "labels")


class StoreWriter:
    """Appends parsed chunks; remembers each chunk's byte size per file so parts can be merged in input order.

    The file writes run on a helper thread (writes release the GIL), overlapping with parsing the next chunk;
    at most `MAX_PENDING` chunks wait to be written, so memory stays bounded when the disk is slow."""

    MAX_PENDING = 2

    def __init__(self, directory: str | os.PathLike, labels: bool):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = [n for n in [*BLOBS, *COLUMNS] if labels or n not in ("labels", "label_len")]
        self._files = {name: open(self.dir / f"{name}.bin", "wb") for name in self.names}
        self._chunks: list[list[int]] = []  # [chunk key, bytes written to each file...]
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="store-writer")  # one thread: writes stay in order
        self._pending: deque = deque()

    def append(self, p: ParsedChunk, source: int, key: int) -> None:
        """Append a chunk of `source`; `key` orders the chunks of all parts in input order (`merge_parts`)."""
        data = {"seq": memoryview(np.ascontiguousarray(p.seq)), "ids": p.ids,
                "seq_len": p.seq_len.astype(np.int64).tobytes(), "id_len": p.id_len.astype(np.int32).tobytes(),
                "line": p.line.astype(np.int64).tobytes(), "source": np.full(len(p), source, np.int32).tobytes(),
                "seqh": p.seqh.tobytes(), "idh": p.idh.tobytes()}
        if "labels" in self._files:
            data["labels"] = p.labels or b""
            data["label_len"] = (p.label_len if p.label_len is not None else np.zeros(0, np.int32)).tobytes()
        while len(self._pending) >= self.MAX_PENDING:
            self._pending.popleft().result()  # re-raises a failed write
        self._pending.append(self._pool.submit(self._write, [data[name] for name in self.names]))
        self._chunks.append([key] + [len(data[name]) if not isinstance(data[name], memoryview)
                                       else data[name].nbytes for name in self.names])

    def _write(self, parts: list) -> None:
        for name, part in zip(self.names, parts):
            self._files[name].write(part)

    def close(self) -> None:
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)
            for fh in self._files.values():
                fh.close()
        table = np.array(self._chunks, np.int64).reshape(-1, 1 + len(self.names))
        np.save(self.dir / "chunks.npy", table)
        (self.dir / "columns.txt").write_text("\n".join(self.names))


def merge_parts(parts: list[Path], out_dir: Path) -> None:
    """Merge part stores (one per process or MPI rank) into one store in order of their chunk keys."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = (parts[0] / "columns.txt").read_text().split("\n")
    if len(parts) == 1:
        for name in names:
            os.replace(parts[0] / f"{name}.bin", out_dir / f"{name}.bin")
        return
    tables = [np.load(p / "chunks.npy") for p in parts]
    starts = [np.cumsum(t[:, 1:], axis=0) - t[:, 1:] for t in tables]  # byte offset of each chunk per file
    order = sorted((int(k), pi, ci) for pi, t in enumerate(tables) for ci, k in enumerate(t[:, 0]))
    runs: list[list[int]] = []  # [part, first chunk, last chunk]: consecutive chunks of one part, copied at once
    for _, pi, ci in order:
        if runs and runs[-1][0] == pi and runs[-1][2] == ci - 1:
            runs[-1][2] = ci
        else:
            runs.append([pi, ci, ci])
    head = runs[0][0] if runs and runs[0][1] == 0 and [r[0] for r in runs].count(runs[0][0]) == 1 else None
    for j, name in enumerate(names):
        if head is not None:  # the first run is a whole part file: it becomes the output, the rest is appended
            os.replace(parts[head] / f"{name}.bin", out_dir / f"{name}.bin")
        srcs = [open(p / f"{name}.bin", "rb") if i != head else None for i, p in enumerate(parts)]
        try:
            with open(out_dir / f"{name}.bin", "r+b" if head is not None else "wb") as out:
                out.seek(0, os.SEEK_END)  # (not "ab": copy_file_range refuses O_APPEND files)
                for pi, a, b in runs[head is not None:]:
                    start = int(starts[pi][a, j])
                    _copy_range(srcs[pi], out, start, int(starts[pi][b, j] + tables[pi][b, j + 1]) - start)
        finally:
            for f in srcs:
                if f is not None:
                    f.close()


def _copy_range(src, dst, offset: int, count: int) -> None:
    """src[offset:offset + count] appended to dst, in the kernel where it can (copy_file_range)."""
    dst.flush()
    while count > 0:
        try:
            n = os.copy_file_range(src.fileno(), dst.fileno(), min(count, 1 << 30), offset)
        except OSError:  # not supported here (old kernel, some file systems): copy through user space
            src.seek(offset)
            dst.write(src.read(count))
            return
        if n == 0:
            raise OSError(f"{src.name}: ended before byte {offset + count}")
        offset, count = offset + n, count - n


def _load(path: Path, dtype) -> np.ndarray:
    if not path.exists() or path.stat().st_size == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r")


class Store:
    """Read side of a finished store (memmapped columns; offsets computed once)."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        for name, dtype in COLUMNS.items():
            setattr(self, name, _load(self.dir / f"{name}.bin", dtype))
        self.seq = _load(self.dir / "seq.bin", np.uint8)
        self.ids = _load(self.dir / "ids.bin", np.uint8)
        self.has_labels = (self.dir / "label_len.bin").exists()
        self.labels = _load(self.dir / "labels.bin", np.uint8)
        self.seq_off = offsets_from_lengths(self.seq_len)
        self.id_off = offsets_from_lengths(self.id_len.astype(np.int64) + 1)
        self.label_off = offsets_from_lengths(self.label_len.astype(np.int64) + 1) if self.has_labels else None
        self._mmaps: dict[str, mmap.mmap] = {}
        for name, blob, off in (("seq", self.seq, self.seq_off), ("ids", self.ids, self.id_off),
                                ("labels", self.labels, self.label_off)):
            if off is not None and len(blob) != off[-1]:  # (a stage cut short: its columns say otherwise)
                raise DataprepError(f"{self.dir / (name + '.bin')}: {len(blob):,} bytes where its lengths add up to "
                                    f"{int(off[-1]):,}: a damaged stage; remove {self.dir} and build again")

    def __len__(self) -> int:
        return len(self.seq_len)

    def _bytes(self, name: str, off: np.ndarray, idx: np.ndarray) -> bytes:
        """Concatenated bytes of records `idx` from blob file `name`: one slice per run of consecutive records."""
        mm = self._mmaps.get(name)
        if mm is None:
            path = self.dir / f"{name}.bin"
            if path.stat().st_size == 0:
                return b""
            with open(path, "rb") as f:
                mm = self._mmaps[name] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        idx = np.asarray(idx, np.int64)
        if len(idx) == 0:
            return b""
        brk = np.flatnonzero(idx[1:] != idx[:-1] + 1) + 1
        first, last = np.concatenate(([0], brk)), np.concatenate((brk, [len(idx)])) - 1
        starts, ends = off[idx[first]].tolist(), off[idx[last] + 1].tolist()
        return b"".join([mm[a:b] for a, b in zip(starts, ends)])

    def seq_bytes(self, idx: np.ndarray) -> bytes:
        """Concatenated sequences of the records `idx`, in that order."""
        return self._bytes("seq", self.seq_off, idx)

    def gather_seqs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(concatenated sequences, offsets) of the records `idx`, in that order."""
        return np.frombuffer(self.seq_bytes(idx), np.uint8), offsets_from_lengths(self.seq_len[idx])

    def id_bytes(self, idx: np.ndarray) -> bytes:
        """"id\\n" per record of `idx` (UTF-8: headers that are not were rejected)."""
        return self._bytes("ids", self.id_off, idx)

    def label_bytes(self, idx: np.ndarray) -> bytes | None:
        """"label\\n" per record of `idx`, or None when the store has no labels."""
        return self._bytes("labels", self.label_off, idx) if self.has_labels else None

    def ids_of(self, idx: np.ndarray) -> list[str]:
        return self.id_bytes(idx).decode("utf-8", "backslashreplace").split("\n")[:-1]


def write_permuted(store: Store, idx: np.ndarray, out_dir: Path, batch: int = 1 << 18) -> None:
    """A store whose record j is `store`'s record idx[j]: the records laid out in shard order, so that the shard
    writer reads nearly contiguous ranges instead of one slice per record."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blobs = {"seq": store.seq_bytes, "ids": store.id_bytes}
    if store.has_labels:
        blobs["labels"] = store.label_bytes
    files = {name: open(out_dir / f"{name}.bin", "wb") for name in blobs}
    try:
        for a in range(0, len(idx), batch):
            for name, gather in blobs.items():
                files[name].write(gather(idx[a: a + batch]))
    finally:
        for f in files.values():
            f.close()
    for name, dtype in COLUMNS.items():
        if name != "label_len" or store.has_labels:
            np.asarray(getattr(store, name))[idx].astype(dtype).tofile(out_dir / f"{name}.bin")
