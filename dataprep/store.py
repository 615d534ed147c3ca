"""On-disk record store written by the normalise stage: flat binary columns, read back as memmaps.

Nothing per record lives in Python objects: sequences and ids are concatenated byte files, every other
field is one fixed-width column file. The store is append-only while it is written.
"""
from __future__ import annotations

import mmap
import os
import shutil
from pathlib import Path

import numpy as np

from .arrays import offsets_from_lengths
from .normalize import ParsedChunk

COLUMNS: dict[str, type] = {"seq_len": np.int64, "id_len": np.int32, "label_len": np.int32, "line": np.int64,
                            "source": np.int32, "seqh": np.uint64, "idh": np.uint64}
BLOBS = ("seq", "ids", "labels")


class StoreWriter:
    def __init__(self, directory: str | os.PathLike, labels: bool):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.labels = labels
        names = [*BLOBS, *COLUMNS] if labels else [n for n in [*BLOBS, *COLUMNS] if n not in ("labels", "label_len")]
        self._files = {name: open(self.dir / f"{name}.bin", "wb") for name in names}
        self.records = 0

    def append(self, p: ParsedChunk, source: int) -> None:
        f = self._files
        f["seq"].write(memoryview(np.ascontiguousarray(p.seq)))
        f["ids"].write(p.ids)
        f["seq_len"].write(p.seq_len.astype(np.int64).tobytes())
        f["id_len"].write(p.id_len.astype(np.int32).tobytes())
        f["line"].write(p.line.astype(np.int64).tobytes())
        f["source"].write(np.full(len(p), source, np.int32).tobytes())
        f["seqh"].write(p.seqh.tobytes())
        f["idh"].write(p.idh.tobytes())
        if self.labels:
            f["labels"].write(p.labels or b"")
            f["label_len"].write((p.label_len if p.label_len is not None else np.zeros(0, np.int32)).tobytes())
        self.records += len(p)

    def close(self) -> None:
        for fh in self._files.values():
            fh.close()


def merge_parts(parts: list[Path], out_dir: Path) -> None:
    """Concatenate the column files of several part stores (MPI ranks) into one store, in the given order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in [*BLOBS, *COLUMNS]:
        sources = [p / f"{name}.bin" for p in parts if (p / f"{name}.bin").exists()]
        if not sources:
            continue
        if len(sources) == 1:
            os.replace(sources[0], out_dir / f"{name}.bin")
            continue
        with open(out_dir / f"{name}.bin", "wb") as out:
            for src in sources:
                with open(src, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)


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

    def __len__(self) -> int:
        return len(self.seq_len)

    @property
    def order_key(self) -> np.ndarray:
        """Input order of each record, (source, line), as one sortable int64."""
        return (self.source.astype(np.int64) << 40) | self.line

    @property
    def in_input_order(self) -> bool:
        """Are the records stored in input order (single-process normalise)? Checked in chunks, once."""
        if not hasattr(self, "_in_order"):
            ok, prev = True, -1
            for a in range(0, len(self), 1 << 20):
                k = (self.source[a: a + (1 << 20)].astype(np.int64) << 40) | self.line[a: a + (1 << 20)]
                if k[0] <= prev or np.any(k[1:] <= k[:-1]):
                    ok = False
                    break
                prev = int(k[-1])
            self._in_order = ok
        return self._in_order

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

    def gather_seqs(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(concatenated sequences, offsets) of the records `idx`, in that order."""
        return np.frombuffer(self._bytes("seq", self.seq_off, idx), np.uint8), offsets_from_lengths(self.seq_len[idx])

    def ids_of(self, idx: np.ndarray) -> list[str]:
        return self._bytes("ids", self.id_off, idx).decode("utf-8", "backslashreplace").split("\n")[:-1]

    def labels_of(self, idx: np.ndarray) -> list[str] | None:
        if not self.has_labels:
            return None
        return self._bytes("labels", self.label_off, idx).decode("utf-8", "backslashreplace").split("\n")[:-1]
