"""The build: normalise -> dedup -> cluster -> split/shuffle -> shards + manifest + report.

Each stage writes into OUT/.work/<stage>.tmp and is renamed to OUT/.work/<stage> with a `stage.json`
holding its key (a hash of its inputs and parameters), so a re-run with the same inputs skips finished
stages. The shards are written into OUT/.work/shards.tmp and moved into OUT only when all of them exist:
the old manifest is removed just before the moves and the new one is written last, so an interrupted run
never leaves a manifest that points at partial shards, and until that moment the earlier shard set (with
its manifest) stays intact and readable.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import signal
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import zstandard

from rnalm.files import atomic_write, fsync_path
from rnalm.runlock import RunLock, RunLockError

from . import cluster as clustering
from . import dedup as dd
from .cluster import ClusterConfig
from .comm import SerialComm
from .errors import DataprepError, InputError, ToolError
from .fasta import regular_file
from .normalize import NormalizeConfig
from .shards import (FORMAT_VERSION, MANIFEST_NAME, ZSTD_LEVEL, Manifest, ShardInfo, read_manifest,
                     write_manifest)
from .report import ReportProcess, write_summary
from .split import CANDIDATES_PER_VALID, VALID_MAX_CLUSTER, shard_jobs, shuffled_order, valid_candidates, wanted_valid
from .background import Background
from .shares import normalise_inputs, tsv_lines
from .store import Store, write_permuted
from .write import CLUSTER_FIELDS, WriteContext, write_jobs

DEDUP_ARRAYS = tuple(f.name for f in fields(dd.DedupResult))  # the dedup stage's files (<name>.npy)

PIPELINE_VERSION = 1
TSV_BATCH = 1 << 18  # rows of duplicates.tsv formatted at a time


@dataclass(frozen=True)
class BuildConfig:
    inputs: tuple[str, ...]
    out: str
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    no_cluster: bool = False
    valid_fraction: float = 0.01  # fraction of clusters held out whole for validation
    seed: int = 0
    block_records: int = 4096
    records_per_shard: int = 0  # 0: from shard_mb
    shard_mb: float = 256.0  # target uncompressed payload per shard when records_per_shard is 0
    zstd_level: int = ZSTD_LEVEL
    workers: int = clustering.CPUS  # normalise processes and shard-compression threads (per rank)
    chunk_mb: float = 2.0  # input chunk parsed at once (small: its temporaries are reused, not page-faulted anew)
    dedup_bucket_records: int = dd.BUCKET_RECORDS  # records per dedup hash bucket (bounds dedup memory)
    report: bool = True
    quiet: bool = False

    @property
    def shard_size_is_bound(self) -> bool:
        """--shard-records bounds each shard; --shard-mb (records_per_shard 0) is a target to cut near."""
        return self.records_per_shard > 0


@dataclass
class BuildResult:
    manifest: Manifest
    skipped: list[str]  # stages reused from OUT/.work
    seconds: dict[str, float]


class Log:
    def __init__(self, quiet: bool, rank: int):
        self.quiet, self.rank, self.t0 = quiet or rank != 0, rank, time.perf_counter()
        self._last = 0.0

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[dataprep {time.perf_counter() - self.t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    def warn(self, msg: str) -> None:
        """Printed even when quiet."""
        if self.rank == 0:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def progress(self, msg: str, every: float = 2.0) -> None:
        now = time.perf_counter()
        if now - self._last >= every:
            self._last = now
            self(msg)


def _hash(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _fingerprint(path: str) -> dict:
    if not regular_file(path):
        return {"path": path, "nonce": uuid.uuid4().hex}  # stdin or a pipe: read once, never reused
    st = os.stat(path)  # as git's index: the change time and inode catch a rewrite that kept size and mtime
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns, "inode": st.st_ino}


class _Stage:
    def __init__(self, work: Path, name: str, key: str):
        self.final, self.tmp, self.key = work / name, work / f"{name}.tmp", key

    @property
    def done(self) -> bool:
        return self._recorded().get("key") == self.key

    @property
    def made(self) -> str | None:
        """The id of the run that made the finished stage: a stage computed from its output keys on it, as
        MMseqs2 may cluster (and number clusters) otherwise when run again with the same parameters."""
        return self._recorded().get("made")

    def _recorded(self, where: Path | None = None) -> dict:
        try:
            return json.loads(((where or self.final) / "stage.json").read_text())
        except (OSError, ValueError):
            return {}

    @property
    def interrupted(self) -> bool:
        """An interrupted run of the same key left its tmp."""
        return self._recorded(self.tmp).get("key") == self.key

    def begin(self, resume: bool = False) -> Path:
        """An empty tmp; with `resume`, the tmp that an interrupted run of the same key left, as it is (MMseqs2's
        finished steps, hours each at RiNALMo's size, are kept)."""
        if resume and self.interrupted:
            return self.tmp
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        (self.tmp / "stage.json").write_text(json.dumps({"key": self.key}))
        return self.tmp

    def commit(self) -> None:
        """tmp -> final, durably: a node crash after the rename must not leave a stage of empty files that a
        rerun takes as finished."""
        (self.tmp / "stage.json").write_text(json.dumps({"key": self.key, "made": uuid.uuid4().hex}))
        for f in self.tmp.rglob("*"):
            if f.is_file():
                fsync_path(f)
        fsync_path(self.tmp)
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.tmp, self.final)
        fsync_path(self.final.parent)


