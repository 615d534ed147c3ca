"""Clustering of the deduplicated records with the real MMseqs2 (the steps of `mmseqs easy-linclust`).

MMseqs2 gets the sequences under fixed-width decimal names (their position in the kept list), so both
writing its input and parsing its `_cluster.tsv` are fixed-width numpy operations. Note: MMseqs2's
nucleotide clustering joins a sequence and its reverse complement into one cluster (no flag disables it
in v14).
"""
from __future__ import annotations

import itertools
import os
import resource
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arrays import offsets_from_lengths
from .background import Background, die_with_parent
from .errors import ToolError
from .store import Store

INSTALL_HINT = ("install MMseqs2: `sudo apt-get install mmseqs2` (Debian/Ubuntu), "
                "`conda install -c conda-forge -c bioconda mmseqs2`, or `bash deploy/install_sysdeps.sh`; "
                "or pass --no-cluster to give every record its own cluster")
# k-mer size of the holdout search (`search_step`). Smaller finds more of the near-duplicates linclust's long
# k-mers miss and costs more: validation records left with a train record within the thresholds (coverage of
# both), on a 4,000-record ncRNA sample at --valid-fraction 0.1, 0.8 / 1.9 / 3.6 % at k 7 / 8 / 9 (43 % without);
# prefilter time on 945,670 synthetic records (2 cores) 318 / 105 / 45 s against linclust's 36 s.
SEARCH_KMER = 8
CPUS = len(os.sched_getaffinity(0))  # this process's (a Slurm task's --cpus-per-task): the thread defaults
# Hits kept per query: MMseqs2's default 300 plus the query's cluster size, whose members would fill them and hide
# a link to another cluster (a record of 400 near-copies lost its 85 % neighbour). Each group of cluster sizes up
# to these bounds is searched with its own limit: one limit for all (10,000) made the alignments 13x slower.
SEARCH_SIZE_BOUNDS = (100, 1_000, 10_000)
WRITE_BATCH = 16_384  # small batches reuse their buffers (fresh large temporaries page-fault on every batch)
ROWS_PER_CHUNK = 1 << 20  # lines of MMseqs2's outputs parsed at once


@dataclass(frozen=True)
class ClusterConfig:
    min_seq_id: float = 0.7
    coverage: float = 0.8
    cov_mode: int | None = None  # MMseqs2's default (0: bidirectional) unless set
    threads: int = CPUS
    mmseqs: str = "mmseqs"


@dataclass
class Clusters:
    cluster_id: np.ndarray  # int64 per kept record, 0..C-1 in order of the representatives' positions
    cluster_size: np.ndarray  # int64 per kept record
    index_in_cluster: np.ndarray  # int64 per kept record
    tool_seconds: float = 0.0  # wall time of the mmseqs process itself
    tool_cpu_seconds: float = 0.0  # its CPU time (user + sys, all threads)

    @property
    def n_clusters(self) -> int:
        return int(self.cluster_id.max()) + 1 if len(self.cluster_id) else 0


def find_mmseqs(binary: str = "mmseqs") -> str:
    path = shutil.which(binary)
    if path is None:
        raise ToolError(f"MMseqs2 executable '{binary}' not found on PATH; {INSTALL_HINT}")
    return path


def mmseqs_version(binary: str = "mmseqs") -> str:
    out = subprocess.run([find_mmseqs(binary), "version"], capture_output=True, text=True)
    return out.stdout.strip() or out.stderr.strip()


def name_width(n: int) -> int:
    return max(1, len(str(max(n - 1, 0))))


def _decimal(values: np.ndarray, width: int) -> np.ndarray:
    powers = 10 ** np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values[:, None] // powers) % 10 + 48).astype(np.uint8)


def fasta_block(names: np.ndarray, seq: np.ndarray, off: np.ndarray) -> np.ndarray:
    """FASTA bytes `>name\\nseq\\n` for fixed-width names (uint8 [n, w]) and concatenated sequences."""
    n, w = names.shape
    start = offsets_from_lengths(np.diff(off) + w + 3)
    out = np.empty(int(start[-1]), np.uint8)
    hdr_pos = start[:-1, None] + np.arange(w + 2)
    hdr = np.empty((n, w + 2), np.uint8)
    hdr[:, 0], hdr[:, 1:-1], hdr[:, -1] = ord(">"), names, ord("\n")
    seq_mask = np.ones(len(out), bool)
    seq_mask[hdr_pos] = False
    seq_mask[start[1:] - 1] = False
    out[hdr_pos] = hdr
    out[start[1:] - 1] = ord("\n")
    out[seq_mask] = seq
    return out


