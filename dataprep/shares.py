"""Normalising the inputs in shares, one process each: every MPI rank runs `--workers` shares. A plain input is
cut into byte ranges at header lines (`fasta.split_points`), one per share, so no share reads another's bytes;
a compressed input (or stdin) cannot be cut, so each share decompresses it all and parses every n-th chunk. Each
share writes a part store; the parts are merged into one store in input order, line numbers counted from the
start of each input.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .background import Background
from .errors import InputError
from .fasta import FastaStream, regular_file, split_points
from .normalize import oversized_reject, parse_chunk
from .store import StoreWriter, merge_parts

if TYPE_CHECKING:
    from .pipeline import BuildConfig, Log


def normalise_inputs(cfg: BuildConfig, tmp: Path, comm, log: Log) -> None:
    """Every rank runs `workers` shares (one with stdin or a pipe as input); rank 0 merges the parts into `tmp`."""
    local = cfg.workers if all(map(regular_file, cfg.inputs)) else 1  # a stream can be read by one process only
    total = comm.size * local
    cuts = comm.bcast([split_points(p, total) if total > 1 else None for p in cfg.inputs]
                      if comm.rank == 0 else None)
    comm.barrier()
    _normalise_shares(cfg, tmp, [comm.rank * local + i for i in range(local)], total, cuts, log)
    comm.barrier()
    if comm.rank == 0:
        _merge_shares(tmp)


def _normalise_share(cfg: BuildConfig, part: Path, rank: int, size: int, cuts: list[list[int] | None],
                     log: Log | None) -> None:
    """Share `rank` of `size` into its own part store: of each plain input the byte range between its cuts
    (`split_points`), of a compressed input (or stdin) every size-th chunk (so each share decompresses it all).
    Chunks are keyed (source, range, chunk) so that sorting the keys gives input order."""
    writer = StoreWriter(part, labels=cfg.normalize.label_key is not None)
    sources, before = [], 0  # before: the records of the earlier inputs, all shares together (estimated)
    with (open(part / "rejects.tsv", "w", encoding="utf-8") as rej,
          ThreadPoolExecutor(1, thread_name_prefix="sha256") as hasher):
        for s, (path, cut) in enumerate(zip(cfg.inputs, cuts)):
            whole = hasher.submit(_file_sha256, path) if cut and rank == 0 else None
            stream = FastaStream(path, chunk_bytes=int(cfg.chunk_mb * (1 << 20)),
                                 max_record_bytes=max(64 << 20, 2 * cfg.normalize.max_len + (1 << 20)),
                                 checksum=rank == 0 and not cut,
                                 byte_range=(cut[rank], cut[rank + 1]) if cut else None)
            records = rejected = 0
            scale = size  # all shares' records per record of this share (of a byte range: one range of `size`)
            for k, chunk in enumerate(stream):
                if not cut and k % size != rank:
                    continue
                if not cut:  # a stream: every share has read k + 1 chunks, this one parsed k // size + 1 of them
                    scale = (k + 1) / (k // size + 1)
                key = (s << 48) | ((rank if cut else 0) << 32) | k
                if chunk.oversized:
                    line, rid, reason = oversized_reject(*chunk.oversized, chunk.first_line, cfg.normalize)
                    rej.write(f"{s}\t{line}\t{rid}\t{reason}\n")
                    records, rejected = records + 1, rejected + 1
                    continue
                p = parse_chunk(chunk.data, chunk.first_line, cfg.normalize)
                if p.stray:  # a byte range numbers its lines from its start
                    line = p.stray[0] + (_lines_before(path, cut[rank]) if cut else 0)
                    raise InputError(f"{path}:{line}: {p.stray[1]}")
                chunk.newlines = p.newlines
                writer.append(p, s, key)
                rej.writelines(f"{s}\t{line}\t{rid}\t{reason}\n" for line, rid, reason in p.rejects)
                records, rejected = records + p.records_in, rejected + len(p.rejects)
                if log:
                    log.progress(f"normalise: {path}: ~{before + round(records * scale):,} records so far"
                                 + (f" (estimated from 1 of {size} shares)" if size > 1 else ""))
            before += round(records * scale)
            sha, nbytes = whole.result() if whole else (stream.sha256, stream.bytes)
            sources.append({"path": path, "sha256": sha, "bytes": nbytes, "compression": stream.compression,
                            "records": records, "rejected": rejected, "newlines": stream.newlines if cut else 0})
    writer.close()
    (part / "sources.json").write_text(json.dumps(sources))


def tsv_lines(path: Path) -> list[str]:
    """The lines of a TSV we wrote, split at newlines only (str.splitlines also splits at U+2028, U+0085, ...,
    which an id may hold)."""
    return path.read_text(encoding="utf-8").split("\n")[:-1]


def _lines_before(path: str, offset: int) -> int:
    """Line breaks in the first `offset` bytes of a plain file (to name the line of an error in a byte range)."""
    with open(path, "rb") as f:
        return sum(f.read(min(1 << 24, offset - at)).count(b"\n") for at in range(0, offset, 1 << 24))


def _file_sha256(path: str) -> tuple[str, int]:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest(), os.fstat(f.fileno()).st_size


def _normalise_shares(cfg: BuildConfig, tmp: Path, mine: list[int], total: int, cuts: list, log: Log) -> None:
    """Shares `mine` of `total`: one process each (the first in this one, the others forked)."""
    parts = [(cfg, tmp / f"share-{r:04d}", r, total, cuts, log if i == 0 else None) for i, r in enumerate(mine)]
    others = [Background(f"normalise share {part[2]}", _normalise_share, *part, nice=0) for part in parts[1:]]
    try:
        _normalise_share(*parts[0])
        for proc in others:
            proc.join()
    except BaseException:
        for proc in others:
            proc.stop()
        raise


def _merge_shares(tmp: Path) -> None:
    """Part stores -> one store in input order, with line numbers counted from the start of each input."""
    parts = sorted(tmp.glob("share-*"))
    per_part = [json.loads((p / "sources.json").read_text()) for p in parts]
    line_base = np.cumsum([[0] * len(per_part[0])] + [[s["newlines"] for s in pp] for pp in per_part[:-1]], axis=0)
    rows = []
    for p, base in zip(parts, line_base):
        if base.any():
            _shift_lines(p, base)
        for row in tsv_lines(p / "rejects.tsv"):
            s, line, rest = row.split("\t", 2)
            rows.append((int(s), int(line) + int(base[int(s)]), rest))
    merge_parts(parts, tmp)
    sources = per_part[0]
    for other in per_part[1:]:
        for s, o in zip(sources, other):
            s["records"] += o["records"]
            s["rejected"] += o["rejected"]
    for s in sources:
        del s["newlines"]
        if s["records"] == 0:
            raise InputError(f"{s['path']}: no FASTA records (empty input)")
    rows.sort(key=lambda r: (r[0], r[1]))
    (tmp / "rejects.tsv").write_text("".join(f"{s}\t{line}\t{rest}\n" for s, line, rest in rows),
                                     encoding="utf-8")
    (tmp / "sources.json").write_text(json.dumps(sources))
    for p in parts:
        shutil.rmtree(p)


def _shift_lines(part: Path, base: np.ndarray) -> None:
    """Add each source's line offset (line breaks in the earlier byte ranges) to a part's line column."""
    if (part / "line.bin").stat().st_size == 0:
        return
    line = np.memmap(part / "line.bin", np.int64, "r+")
    line += base.astype(np.int64)[np.fromfile(part / "source.bin", np.int32)]
    line.flush()