# ------------------------------------------------------------------------------------------ normalise
def normalise(cfg: BuildConfig, stage: _Stage, comm, log: Log) -> None:
    tmp = stage.begin() if comm.rank == 0 else stage.tmp
    normalise_inputs(cfg, tmp, comm, log)
    if comm.rank == 0:
        stage.commit()


# -------------------------------------------------------------------------------------------- dedup
def dedup(store: Store, stage: _Stage, comm, bucket_records: int) -> None:
    res = dd.dedup(store, comm, bucket_records)
    if res is None:  # not rank 0
        return
    tmp = stage.begin()
    for name in DEDUP_ARRAYS:
        np.save(tmp / f"{name}.npy", getattr(res, name))
    stage.commit()


# ------------------------------------------------------------------------------------------ shuffle
def shuffle(cfg: BuildConfig, store: Store, keep: np.ndarray, stage: _Stage) -> None:
    """The kept records laid out in shard order (`split.shuffled_order`); runs while MMseqs2 clusters."""
    tmp = stage.begin()
    write_permuted(store, keep[shuffled_order(len(keep), cfg.seed)], tmp)
    stage.commit()


# ------------------------------------------------------------------------------------------ cluster
def cluster(cfg: BuildConfig, store: Store, stage: _Stage, log: Log) -> None:
    keep = np.load(stage.final.parent / "dedup" / "keep.npy")
    tmp = stage.begin(resume=not cfg.no_cluster and _resumed(stage, log))
    if cfg.no_cluster:
        cl = clustering.singletons(len(keep))
    else:
        log(f"cluster: mmseqs linclust on {len(keep):,} sequences (log: {stage.final / 'mmseqs.log'})")
        cl = clustering.cluster(store, keep, tmp, cfg.cluster, writers=cfg.workers)
    (tmp / "mmseqs_time.json").write_text(json.dumps({"wall": cl.tool_seconds, "cpu": cl.tool_cpu_seconds}))
    np.save(tmp / "keep.npy", keep)
    for name in CLUSTER_FIELDS:
        np.save(tmp / f"{name}.npy", getattr(cl, name))
    stage.commit()