def write_input(store: Store, keep: np.ndarray, paths: list[Path]) -> int:
    """The kept records as MMseqs2 input, cut into len(paths) FASTA files written by as many processes (MMseqs2
    reads them in order as one database); returns the name width."""
    w = name_width(len(keep))
    cuts = np.linspace(0, len(keep), len(paths) + 1).astype(np.int64).tolist()
    parts = [(store, keep, w, a, b, path) for a, b, path in zip(cuts[:-1], cuts[1:], paths)]
    others = [Background("mmseqs-input", _write_part, *part, nice=0) for part in parts[1:]]
    try:
        _write_part(*parts[0])
    finally:
        for proc in others:
            proc.join()
    return w


def _write_part(store: Store, keep: np.ndarray, w: int, start: int, end: int, path: Path) -> None:
    _write_records(store, keep, np.arange(start, end), w, path)


def _write_records(store: Store, keep: np.ndarray, positions: np.ndarray, w: int, path: Path) -> None:
    """FASTA of the kept records at `positions` (kept-list positions), named by those positions."""
    with open(path, "wb") as f:
        for a in range(0, len(positions), WRITE_BATCH):
            at = positions[a: a + WRITE_BATCH]
            seq, off = store.gather_seqs(keep[at])
            f.write(memoryview(fasta_block(_decimal(at, w), seq, off)))


def linclust_steps(exe: str, fasta: list[Path], tmp: Path, cfg: ClusterConfig) -> list[list[str]]:
    """The MMseqs2 commands of `mmseqs easy-linclust` (v14) that the pipeline needs: createdb, linclust with
    the arguments easy-linclust passes to it, createtsv. Not its rep_seq/all_seqs FASTA outputs, which the
    pipeline does not read (about 8 % of easy-linclust's time on 1M records)."""
    db, clu, tsv = tmp / "input", tmp / "clu", tmp / "cluster.tsv"
    linclust = [exe, "linclust", str(db), str(clu), str(tmp / "clu_tmp"), "--threads", str(cfg.threads),
                "-e", "0.001", "--min-seq-id", str(cfg.min_seq_id), "-c", str(cfg.coverage),
                "--spaced-kmer-mode", "0", "--remove-tmp-files", "1"]
    if cfg.cov_mode is not None:
        linclust += ["--cov-mode", str(cfg.cov_mode)]
    return [[exe, "createdb", *map(str, fasta), str(db), "--dbtype", "2", "--shuffle", "0", "--createdb-mode", "1",
             "--write-lookup", "0"],
            linclust,
            [exe, "createtsv", str(db), str(db), str(clu), str(tsv), "--threads", str(cfg.threads)]]


# MMseqs2 runs each workflow step as a child of a shell script (and Debian's `mmseqs` is a wrapper script too), so a
# parent-death signal on the process we start would not reach the running step. That process is therefore a shell
# that leads a process group of its own and, on the signal, kills the whole group.
_GROUP_GUARD = ["/bin/sh", "-c", 'trap "kill -KILL 0" TERM; "$@" & wait $!', "mmseqs-group"]


def _run_guarded(cmd: list[str], out) -> int:
    """Run `cmd` (its output to the file `out`) so that it and all its descendants end with this process."""
    parent = os.getpid()

    def in_child() -> None:
        os.setpgid(0, 0)
        die_with_parent(parent, signal.SIGTERM)

    proc = subprocess.Popen(_GROUP_GUARD + cmd, stdout=out, stderr=subprocess.STDOUT, preexec_fn=in_child)
    try:
        return proc.wait()
    except BaseException:  # e.g. Ctrl-C: the group is not in the terminal's foreground group, so end it here
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


