"""Build pretraining shards from FASTA files.

    python dataprep/build_shards.py --input a.fa.gz b.fa.zst - --out shards/

FASTA (plain, gzip, zstd, or - for stdin) -> normalise (upper-case, T->U, IUPAC kept, length filter;
rejects.tsv) -> exact dedup (duplicates.tsv) -> MMseqs2 easy-linclust clusters -> cluster-held-out
train/valid split -> global shuffle -> WebDataset tar shards of zstd record blocks + manifest.json + report/.
Run it under `srun`/`mpirun` with --mpi to share the work between ranks (needs a shared file system).
"""
from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from pathlib import Path

import zstandard

if __package__ in (None, ""):  # run as a script path: python dataprep/build_shards.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dataprep.cluster import ClusterConfig  # noqa: E402
from dataprep.comm import SerialComm  # noqa: E402
from dataprep.errors import DataprepError, InputError  # noqa: E402
from dataprep.normalize import NormalizeConfig  # noqa: E402
from dataprep.pipeline import BuildConfig, build, discard_unfinished  # noqa: E402

ZSTD_MIN_LEVEL = -(1 << 17)  # ZSTD_minCLevel(): python-zstandard exposes only the maximum
MAX_CHUNK_MB = 1024  # --chunk-mb: each normalise worker holds a few chunks of this size


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" only to options that have a default to show (not None)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv: list[str] | None = None) -> tuple[BuildConfig, bool]:
    p = argparse.ArgumentParser(prog="build_shards.py", description=__doc__.split("\n\n")[0],
                                formatter_class=_HelpFormatter)
    p.add_argument("--input", nargs="+", action="extend", required=True, metavar="FILE",
                   help="FASTA files (.gz/.zst ok), - for stdin; repeatable")
    p.add_argument("--out", required=True, help="output directory")
    g = p.add_argument_group("normalisation")
    g.add_argument("--min-len", type=int, default=NormalizeConfig.min_len, help="shortest kept sequence (nt)")
    g.add_argument("--max-len", type=int, default=NormalizeConfig.max_len, help="longest kept sequence (nt)")
    g.add_argument("--label-key", default=None, help="header key=value copied into each record's label, e.g. rfam_acc")
    g = p.add_argument_group("clustering (MMseqs2 linclust)")
    g.add_argument("--min-seq-id", type=float, default=ClusterConfig.min_seq_id,
                   help="least sequence identity to a cluster's representative")
    g.add_argument("--coverage", "-c", type=float, default=ClusterConfig.coverage,
                   help="least fraction covered by the alignment (of which sequences: --cov-mode; of either for the "
                        "holdout search)")
    g.add_argument("--cov-mode", type=int, default=None, choices=range(6),
                   help="MMseqs2 --cov-mode (default: MMseqs2's own, 0: query and target)")
    g.add_argument("--threads", type=int, default=ClusterConfig.threads,
                   help="MMseqs2 threads (default: the CPUs this process may use, %(default)s here)")
    g.add_argument("--mmseqs", default="mmseqs", help="MMseqs2 executable")
    g.add_argument("--no-cluster", action="store_true", help="skip MMseqs2: every record is its own cluster")
    g = p.add_argument_group("split and shards")
    g.add_argument("--valid-fraction", type=float, default=BuildConfig.valid_fraction,
                   help="fraction of clusters held out for validation")
    g.add_argument("--seed", type=int, default=BuildConfig.seed, help="seed of the split and the record order")
    g.add_argument("--block-records", type=int, default=BuildConfig.block_records,
                   help="records per zstd block (tar member)")
    g.add_argument("--shard-records", type=int, default=0, help="records per shard (0: from --shard-mb)")
    g.add_argument("--shard-mb", type=float, default=BuildConfig.shard_mb, help="target uncompressed MB per shard")
    g.add_argument("--zstd-level", type=int, default=BuildConfig.zstd_level, help="zstd compression level")
    g = p.add_argument_group("execution")
    g.add_argument("--workers", type=int, default=BuildConfig.workers,
                   help="normalise processes (byte ranges of plain inputs) and shard-compression threads, per rank "
                        "(default: the CPUs this process may use, %(default)s here)")
    g.add_argument("--chunk-mb", type=float, default=BuildConfig.chunk_mb, help="input chunk size for parsing (MiB)")
    g.add_argument("--dedup-bucket-records", type=int, default=BuildConfig.dedup_bucket_records,
                   help="records per dedup hash bucket; lower it to bound dedup memory")
    g.add_argument("--mpi", action="store_true", help="share the work between MPI ranks (mpi4py)")
    g.add_argument("--no-report", action="store_true", help="skip report/ (plots + summary.json)")
    g.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    _check(p, a)
    cfg = BuildConfig(
        inputs=tuple(a.input), out=a.out,
        normalize=NormalizeConfig(min_len=a.min_len, max_len=a.max_len, label_key=a.label_key),
        cluster=ClusterConfig(min_seq_id=a.min_seq_id, coverage=a.coverage, cov_mode=a.cov_mode,
                              threads=a.threads, mmseqs=a.mmseqs),
        no_cluster=a.no_cluster, valid_fraction=a.valid_fraction, seed=a.seed, block_records=a.block_records,
        records_per_shard=a.shard_records, shard_mb=a.shard_mb, zstd_level=a.zstd_level, workers=a.workers,
        chunk_mb=a.chunk_mb, dedup_bucket_records=a.dedup_bucket_records, report=not a.no_report, quiet=a.quiet)
    return cfg, a.mpi


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Refuse bad values here, not hours later in the stage that first uses them."""
    def option(name: str) -> str:
        return f"--{name.replace('_', '-')}"

    for name in ("min_len", "max_len", "block_records", "workers", "threads", "dedup_bucket_records"):
        if getattr(a, name) < 1:
            p.error(f"{option(name)} must be >= 1")
    for name in ("seed", "shard_records"):
        if getattr(a, name) < 0:
            p.error(f"{option(name)} must be >= 0")
    for name in ("chunk_mb", "shard_mb"):
        if not 0 < getattr(a, name) < math.inf:  # nan too
            p.error(f"{option(name)} must be a number > 0")
    if int(a.chunk_mb * (1 << 20)) < 1:  # a compressed input would read nothing
        p.error(f"--chunk-mb {a.chunk_mb} is less than one byte")
    if a.chunk_mb > MAX_CHUNK_MB:  # each worker holds a few chunks (100000 ended in a MemoryError traceback)
        p.error(f"--chunk-mb must be at most {MAX_CHUNK_MB}")
    if not a.out:  # (it built into the current directory, replacing a report/ folder there)
        p.error("--out must name a directory")
    for name in ("min_seq_id", "coverage"):
        if not 0 <= getattr(a, name) <= 1:
            p.error(f"{option(name)} must be in [0, 1]")
    if not 0 <= a.valid_fraction < 1:
        p.error("--valid-fraction must be in [0, 1)")
    if not ZSTD_MIN_LEVEL <= a.zstd_level <= zstandard.MAX_COMPRESSION_LEVEL:
        p.error(f"--zstd-level must be in {ZSTD_MIN_LEVEL}..{zstandard.MAX_COMPRESSION_LEVEL}")
    if a.min_len > a.max_len:
        p.error("--min-len must not exceed --max-len")
    key = a.label_key
    if key is not None and (not key or not key.isprintable() or any(c.isspace() or c == "=" for c in key)):
        p.error(f"--label-key {a.label_key!r}: want a header key such as rfam_acc (printable, no spaces or '=')")
    if odd := next((f for f in a.input if not f.isprintable()), None):  # (a tab split rejects.tsv's columns)
        p.error(f"--input {odd!r}: a file name with a tab, newline or other control character; rename it")
    files = [(f, _file_identity(f)) for f in a.input if f != "-"]
    if twice := next(((f, g) for i, (f, one) in enumerate(files) for g, other in files[i + 1:] if one == other), None):
        p.error(f"--input names {twice[0]} twice (as {twice[1]}: the same file, or a link to it): the second "
                "copy's records would all count as duplicates")
    if a.input.count("-") > 1:
        p.error("stdin (-) is given more than once in --input: it can be read only once")
    if a.mpi and "-" in a.input:
        p.error("stdin input (-) cannot be shared between MPI ranks; write it to a file first")


def _file_identity(path: str) -> tuple[int, int] | str:
    """(device, inode): one file under two names (a symbolic or hard link) is one; its path where it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return os.path.realpath(path)
    return st.st_dev, st.st_ino