# ------------------------------------------------------------------------------------------ holdout
def holdout(cfg: BuildConfig, store: Store, stage: _Stage, comm, log: Log) -> None:
    """The cluster pairs that validation must not split (`split.valid_clusters`): an MMseqs2 search of the
    validation candidates' records against all kept records, its queries shared between the ranks."""
    cl_dir = stage.final.parent / "cluster"
    keep, cluster_id = np.load(cl_dir / "keep.npy"), np.load(cl_dir / "cluster_id.npy")
    candidates = valid_candidates(cluster_id, store.seqh[keep], cfg.valid_fraction, cfg.seed)
    queries = np.flatnonzero(np.isin(cluster_id, candidates))
    scratch = stage.tmp / "mmseqs_tmp"
    if comm.rank == 0:
        stage.begin(resume=_resumed(stage, log))
        scratch.mkdir(exist_ok=True)
        ranks = f" x {comm.size} ranks (logs: {stage.final}/mmseqs*.log)" if comm.size > 1 else \
            f" (log: {stage.final / 'mmseqs.log'})"
        log(f"holdout: mmseqs search of {len(queries):,} records of {len(candidates):,} candidate validation "
            f"clusters against all {len(keep):,}{ranks}")
        if len(queries):
            clustering.search_db(store, keep, scratch, stage.tmp / "mmseqs.log", cfg.cluster, writers=cfg.workers)
    comm.barrier()
    size = np.bincount(cluster_id)[cluster_id[queries]]
    hosts = comm.allgather(platform.node())
    pairs = clustering.linked_pairs(store, keep, queries, size, scratch, stage.tmp / _rank_log(comm.rank),
                                    cfg.cluster, (comm.rank, comm.size),
                                    clustering.search_memory_limit(hosts.count(hosts[comm.rank])))
    # to rank 0 through the shared file system: a pickled MPI message is limited to 2 GiB
    np.save(scratch / f"linked-{comm.rank}.npy", _unique_rows(cluster_id[pairs]))
    comm.barrier()
    if comm.rank == 0:
        linked = np.concatenate([np.load(scratch / f"linked-{r}.npy") for r in range(comm.size)])
        np.save(stage.tmp / "linked.npy", _unique_rows(linked))
        shutil.rmtree(scratch, ignore_errors=True)
        stage.commit()


def _resumed(stage: _Stage, log: Log) -> bool:
    if stage.interrupted:
        log(f"{stage.final.name}: resuming the MMseqs2 work of an interrupted run in {stage.tmp}")
    return stage.interrupted


def _one_mmseqs(comm, version: str) -> str:
    """Every rank's MMseqs2 version, which must be one: each rank runs a share of the holdout search."""
    versions = comm.allgather(version)
    if len(set(versions)) > 1:
        raise ToolError("MMseqs2 differs between the MPI ranks (" + ", ".join(
            f"rank {r}: {v}" for r, v in enumerate(versions)) + "): install one version on every node")
    return version


def _rank_log(rank: int) -> str:
    return "mmseqs.log" if rank == 0 else f"mmseqs-rank{rank}.log"


def _unique_rows(a: np.ndarray) -> np.ndarray:
    return np.unique(a, axis=0) if len(a) else a.reshape(0, 2)


def _records_per_shard(cfg: BuildConfig, store: Store, keep: np.ndarray) -> int:
    if cfg.shard_size_is_bound:
        return cfg.records_per_shard
    if len(keep) == 0:  # (ranks > 0 of a build that rank 0 refuses as empty: they wait for its abort)
        return cfg.block_records
    per_record = float(store.seq_len[keep].mean() + store.id_len[keep].mean()) + 40
    blocks = max(1, round(cfg.shard_mb * 1e6 / per_record / cfg.block_records))
    return blocks * cfg.block_records


def discard_unfinished(out: Path, fresh: bool) -> None:
    """After an input error: the output directory when the failed build created it, else its unfinished stages
    (finished stages and a published shard set stay). Not after a tool's failure, whose log is in its stage."""
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
        return
    for tmp in (out / ".work").glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------------------------------- build
def build(cfg: BuildConfig, comm=None) -> BuildResult:
    """The build into cfg.out, which rank 0 holds (OUT/.work/run.lock) while it runs: a second build into the
    same OUT would remove the first one's unfinished stages under it."""
    comm = comm or SerialComm()
    streams = [p for p in cfg.inputs if not regular_file(p)]
    if comm.size > 1 and streams:
        raise InputError(f"{streams[0]}: stdin or a pipe cannot be shared between MPI ranks; write it to a file first")
    out = Path(cfg.out)
    lock = None
    if comm.rank == 0:
        try:
            (out / ".work").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"{out}: cannot create the output directory ({e.strerror}: {e.filename})") from None
        lock = RunLock(out / ".work", option="--out")
        try:
            lock.acquire()
        except RunLockError as e:
            raise DataprepError(str(e)) from None
    try:
        return _build(cfg, comm)
    finally:
        if lock is not None:
            lock.release()