def search_memory_limit(ranks_on_node: int) -> str | None:
    """MMseqs2's --split-memory-limit for each of `ranks_on_node` ranks searching at once: 80 % of the node's
    available memory (/proc/meminfo, not a cgroup's limit) shared out. Unset, each sizes its k-mer index for all of
    it: ~6.8 bytes per target nt, ~48 GB at RiNALMo's ~7 Gnt, so 6 ranks on a 256 GB node would need ~290 GB."""
    if ranks_on_node <= 1:
        return None
    with open("/proc/meminfo") as f:
        available_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    return f"{int(0.8 * available_kib / ranks_on_node) >> 10}M"


def search_step(exe: str, query: Path, db: Path, out: Path, tmp: Path, cfg: ClusterConfig, max_seqs: int,
                memory_limit: str | None = None) -> list[str]:
    """Every (query, target) alignment within the clustering's identity, on either strand (as clustering joins
    reverse complements), with the fraction of each sequence it covers (`parse_hits` keeps those covering
    `cfg.coverage` of either). Short k-mers without masking find what linclust's long k-mers miss: MMseqs2's
    defaults (k 15, masking) found 86 of the 173 validation records of a 4,000-record ncRNA sample that k 7 found
    with such a train record; k 8 finds 170. The queries are nucleotides (--dbtype 2), as the target database: left
    to guess, MMseqs2 took queries with many ambiguity codes (R, Y, ...) for protein and failed."""
    return [exe, "easy-search", str(query), str(db), str(out), str(tmp), "--dbtype", "2", "--search-type", "3",
            "--strand", "2",
            "-k", str(SEARCH_KMER), "--mask", "0", "-e", "10", "--min-seq-id", str(cfg.min_seq_id), "-c", "0",
            "--max-seqs", str(max_seqs), "--format-output", "query,target,qcov,tcov", "--threads", str(cfg.threads),
            *(["--split-memory-limit", memory_limit] if memory_limit else [])]


def run_mmseqs(steps: list[list[str]], log: Path, done: Sequence[Path | None] = ()) -> None:
    """Run MMseqs2 commands in order, each logged at the end of `log`, except those whose `done` file exists: for a
    step that makes a database its `.dbtype`, which MMseqs2 writes last (its own workflows resume by that rule),
    else a file written here when the step succeeds. A failure is a ToolError with the log's tail."""
    with open(log, "a+b") as lf:
        if lf.tell() and os.pread(lf.fileno(), 1, lf.tell() - 1) != b"\n":  # an earlier run's, killed mid-line
            lf.write(b"\n")
        for cmd, made in itertools.zip_longest(steps, done[: len(steps)]):
            if made is not None and made.exists():
                lf.write(f"# finished by an earlier run ({made.name}), not run again: {' '.join(cmd)}\n".encode())
                continue
            lf.write(f"$ {' '.join(cmd)}\n".encode())
            lf.flush()
            rc = _run_guarded(cmd, lf)
            if rc != 0:
                lf.close()
                tail = log.read_bytes()[-2000:].decode("utf-8", "replace")
                raise ToolError(f"mmseqs {cmd[1]} failed (exit {rc}); command: {' '.join(cmd)}\n"
                                f"last lines of {log}:\n{tail}\n(a rerun keeps the steps that finished and resumes "
                                f"MMseqs2's own from {log.parent}; delete that directory to start them afresh)")
            if made is not None:
                os.sync()  # MMseqs2 never syncs: the step's outputs are on disk before the mark says they are complete
                made.touch()


def run_linclust(fasta: list[Path], workdir: Path, cfg: ClusterConfig, log: Path) -> Path:
    """Cluster the sequences of the FASTA files `fasta`; returns the `rep<TAB>member` TSV. Steps that finished in
    `workdir` before (an interrupted run's) are kept, and linclust resumes from its own finished steps there."""
    tmp = workdir / "mmseqs_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    run_mmseqs(linclust_steps(find_mmseqs(cfg.mmseqs), fasta, tmp, cfg), log,
               [_database_made(tmp / "input"), _database_made(tmp / "clu")])
    return tmp / "cluster.tsv"


def _database_made(db: Path) -> Path:
    return db.with_name(db.name + ".dbtype")