# A file system that takes no more writes (read-only, full, over quota, not ours): a one-line error, and the
# unfinished stages go (a full disk would stay full of them).
UNWRITABLE = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG}


def main(argv: list[str] | None = None) -> int:
    cfg, use_mpi = parse_args(argv)
    comm = SerialComm()
    if use_mpi:
        from dataprep.comm import MpiComm

        comm = MpiComm()
    fresh = not Path(cfg.out).exists()
    try:
        build(cfg, comm)
    except (DataprepError, OSError) as e:
        unwritable = isinstance(e, OSError)
        if unwritable and e.errno not in UNWRITABLE:  # (the `except BaseException` below does not see it)
            _abort_others(comm)
            raise
        where = e.filename or cfg.out if unwritable else None  # a write() error names no file
        # under MPI the other ranks may still be writing there (they printed tracebacks of its removal): the
        # unfinished stages stay, and the next build starts them afresh
        removed = comm.size == 1 and (unwritable or isinstance(e, InputError))
        print(f"error: {e.strerror}: {where} (the unfinished stages {'are removed' if removed else 'stay'}; the "
              f"finished ones and the published shard set stay)" if unwritable else f"error: {e}", file=sys.stderr,
              flush=True)
        if removed:
            discard_unfinished(Path(cfg.out), fresh)
        if comm.size > 1:
            comm.abort(2)
        return 2
    except KeyboardInterrupt:
        print("build_shards: interrupted; no published file is half-written, and a rerun with the same arguments "
              "starts from the last finished stage", file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.abort(130)
        return 130
    except BaseException:
        _abort_others(comm)
        raise
    return 0


def _abort_others(comm) -> None:
    """Never leave the other ranks waiting in a collective: this rank's traceback, then MPI_Abort."""
    if comm.size > 1:
        import traceback

        traceback.print_exc()
        comm.abort(1)


if __name__ == "__main__":
    sys.exit(main())