def _stage_keys(cfg: BuildConfig, comm) -> tuple[dict[str, str], str | None]:
    """Each stage's key (a hash of what its output depends on) and the MMseqs2 version (None without clustering)."""
    inputs = comm.bcast([_fingerprint(p) for p in cfg.inputs] if comm.rank == 0 else None)  # one view of them
    keys = {"normalise": _hash(PIPELINE_VERSION, inputs, asdict(cfg.normalize))}
    keys["dedup"] = _hash(keys["normalise"], "dedup")
    # another MMseqs2 version clusters differently, so its version is part of the cluster key (asked up front: a
    # missing MMseqs2 stops the run before it normalises)
    mmseqs = None if cfg.no_cluster else _one_mmseqs(comm, clustering.mmseqs_version(cfg.cluster.mmseqs))
    keys["cluster"] = _hash(keys["dedup"], cfg.no_cluster,
                            None if cfg.no_cluster else [cfg.cluster.min_seq_id, cfg.cluster.coverage,
                                                         cfg.cluster.cov_mode, mmseqs])
    search = clustering.search_step("mmseqs", Path("q"), Path("t"), Path("o"), Path("tmp"),
                                    replace(cfg.cluster, threads=1), 0)
    keys["holdout"] = _hash(keys["cluster"], cfg.valid_fraction, cfg.seed, search, clustering.SEARCH_SIZE_BOUNDS,
                            CANDIDATES_PER_VALID, VALID_MAX_CLUSTER)
    keys["shuffle"] = _hash(keys["dedup"], cfg.seed)
    return keys, mmseqs


def _reuse_published(out: Path, log: Log, comm) -> Manifest:
    """The published shard set, which is this build's: its warnings again, and a killed later run's unpublished
    shard set removed."""
    log(f"shards: up to date ({out / MANIFEST_NAME})")
    if comm.rank == 0:
        shutil.rmtree(_staging(out), ignore_errors=True)
    manifest = read_manifest(out)
    for warning in manifest.warnings:
        log.warn(warning)
    return manifest