def _fixed_rows(path: Path, fields: list[str], what: str) -> Iterator[np.ndarray]:
    """uint8 [k, row] chunks of MMseqs2's lines of tab-separated fields of the fixed widths of `fields`, each a
    pattern with `9` for a digit (`0.999`: a fraction as MMseqs2 prints it). In chunks, as a line's parsed columns
    take several times its bytes: parsing 20M search hits (600 MB) whole peaked at 1.64 GB, in chunks at 0.33 GB."""
    rows_per_chunk, line = ROWS_PER_CHUNK, np.frombuffer("\t".join(fields).encode() + b"\n", np.uint8)
    fixed = line != ord("9")
    with open(path, "rb") as f:
        for first in itertools.count(0, rows_per_chunk):
            a = np.fromfile(f, np.uint8, rows_per_chunk * len(line))
            if len(a) == 0:
                return
            rows = a[: len(a) - len(a) % len(line)].reshape(-1, len(line))
            bad = np.any(rows[:, fixed] != line[fixed], axis=1) | np.any(rows[:, ~fixed] - 48 > 9, axis=1)  # (uint8)
            if bad.any() or len(a) % len(line):
                at = int(np.argmax(bad)) if bad.any() else len(rows)
                got = bytes(a[at * len(line): (at + 1) * len(line)])
                raise ToolError(f"{path}: line {first + at + 1}: unexpected MMseqs2 {what} {got!r}; want lines of "
                                f"'{'<TAB>'.join(fields)}', 9 for a digit")
            yield rows


def _digits(rows: np.ndarray) -> np.ndarray:
    """int64 of the decimal digits of each row of a uint8 [m, w] array."""
    return (rows.astype(np.int64) - 48) @ 10 ** np.arange(rows.shape[1] - 1, -1, -1, dtype=np.int64)


def _pairs(chunks: Iterable[np.ndarray]) -> np.ndarray:
    return np.concatenate([*chunks, np.zeros((0, 2), np.int64)])


def parse_pairs(path: Path, width: int, what: str) -> np.ndarray:
    """[m, 2] int64 from MMseqs2's `name<TAB>name` lines of fixed-width decimal names."""
    return _pairs(np.stack([_digits(rows[:, :width]), _digits(rows[:, width + 1: -1])], axis=1)
                  for rows in _fixed_rows(path, ["9" * width] * 2, what))


def parse_hits(path: Path, width: int, coverage: float) -> np.ndarray:
    """[m, 2] int64 (query, target) of the search's `query<TAB>target<TAB>qcov<TAB>tcov` lines whose alignment
    covers at least `coverage` of either sequence (MMseqs2 prints each fraction as 0.ddd, rounded: 0.7995 counts as
    0.8)."""
    def near(rows: np.ndarray) -> np.ndarray:
        cov = [_digits(rows[:, at][:, [0, 2, 3, 4]]) for at in (slice(2 * width + 2, 2 * width + 7), slice(-6, -1))]
        rows = rows[np.maximum(*cov) >= round(coverage * 1000)]
        return np.stack([_digits(rows[:, :width]), _digits(rows[:, width + 1: 2 * width + 1])], axis=1)

    return _pairs(near(rows) for rows in _fixed_rows(path, ["9" * width] * 2 + ["9.999"] * 2, "search output"))


def parse_cluster_tsv(path: Path, n: int, width: int) -> np.ndarray:
    """Representative (kept-list position) of each of the n records, from `rep\\tmember` lines."""
    rep, member = parse_pairs(path, width, "cluster TSV").T
    counts = np.bincount(member, minlength=n)
    if len(counts) != n or np.any(counts != 1) or rep.max() >= n:
        raise ToolError(f"{path}: MMseqs2 output does not list every input sequence exactly once")
    out = np.empty(n, np.int64)
    out[member] = rep
    return out


def assign(rep: np.ndarray) -> Clusters:
    """Cluster id / size / index within the cluster from each record's representative."""
    is_rep = np.zeros(len(rep), bool)  # rep values are kept-list positions, so ranks come from a cumsum, not a sort
    is_rep[rep] = True
    cid = (np.cumsum(is_rep) - 1)[rep]  # = np.unique(rep, return_inverse=True)[1]
    size = np.bincount(cid)
    order = np.argsort(cid, kind="stable")
    index = np.empty(len(cid), np.int64)
    index[order] = np.arange(len(cid)) - np.repeat(offsets_from_lengths(size)[:-1], size)
    return Clusters(cluster_id=cid, cluster_size=size[cid].astype(np.int64), index_in_cluster=index)


