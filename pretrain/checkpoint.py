"""Crash-safe DeepSpeed checkpoints: temp tag dir -> rename -> `latest` pointer (atomic, last); keep newest K.

Layout of `out_dir/checkpoints/`:
    step00001000/            DeepSpeed files (zero_pp_rank_*_{model,optim}_states.pt, ...) plus ours:
        trainer_state.json   step, tokens, samples, every rank's loader state, model config (written last)
        rng_rank{r}.pt       torch / CUDA / numpy / python RNG states of rank r (DeepSpeed saves none)
    step00001000_universal/  for another world size: by the trainer when it resumes, or `pretrain.convert --universal`
    latest                   text file with the newest good tag (DeepSpeed's own pointer format)
    .tmp-step00001000/       only while saving; a crash leaves it behind and the next start deletes it
    .old-step00001000/       only while a save replaces a checkpoint of the same step; a crash that leaves it
                             without its successor has the next start put it back
A directory gets its final name only after every rank has written into it and flushed its files to disk (DeepSpeed
fsyncs nothing), so a name is a complete checkpoint, also after a node crash; the pointer moves after the rename,
so it never names a partial one.
"""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rnalm.files import atomic_write, fsync_path, remove_stale_temps

LATEST = "latest"
STATE_FILE = "trainer_state.json"
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"
UNIVERSAL_SUFFIX = "_universal"
_TAG_RE = re.compile(r"^step(\d{8})$")
# the files of one rank in a checkpoint: DeepSpeed's partitions (zero_pp_rank_<r>_mp_rank_00_*), our RNG state
_RANK_FILE_RE = re.compile(r"(zero_pp_rank_|rng_rank)(\d+)")
# what torch.save's RuntimeError says when the file could not be written (the OSError's errno is lost)
TORCH_WRITE_FAILURES = ("iostream error", "unexpected pos", "PytorchStreamWriter failed", "file write failed")


class CheckpointError(RuntimeError):
    pass


class CheckpointSaveError(CheckpointError):
    """A save that failed (e.g. a full disk); the checkpoints saved before it are intact."""


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)), "numpy_pos": int(np_state[2]),
             "numpy_has_gauss": int(np_state[3]), "numpy_gauss": float(np_state[4])}
    if torch.cuda.is_available():  # this rank's device only: a resume may see another number of GPUs per node
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    cuda = state.get("cuda") if torch.cuda.is_available() else None
    if isinstance(cuda, list):  # saved before 2026-12-07: every visible device's state, valid in the same layout
        cuda = cuda[torch.cuda.current_device()] if len(cuda) == torch.cuda.device_count() else None
    if cuda is not None:
        torch.cuda.set_rng_state(cuda)


def read_trainer_state(ckpt_dir: str | Path, tag: str) -> dict[str, Any]:
    path = Path(ckpt_dir) / tag / STATE_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable trainer state ({e})") from e


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Finished step checkpoints, oldest first (a finished one has its final name and trainer_state.json)."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    tags = [p.name for p in root.iterdir() if _TAG_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(tags)


def latest_tag(ckpt_dir: str | Path) -> str | None:
    """The newest complete checkpoint. Not the `latest` pointer's (written for DeepSpeed's own tools): a crash
    between a checkpoint's rename and the pointer's update leaves it one save behind."""
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def check_files(folder: Path, world_size: int) -> None:
    """A CheckpointError naming the first file of a step checkpoint written by `world_size` ranks that is missing
    (every rank has the files any rank has, its own number in their names) or is not a complete torch.save archive
    (truncated: no zip directory at its end). Names no cause when the checkpoint is whole."""
    names = {p.name for p in folder.iterdir() if p.is_file()}
    templates = {_RANK_FILE_RE.sub(r"\1{r}", n) for n in names if _RANK_FILE_RE.search(n)} | {"rng_rank{r}.pt"}
    for template in sorted(templates):
        for r in range(world_size):
            if template.format(r=r) not in names:
                raise CheckpointError(f"{folder / template.format(r=r)}: missing (the checkpoint was written by "
                                      f"{world_size} ranks)")
    for name in sorted(n for n in names if n.endswith(".pt")):
        if not zipfile.is_zipfile(folder / name):
            raise CheckpointError(f"{folder / name}: damaged checkpoint file (not a complete torch.save archive; "
                                  "truncated or partly written?)")