def _build(cfg: BuildConfig, comm) -> BuildResult:
    log = Log(cfg.quiet, comm.rank)
    out, seconds, skipped = Path(cfg.out), {}, []
    if comm.rank == 0 and finish_publishing(out):
        log.warn(f"finished publishing the shard set that an interrupted build had staged: {out / MANIFEST_NAME} "
                 "is now that build's")
    comm.barrier()
    keys, mmseqs = _stage_keys(cfg, comm)
    stages = {name: _Stage(out / ".work", name, key) for name, key in keys.items()}

    def run(name, fn, *args, collective=True):
        if comm.bcast(stages[name].done if comm.rank == 0 else None):
            skipped.append(name)
            log(f"{name}: up to date, reused {stages[name].final}")
            return
        t = time.perf_counter()
        if collective or comm.rank == 0:
            fn(*args)
        comm.barrier()
        seconds[name] = time.perf_counter() - t

    run("normalise", normalise, cfg, stages["normalise"], comm, log)
    store = Store(stages["normalise"].final)
    log(f"normalise: {len(store):,} valid records")
    run("dedup", lambda: dedup(store, stages["dedup"], comm, cfg.dedup_bucket_records))
    keep = np.load(stages["dedup"].final / "keep.npy")
    if comm.rank == 0 and len(keep) == 0:
        raise InputError(f"{', '.join(cfg.inputs)}: no records left after normalisation and dedup: "
                         f"{_rejects_in_short(stages['normalise'].final, cfg.inputs)}")
    rps = _records_per_shard(cfg, store, keep)
    params = _params(cfg, rps)
    build_key = _hash(keys["holdout"], params)
    if comm.bcast(_manifest_current(out, build_key, cfg.report) if comm.rank == 0 else None):
        skipped += ["cluster"] * stages["cluster"].done + ["shards"]
        return BuildResult(_reuse_published(out, log, comm), skipped, seconds)

    if comm.rank == 0 and (out / MANIFEST_NAME).exists():
        log.warn(f"{out / MANIFEST_NAME} is another build's (other inputs or parameters) or incomplete: this build "
                 "replaces that shard set when it publishes its own")
    sources = res = report = shuffling = None
    if comm.rank == 0:  # background processes that need no clusters, overlapping MMseqs2
        sources, res = _source_counts(cfg, store, stages)
        if cfg.report:  # it redraws the report in place: no summary until this build's, so a failed build's
            (out / "report" / "summary.json").unlink(missing_ok=True)  # plots are never taken as up to date
            report = ReportProcess(out / "report", store, keep, sources)
        if not cfg.no_cluster and not stages["shuffle"].done:
            shuffling = Background("shuffle", shuffle, cfg, store, keep, stages["shuffle"])
    try:
        run("cluster", cluster, cfg, store, stages["cluster"], log, collective=False)
        if "cluster" in seconds:
            mm = json.loads((stages["cluster"].final / "mmseqs_time.json").read_text())
            seconds["mmseqs"], seconds["mmseqs_cpu"] = mm["wall"], mm["cpu"]
        if report:
            report.clusters_ready(stages["cluster"].final)
        if _searches(cfg):  # its links name the clusters of this cluster stage
            stages["holdout"].key = comm.bcast(_hash(keys["holdout"], stages["cluster"].made) if comm.rank == 0
                                               else None)
            run("holdout", holdout, cfg, store, stages["holdout"], comm, log)
        t = time.perf_counter()
        if shuffling:
            shuffling.join()
            seconds["shuffle_wait"] = time.perf_counter() - t  # what clustering did not hide
        comm.barrier()
        t = time.perf_counter()
        infos, clusters = _write_shards(cfg, out, store, stages, rps, comm, log)
        seconds["shards"] = time.perf_counter() - t
        manifest = None
        if comm.rank == 0:
            shards = sorted((i for part in infos for i in part), key=lambda s: (s.split != "train", s.path))
            manifest = _finish(cfg, out, store, stages, shards, params, build_key, clusters, seconds, log,
                               sources, res, report, mmseqs)
    except BaseException:
        for process in (report, shuffling):
            if process:
                process.stop()
        raise
    comm.barrier()
    return BuildResult(manifest or read_manifest(out), skipped, seconds)


def _write_shards(cfg: BuildConfig, out: Path, store: Store, stages: dict, rps: int, comm,
                  log: Log) -> tuple[list, tuple[int, int]]:
    """Split by cluster, shuffle, write this rank's shards; (every rank's ShardInfos on rank 0, (clusters,
    validation clusters))."""
    if comm.rank == 0:  # the earlier shard set and its manifest stay untouched until `_publish`
        shutil.rmtree(_staging(out), ignore_errors=True)  # left by a killed run
        _staging(out).mkdir()
        for stale in [*out.glob("train/*.tmp-*"), *out.glob("valid/*.tmp-*")]:  # (from a killed older version)
            stale.unlink()
    comm.barrier()
    cl_dir = stages["cluster"].final
    cluster_id = np.load(cl_dir / "cluster_id.npy")
    n_clusters = int(cluster_id.max()) + 1 if len(cluster_id) else 0
    linked = np.load(stages["holdout"].final / "linked.npy") if _searches(cfg) else None
    jobs = shard_jobs(cluster_id, store.seqh[np.load(cl_dir / "keep.npy")], cfg.valid_fraction, cfg.seed, rps,
                      cfg.shard_size_is_bound, linked)
    shuffled = not cfg.no_cluster  # (then `shuffle` ran while MMseqs2 did)
    ctx = WriteContext(str(_staging(out)), str(stages["shuffle" if shuffled else "normalise"].final), str(cl_dir),
                       block_records=cfg.block_records, zstd_level=cfg.zstd_level, shuffled=shuffled)
    mine = [j for i, j in enumerate(jobs) if i % comm.size == comm.rank]
    log(f"shards: writing {len(jobs)} shards ({_shard_plan(jobs)}) with {cfg.workers} compression threads"
        + (f" x {comm.size} ranks" if comm.size > 1 else ""))
    done = []

    def progress(info: ShardInfo) -> None:
        done.append(info)
        log.progress(f"shards: {len(done)}/{len(mine)} written ({info.path}, {info.bytes / 1e6:,.1f} MB)")

    in_valid = [j.records for j in jobs if j.split == "valid"]
    valid = len(np.unique(cluster_id[np.concatenate(in_valid)])) if in_valid else 0
    return comm.gather(write_jobs(ctx, mine, cfg.workers, progress)), (n_clusters, valid)