def singletons(n: int) -> Clusters:
    return Clusters(cluster_id=np.arange(n, dtype=np.int64), cluster_size=np.ones(n, np.int64),
                    index_in_cluster=np.zeros(n, np.int64))


def cluster(store: Store, keep: np.ndarray, workdir: Path, cfg: ClusterConfig, writers: int = 1) -> Clusters:
    """Cluster the kept records (`writers` processes write MMseqs2's input) in `workdir`, resuming the work an
    interrupted run left there."""
    workdir.mkdir(parents=True, exist_ok=True)
    find_mmseqs(cfg.mmseqs)
    fasta = [workdir / f"input-{i}.fasta" for i in range(max(1, min(writers, len(keep))))]  # none empty
    width = name_width(len(keep))
    if not _database_made(workdir / "mmseqs_tmp" / "input").exists():
        write_input(store, keep, fasta)
    t, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    tsv = run_linclust(fasta, workdir, cfg, workdir / "mmseqs.log")
    seconds, r1 = time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN)
    rep = parse_cluster_tsv(tsv, len(keep), width)
    for f in fasta:
        f.unlink(missing_ok=True)
    shutil.rmtree(tsv.parent)
    out = assign(rep)
    out.tool_seconds = seconds
    out.tool_cpu_seconds = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return out


def search_db(store: Store, keep: np.ndarray, scratch: Path, log: Path, cfg: ClusterConfig, writers: int = 1) -> None:
    """The holdout search's target database, all kept records, in `scratch` (`writers` processes write its
    input), which every rank's `linked_pairs` then reads; kept if an interrupted run made it."""
    scratch.mkdir(parents=True, exist_ok=True)
    if _database_made(scratch / "targets").exists():
        return
    fasta = [scratch / f"targets-{i}.fasta" for i in range(max(1, min(writers, len(keep))))]
    write_input(store, keep, fasta)
    run_mmseqs([[find_mmseqs(cfg.mmseqs), "createdb", *map(str, fasta), str(scratch / "targets"), "--dbtype", "2",
                 "--shuffle", "0"]], log)
    for f in fasta:
        f.unlink()


def linked_pairs(store: Store, keep: np.ndarray, queries: np.ndarray, cluster_size: np.ndarray, scratch: Path,
                 log: Path, cfg: ClusterConfig, part: tuple[int, int] = (0, 1),
                 memory_limit: str | None = None) -> np.ndarray:
    """[m, 2] kept-list positions (query, target): every kept record within the clustering's identity of one of
    the kept records at `queries` (ascending; itself included) over `cfg.coverage` of either sequence, so a
    fragment and the longer record it comes from are a pair, by MMseqs2 searches against the `search_db` in
    `scratch`, one per group of queries' `cluster_size` (`SEARCH_SIZE_BOUNDS`). `part` (rank, ranks): this rank
    searches every ranks-th query of each group; a group's hit limit is the whole group's, so the ranks' pairs
    together are the pairs of one search; `memory_limit`: `search_memory_limit`'s. Searches that an interrupted
    run of the same queries finished in `scratch` are kept, and the others resume from MMseqs2's finished steps."""
    rank, ranks = part
    w, group = name_width(len(keep)), np.searchsorted(SEARCH_SIZE_BOUNDS, cluster_size)
    steps, outputs, done = [], [], []
    for g in np.unique(group):
        mine = queries[group == g][rank::ranks]
        if len(mine) == 0:  # (MMseqs2 refuses an empty query file)
            continue
        name = f"{g}-{rank}-of-{ranks}"  # (a rerun over another number of ranks searches other queries)
        outputs.append(scratch / f"pairs-{name}.tsv")
        done.append(scratch / f"pairs-{name}.done")
        if not done[-1].exists():
            _write_records(store, keep, mine, w, scratch / f"queries-{name}.fasta")
        limit = 300 + int(cluster_size[group == g].max())
        steps.append(search_step(find_mmseqs(cfg.mmseqs), scratch / f"queries-{name}.fasta", scratch / "targets",
                                 outputs[-1], scratch / f"search-{name}", cfg, limit, memory_limit))
    if steps:
        run_mmseqs(steps, log, done)
    return np.concatenate([parse_hits(out, w, cfg.coverage) for out in outputs] or [np.zeros((0, 2), np.int64)])