def check_archives(folder: Path, rank: int = 0, world_size: int = 1) -> None:
    """A CheckpointError naming the first .pt file under `folder` whose members fail their CRC (damaged after it
    was written: torch.load reads such bytes without a word). Reads every file whole; with world_size > 1 it is
    collective: each rank reads every world_size-th file and every rank raises the same error."""
    files = sorted(folder.rglob("*.pt"))
    errors = [e for path in files[rank::world_size] if (e := _archive_error(path))]
    if world_size > 1:
        gathered: list[list[str]] = [[] for _ in range(world_size)]
        dist.all_gather_object(gathered, errors)
        errors = sorted(e for rank_errors in gathered for e in rank_errors)
    if errors:
        raise CheckpointError(errors[0])


def _archive_error(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"{path}: damaged checkpoint file ({e})"
    return None if bad is None else f"{path}: damaged checkpoint file (its member {bad} fails its CRC check)"


class Checkpointer:
    """Save/load on every rank of the DeepSpeed engine; filesystem is shared by all ranks."""

    def __init__(self, ckpt_dir: str | Path, keep: int, rank: int, world_size: int) -> None:
        if keep < 1:
            raise ValueError(f"checkpoint.keep must be >= 1, got {keep}")
        self.root = Path(ckpt_dir)
        self.keep, self.rank, self.world_size = keep, rank, world_size

    def remove_partial_saves(self) -> list[str]:
        """Rank 0, at start-up: delete temp dirs left by a save that crashed, checkpoints whose pruning was cut
        short (no trainer_state.json: _prune deletes it first) and a pointer's temp file; put back a replaced
        checkpoint whose successor never got its name."""
        removed = []
        if self.rank == 0 and self.root.is_dir():
            for p in sorted(self.root.iterdir()):
                if p.name.startswith(OLD_PREFIX) and not (self.root / p.name[len(OLD_PREFIX):]).exists():
                    os.rename(p, self.root / p.name[len(OLD_PREFIX):])
                elif p.is_dir() and p.name.startswith((TMP_PREFIX, OLD_PREFIX)):
                    shutil.rmtree(p)
                    removed.append(p.name)
                elif p.is_dir() and _TAG_RE.match(p.name) and not (p / STATE_FILE).exists():
                    _remove_checkpoint(p)
                    removed.append(p.name)
            remove_stale_temps(self.root / LATEST)
        _barrier()
        return removed

    def save(self, engine, step: int, state: dict[str, Any]) -> str:
        """Collective. `state` (JSON-able, from rank 0) goes into trainer_state.json; returns the tag."""
        tag = tag_for(step)
        tmp_tag = TMP_PREFIX + tag
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / tmp_tag, ignore_errors=True)
        _barrier()
        tmp_dir = self.root / tmp_tag
        with self._failing_save_named(tmp_dir):
            engine.save_checkpoint(str(self.root), tag=tmp_tag, client_state={"step": step}, save_latest=False)
            torch.save(rng_state(), tmp_dir / f"rng_rank{self.rank}.pt")
            for f in files_of_rank(tmp_dir, self.rank):  # each rank its own: a node flushes what it wrote
                fsync_path(f)
        _barrier()
        if self.rank == 0:
            fsync_path(tmp_dir)
            with self._failing_save_named(tmp_dir):
                atomic_write(tmp_dir / STATE_FILE, json.dumps(state), durable=True)
            self._publish(tmp_dir, self.root / tag)
            atomic_write(self.root / LATEST, tag, durable=True)
            self._prune(keep_also=tag)
        _barrier()
        return tag

    @contextlib.contextmanager
    def _failing_save_named(self, tmp_dir: Path):
        """A write that failed (full disk, quota, I/O error) as one line; torch.save says only 'basic_ios::clear:
        iostream error' or 'unexpected pos ...'. Other errors (a peer lost in DeepSpeed's collectives) pass."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            if not isinstance(e, OSError) and not any(m in str(e) for m in TORCH_WRITE_FAILURES):
                raise
            try:
                free = f"{shutil.disk_usage(self.root).free / 2**30:.2f} GiB free there"
            except OSError as why:
                free = f"free space unknown ({why.strerror or why})"
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CheckpointSaveError(
                f"rank {self.rank} could not write checkpoint {tmp_dir}: {reason}; {free} (a save needs room for one "
                f"checkpoint more than checkpoint.keep={self.keep}); the checkpoints before it are intact and the "
                "next start resumes from the newest") from e

    def load(self, engine, tag: str) -> dict[str, Any]:
        """Collective. Restores engine (model, optimizer, LR scheduler) and this rank's RNG; returns the state."""
        try:
            path, _client = engine.load_checkpoint(str(self.root), tag=tag, load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        except ValueError as e:
            if "parameter groups" not in str(e):
                raise
            raise CheckpointError(
                f"{self.root / tag}: its optimizer has another number of parameter groups than this run's ({e}); "
                "train.zero_init=true runs before 2026-12-03 saved one group (no weight decay anywhere): resume "
                "them with the version that wrote them, or start a new train.out_dir") from e
        if path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {self.root / tag}")
        state = read_trainer_state(self.root, tag)
        if state.get("world_size") == self.world_size:  # check_files found every rank's RNG file
            set_rng_state(torch.load(self.root / tag / f"rng_rank{self.rank}.pt", weights_only=True))
        else:  # another world size: ranks no longer map 1:1; reseed deterministically
            torch.manual_seed(hash((state.get("seed", 0), state["step"], self.rank)) & 0xFFFFFFFF)
        return state

    def _publish(self, tmp_dir: Path, final: Path) -> None:
        """tmp_dir -> final. A checkpoint already there (same step saved before, e.g. a resumed run stopped
        before its first step) is moved aside first and deleted last, so a crash never leaves neither. A universal
        form of the tag goes first: it was converted from an earlier checkpoint of this step (one replaced, or
        deleted by hand to roll back), and a resume at another world size would load it."""
        shutil.rmtree(self.root / (final.name + UNIVERSAL_SUFFIX), ignore_errors=True)
        old = self.root / (OLD_PREFIX + final.name)
        if final.exists():
            os.rename(final, old)
        os.rename(tmp_dir, final)
        fsync_path(self.root)
        shutil.rmtree(old, ignore_errors=True)

    def _prune(self, keep_also: str) -> None:
        tags = complete_tags(self.root)
        for old in tags[:-self.keep]:
            if old == keep_also:
                continue
            _remove_checkpoint(self.root / old)


def _remove_checkpoint(folder: Path) -> None:
    """Its state file first (a crash mid-way leaves nothing 'complete' that is half deleted: the next start-up
    finishes the job), then its universal form, then the rest. Errors are ignored, as a file held open elsewhere
    (NFS) may stay."""
    (folder / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder.with_name(folder.name + UNIVERSAL_SUFFIX), ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)


def files_of_rank(folder: Path, rank: int) -> list[Path]:
    """The files of a checkpoint being saved that `rank` wrote: those named after it; rank 0 also the unnamed
    ones (ZeRO-1/2's mp_rank_00_model_states.pt)."""
    def owner(name: str) -> int:
        m = _RANK_FILE_RE.search(name)
        return int(m.group(2)) if m else 0
    return sorted(f for f in folder.rglob("*") if f.is_file() and owner(f.name) == rank)


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