def _searches(cfg: BuildConfig) -> bool:
    """Whether validation is checked against train with MMseqs2 (not without clustering or validation)."""
    return not cfg.no_cluster and cfg.valid_fraction > 0


def _shard_plan(jobs: list) -> str:
    """Shards and records per shard of each split, e.g. "train 3 of 8,333-8,334 records, valid 1 of 100 records"
    (printing the --shard-mb capacity instead said "about 1,503,232 records each" for 1 shard of 26,425)."""
    parts = []
    for split in ("train", "valid"):
        sizes = [len(j.records) for j in jobs if j.split == split]
        if sizes:
            lo, hi = min(sizes), max(sizes)
            parts.append(f"{split} {len(sizes)} of {lo:,}{f'-{hi:,}' if hi > lo else ''} records")
    return ", ".join(parts) or "no records"


def _staging(out: Path) -> Path:
    """Where the new shards (and rejects/duplicates TSVs) are written before `_publish` moves them into OUT."""
    return out / ".work" / "shards.tmp"


@contextlib.contextmanager
def _stops_held():
    """Ctrl-C and SIGTERM that arrive inside are acted on when it ends (in the main thread; elsewhere no handler
    can be set). Publishing a large set takes seconds, and a stop inside it left old and new shards mixed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: held.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if held:
            signal.raise_signal(held[0])


def _publish(out: Path, manifest: Manifest) -> None:
    """Replace the earlier shard set by the staged one, with Ctrl-C and SIGTERM held until it is done. The new
    manifest is written into the staging folder first (the only step that needs disk space: a full disk leaves
    the earlier set as it was), then the shards are renamed into place and the manifest last; a crash in
    between leaves OUT without a manifest (no reader takes a mixed set) and the next build finishes the job
    (`finish_publishing`)."""
    with _stops_held():
        for split in {Path(s.path).parent for s in manifest.shards}:
            fsync_path(_staging(out) / split)  # (each shard file is synced, its rename into staging not yet)
        write_manifest(_staging(out), manifest)
        finish_publishing(out)


def finish_publishing(out: Path) -> bool:
    """Move a staged shard set whose manifest is written (`_publish`, or one a crash cut short) into OUT: the
    TSVs and shards by rename, the earlier set's other shards removed, the manifest last. False when there is
    none to finish."""
    staging = _staging(out)
    if not (staging / MANIFEST_NAME).is_file():
        return False
    manifest = read_manifest(staging)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # from here on, no manifest until all shards are in place
    fsync_path(out)  # (durably: after a power loss the earlier manifest must not name a mixed set)
    for name in ("rejects.tsv", "duplicates.tsv"):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    listed = {s.path: s.bytes for s in manifest.shards}
    for path, size in sorted(listed.items()):
        if (staging / path).exists():  # (else moved before a crash)
            (out / path).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / path, out / path)
        elif not (out / path).is_file() or (out / path).stat().st_size != size:  # gone, or the earlier set's
            shutil.rmtree(staging, ignore_errors=True)  # it cannot be published, so that the next build makes one
            raise DataprepError(f"{staging / MANIFEST_NAME} names {path}, which is neither there nor in {out} "
                                f"({size:,} bytes): the staged shard set is incomplete (removed); build again")
    for old in [*out.glob("train/shard-*.tar"), *out.glob("valid/shard-*.tar")]:
        if str(old.relative_to(out)) not in listed:
            old.unlink()
    for split in {Path(p).parent for p in listed}:
        fsync_path(out / split)  # the renames are durable before the manifest that names them
    os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)  # needs no space
    fsync_path(out)
    shutil.rmtree(staging, ignore_errors=True)
    return True


def _params(cfg: BuildConfig, rps: int) -> dict:
    p = asdict(cfg)
    for transient in ("out", "quiet", "workers", "report", "chunk_mb", "dedup_bucket_records"):
        p.pop(transient)
    p["cluster"].pop("threads")
    p["records_per_shard"] = rps
    p["shard_size"] = "at_most" if cfg.shard_size_is_bound else "target"  # the same rps cuts differently
    p["pipeline_version"] = PIPELINE_VERSION
    return p


def _manifest_current(out: Path, build_key: str, report: bool) -> bool:
    if report and _summary_key(out / "report" / "summary.json") != build_key:  # none (--no-report, a failed
        return False                                                          # build), or another build's
    try:
        m = read_manifest(out)
    except Exception:
        return False
    if m.params.get("build_key") != build_key:
        return False
    return all((out / s.path).is_file() and (out / s.path).stat().st_size == s.bytes for s in m.shards)


def _summary_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("build_key")
    except (OSError, ValueError):
        return None


def _source_counts(cfg: BuildConfig, store: Store, stages: dict) -> tuple[list[dict], dict]:
    """Per-input records / rejected / duplicates / kept, and the dedup result arrays."""
    sources = json.loads((stages["normalise"].final / "sources.json").read_text())
    for s, name in zip(sources, cfg.inputs):  # as this run names them (a reused stage: the run that made it)
        s["path"] = name
    res = {n: np.load(stages["dedup"].final / f"{n}.npy") for n in DEDUP_ARRAYS}
    n_src = len(sources)
    for field_name, idx in (("duplicates", res["dup"]), ("kept", res["keep"])):
        for s, c in zip(sources, np.bincount(store.source[idx], minlength=n_src).tolist()):
            s[field_name] = c
    for s, c in zip(sources, np.bincount(store.source[res["conflict"]], minlength=n_src).tolist()):
        s["rejected"] += c
    return sources, res


def _finish(cfg: BuildConfig, out: Path, store: Store, stages: dict, shards: list[ShardInfo], params: dict,
            build_key: str, clusters: tuple[int, int], seconds: dict, log: Log, sources: list[dict], res: dict,
            report: ReportProcess | None, mmseqs: str | None) -> Manifest:
    n_clusters, n_valid = clusters
    names = [s["path"] for s in sources]
    _write_rejects(_staging(out), stages["normalise"].final, store, res, names)
    _write_duplicates(_staging(out), store, res, names)
    counts = {"records_in": sum(s["records"] for s in sources), "rejected": sum(s["rejected"] for s in sources),
              "duplicates": int(len(res["dup"])), "kept": int(len(res["keep"])), "clusters": n_clusters}
    for split in ("train", "valid"):
        mine = [s for s in shards if s.split == split]
        counts[split] = {"records": sum(s.records for s in mine), "tokens": sum(s.tokens for s in mine),
                         "shards": len(mine)}
    counts["valid"]["clusters"] = n_valid
    assert counts["records_in"] == counts["rejected"] + counts["duplicates"] + counts["kept"], counts
    assert counts["kept"] == counts["train"]["records"] + counts["valid"]["records"], counts
    tools = {"mmseqs": mmseqs,
             "python": platform.python_version(), "numpy": np.__version__, "zstandard": zstandard.__version__,
             "shard_format": FORMAT_VERSION}
    warnings = []
    wanted = wanted_valid(n_clusters, cfg.valid_fraction)
    if cfg.valid_fraction > 0 and wanted == 0:
        warnings.append(f"the validation split is empty: --valid-fraction {cfg.valid_fraction} of {n_clusters:,} "
                        f"cluster(s) holds out none (a cluster is never split), so training gets no validation data")
    if cfg.normalize.label_key and not store.label_len[res["keep"]].any():  # (a typo in the key was silent)
        warnings.append(f"no kept record's header holds {cfg.normalize.label_key}=...: --label-key "
                        f"{cfg.normalize.label_key} gave every record an empty label")
    if n_valid < wanted:
        warnings.append(f"validation holds {n_valid:,} clusters, not the {wanted:,} of --valid-fraction "
                        f"{cfg.valid_fraction}: the other candidates had near-duplicates in train (the MMseqs2 "
                        f"search of {stages['holdout'].final / 'mmseqs.log'})")
    for warning in warnings:
        log.warn(warning)
    manifest = Manifest(shards=shards, sources=sources, params={**params, "build_key": build_key}, tools=tools,
                        counts=counts, warnings=warnings, out_dir=str(out))
    if report is not None:
        report.join()
        write_summary(out / "report", counts, sources, shards, seconds, build_key)
    else:  # an earlier build's report would describe other shards
        shutil.rmtree(out / "report", ignore_errors=True)
    _publish(out, manifest)
    log(f"done: {counts['records_in']:,} records in, {counts['rejected']:,} rejected, "
        f"{counts['duplicates']:,} duplicates, {counts['kept']:,} kept in {n_clusters:,} clusters; "
        f"train {counts['train']['records']:,} / valid {counts['valid']['records']:,} records; {out / MANIFEST_NAME}")
    return manifest


def _rejects_in_short(norm_dir: Path, names: tuple[str, ...], shown: int = 3) -> str:
    """The first rejects in a line (the error of a build that kept nothing, whose output is then removed)."""
    rows = [line.split("\t", 3) for line in tsv_lines(norm_dir / "rejects.tsv")]
    if not rows:
        return "the input holds no records"
    first = "; ".join(f"{names[int(s)]}:{ln} {rid!r}: {reason}" for s, ln, rid, reason in rows[:shown])
    return f"{len(rows):,} rejected, e.g. {first}" + (" ..." if len(rows) > shown else "")


def _write_rejects(out: Path, norm_dir: Path, store: Store, res: dict, names: list[str]) -> None:
    rows = []
    for line in tsv_lines(norm_dir / "rejects.tsv"):
        s, ln, rid, reason = line.split("\t", 3)
        rows.append((int(s), int(ln), rid, reason))
    c, f = res["conflict"], res["conflict_first"]
    if len(c):
        for (rid, s, ln, fs, fl) in zip(store.ids_of(c), store.source[c].tolist(), store.line[c].tolist(),
                                         store.source[f].tolist(), store.line[f].tolist()):
            rows.append((s, ln, rid, f"duplicate id with a different sequence (first seen at {names[fs]}:{fl})"))
        rows.sort(key=lambda r: (r[0], r[1]))
    text = "source\tid\tline\treason\n" + "".join(f"{names[s]}\t{rid}\t{ln}\t{reason}\n" for s, ln, rid, reason in rows)
    atomic_write(out / "rejects.tsv", text, durable=True)


def _write_duplicates(out: Path, store: Store, res: dict, names: list[str]) -> None:
    """Written TSV_BATCH rows at a time: a corpus can hold tens of millions of duplicates."""
    d, r = res["dup"], res["dup_rep"]
    order = np.argsort(d)  # the store is in input order
    d, r = d[order], r[order]

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("kept_id\tduplicate_id\tduplicate_source\tduplicate_line\n")
            for a in range(0, len(d), TSV_BATCH):
                db, rb = d[a: a + TSV_BATCH], r[a: a + TSV_BATCH]
                rows = zip(store.ids_of(rb), store.ids_of(db), store.source[db].tolist(), store.line[db].tolist())
                f.write("".join(f"{k}\t{i}\t{names[s]}\t{ln}\n" for k, i, s, ln in rows))
    atomic_write(out / "duplicates.tsv", write, durable=True)
