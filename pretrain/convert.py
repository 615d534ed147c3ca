"""Training checkpoints -> released weights, or -> a universal checkpoint for another world size.

    python -m pretrain.convert CKPT_DIR OUT_DIR [--tag TAG]
        ZeRO shards -> OUT_DIR/model.safetensors + config.json (DeepSpeed's zero_to_fp32 consolidation, fp32
        master weights, written through rnalm.io.save_pretrained; no huggingface_hub needed).
    python -m pretrain.convert --universal CKPT_DIR [--tag TAG]
        DeepSpeed's ds_to_universal -> checkpoints/<tag>_universal (with our trainer state and RNG files), so a
        run with a different number of ranks resumes from it. The trainer converts by itself when it resumes at
        another world size; converting ahead (on a CPU node) spares the GPUs that wait.
CKPT_DIR is a run's out_dir, its checkpoints/ folder (TAG defaults to the newest good checkpoint) or one
step* checkpoint folder.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pretrain.checkpoint import (STATE_FILE, TMP_PREFIX, UNIVERSAL_SUFFIX, CheckpointError, check_archives,
                                 check_files, complete_tags, latest_tag, read_trainer_state)
from rnalm.runlock import RunLock, RunLockError
from rnalm.files import atomic_write, check_out_dir, fsync_path


RELEASED_HINT = ("; released weights (ours, the original's .pt, multimolecule's) need no conversion: pass them "
                 "as they are to --train.init_weights or finetune's --model.path")


def locate(path: str | Path, tag: str | None) -> tuple[Path, str]:
    """(checkpoints folder, tag) from a run's out_dir, its checkpoints/ folder, or one step* checkpoint."""
    path = Path(path)
    if not path.is_dir():
        what = "no such folder" if not path.exists() else "a file, not a training run's folder"
        raise CheckpointError(f"{path}: {what}{RELEASED_HINT if path.exists() else ''}")
    if (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: holds released weights (model.safetensors), not a training checkpoint"
                              f"{RELEASED_HINT}")
    if (path / STATE_FILE).is_file():
        if tag not in (None, path.name):
            raise CheckpointError(f"{path} is checkpoint {path.name}, not --tag {tag}")
        return path.parent, path.name
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    return root, resolve_tag(root, tag)


def resolve_tag(root: Path, tag: str | None) -> str:
    if tag is not None and Path(tag).name != tag:
        raise CheckpointError(f"--tag {tag}: a checkpoint's name in {root} (e.g. step00001000), not a path")
    tag = tag or latest_tag(root)
    if tag is None:
        raise CheckpointError(f"{root}: no complete checkpoint (a step* dir with {STATE_FILE})")
    if not (root / tag).exists():
        raise CheckpointError(f"{root}: no checkpoint {tag}; complete ones: {', '.join(complete_tags(root)) or 'none'}")
    if not (root / tag / STATE_FILE).is_file():
        raise CheckpointError(f"{root / tag}: not a complete checkpoint (no {STATE_FILE})")
    return tag


def to_pretrained(ckpt_dir: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Consolidate the ZeRO partitions of `tag` into fp32 weights; write model.safetensors + config.json."""
    import deepspeed

    from rnalm.config import ModelConfig
    from rnalm.io import save_pretrained

    try:
        out = check_out_dir(out_dir, "OUT_DIR")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    root, tag = locate(ckpt_dir, tag)
    run, resolved = root.parent.resolve(), out.resolve()
    if resolved in (run, root.resolve()) or root.resolve() in resolved.parents:
        raise CheckpointError(f"OUT_DIR={out_dir} is the training run {root.parent} or in its checkpoints, which "
                              "the trainer prunes and convert reads: write the weights elsewhere")
    state = read_trainer_state(root, tag)
    weights = consolidate(root, tag)
    config = ModelConfig.from_dict(state["model"])
    provenance = {"source": "pretrain.convert", "checkpoint": str((root / tag).resolve()), "tag": tag,
                  "step": state["step"], "tokens": state["tokens"], "samples": state["samples"],
                  "world_size": state["world_size"], "shards_manifest": state.get("shards_manifest"),
                  "deepspeed": deepspeed.__version__,
                  "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "train_config": state.get("config")}
    return save_pretrained(weights, out, config=config, provenance=provenance)


def check_checkpoint(root: Path, tag: str) -> list[Path]:
    """Every rank's files there and whole (check_files, check_archives), else a CheckpointError naming the file, or
    saying that a training run pruned the checkpoint while it was read. Returns DeepSpeed's state files."""
    ckpt = root / tag
    files = sorted(ckpt.glob("*_states.pt"))  # DeepSpeed's model and optimizer states, one or more per rank
    world_size = read_trainer_state(root, tag).get("world_size")
    if not isinstance(world_size, int) or world_size < 1:
        raise CheckpointError(f"{ckpt / STATE_FILE}: no usable world_size ({world_size!r}): a damaged trainer state")
    try:
        check_files(ckpt, world_size)
        check_archives(ckpt)
    except CheckpointError as e:
        if _pruned(ckpt, files):
            raise _removed(ckpt) from None
        raise CheckpointError(f"{e}: convert an older checkpoint with --tag") from None
    return files


def _pruned(ckpt: Path, files: list[Path]) -> bool:
    return not (ckpt / STATE_FILE).is_file() or not all(f.is_file() for f in files)


def _removed(ckpt: Path) -> CheckpointError:
    return CheckpointError(f"{ckpt} was removed while it was being converted (a training run pruned it: "
                           f"checkpoint.keep); convert again, or another --tag")


def consolidate(root: Path, tag: str) -> dict:
    """DeepSpeed's zero_to_fp32 on root/tag, its failures as a CheckpointError that names the checkpoint and file
    (a damaged shard, a universal checkpoint, one the training run pruned while it was read). Weights that are
    not finite (a damaged file that kept its CRC, a diverged run) are refused too."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = root / tag
    if tag.endswith(UNIVERSAL_SUFFIX):
        raise CheckpointError(f"{ckpt} is a universal checkpoint (for resuming at another world size), which "
                              f"convert does not read: convert {root / tag[:-len(UNIVERSAL_SUFFIX)]} instead")
    files = check_checkpoint(root, tag)
    try:
        weights = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    except Exception as e:  # noqa: BLE001 - DeepSpeed raises plain RuntimeError/ValueError/FileNotFoundError/...
        if _pruned(ckpt, files):
            raise _removed(ckpt) from e
        where = getattr(e, "filename", None) or ckpt
        raise CheckpointError(f"{where}: DeepSpeed could not consolidate checkpoint {ckpt} "
                              f"({type(e).__name__}: {e})") from e
    bad = [name for name, t in weights.items() if not torch.isfinite(t).all()]
    if bad:
        raise CheckpointError(f"{ckpt}: weights with NaN or infinite values ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): a damaged file or a diverged run; convert an "
                              "older checkpoint with --tag")
    return weights


def to_universal(ckpt_dir: str | Path, tag: str | None = None, workers: int | None = None) -> Path:
    """`<tag>_universal` beside `<tag>`, built in a temp dir and renamed, so a crash leaves no half of it, by
    `workers` extract and merge processes (default: up to 8 of the CPUs this process may use). The checkpoint must
    have been checked (`check_checkpoint`; the trainer's resume checks it): ds_to_universal names no file, or the
    wrong cause, when one is damaged."""
    workers = workers or min(8, len(os.sched_getaffinity(0)))
    root, tag = locate(ckpt_dir, tag)
    final = root / (tag + UNIVERSAL_SUFFIX)
    tmp = root / (TMP_PREFIX + tag + UNIVERSAL_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(root / tag),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers", str(workers),
           ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if "universal_checkpoint_info" in proc.stderr:
            raise CheckpointError(f"{root / tag}: a ZeRO-1/2 checkpoint without universal_checkpoint_info (saved "
                                  "by this trainer before 2026-12-05), which DeepSpeed cannot resume at another world "
                                  "size: resume at the one that saved it, or start a new run from its weights "
                                  "(python -m pretrain.convert, then --train.init_weights)")
        raise CheckpointError(f"ds_to_universal failed on {root / tag} (exit {proc.returncode}):\n"
                              f"{proc.stderr[-3000:]}")
    for f in (root / tag).iterdir():  # our own files: trainer state (loader states!) and RNG states
        if f.name == STATE_FILE or f.name.startswith("rng_rank"):
            shutil.copy2(f, tmp / f.name)
    for f in sorted(tmp.rglob("*"), reverse=True):  # files before their folders: a node crash after the rename
        fsync_path(f)                                # must not leave the final name on truncated files
    fsync_path(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_path(root)
    atomic_write(root / "latest_universal", final.name, durable=True)  # ds_to_universal wrote the temp name there
    return final


def _to_universal_locked(ckpt_dir: str | Path, tag: str | None) -> Path:
    """By hand, under the run's lock: a trainer starting in that run deletes the temp dirs it finds in
    checkpoints/ (and prunes old tags), and it refuses to start while the conversion holds the lock."""
    root, tag = locate(ckpt_dir, tag)
    lock = RunLock(root.parent, option=None)
    try:
        lock.acquire()
    except RunLockError as e:
        raise CheckpointError(f"no universal checkpoint written: {e}") from None
    try:
        check_checkpoint(root, tag)
        return to_universal(root, tag)
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pretrain.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt_dir", help="run out_dir, its checkpoints/ folder, or one step* checkpoint")
    parser.add_argument("out_dir", nargs="?", help="where model.safetensors + config.json go")
    parser.add_argument("--tag", help="checkpoint tag (default: the newest good one)")
    parser.add_argument("--universal", action="store_true",
                        help="write <checkpoints folder>/<tag>_universal for resuming on another world size instead")
    args = parser.parse_intermixed_args(argv)  # --tag before or after OUT_DIR
    if not args.universal and not args.out_dir:
        parser.error("OUT_DIR is required (or --universal)")
    if args.universal and args.out_dir:
        parser.error("--universal writes <checkpoints>/<tag>_universal beside the checkpoint: no OUT_DIR")
    created = args.out_dir and not Path(args.out_dir).exists()
    try:
        # DeepSpeed's lines to stderr, stdout is only the result; its logger binds sys.stdout when deepspeed is first
        # imported, which happens inside (to_pretrained, _to_universal_locked)
        with contextlib.redirect_stdout(sys.stderr):
            if args.universal:
                result = f"universal checkpoint: {_to_universal_locked(args.ckpt_dir, args.tag)}"
            else:
                result = f"released weights: {to_pretrained(args.ckpt_dir, args.out_dir, args.tag)}"
        print(result)
    except (CheckpointError, KeyboardInterrupt) as e:
        if created and Path(args.out_dir).is_dir() and not any(Path(args.out_dir).iterdir()):
            Path(args.out_dir).rmdir()  # this run's, left empty
        if isinstance(e, KeyboardInterrupt):
            parser.exit(130, "python -m pretrain.convert: interrupted; OUT_DIR holds its earlier files or none "
                             "(each file is written whole, and a pair of two saves is refused when read)\n")
        parser.exit(1, f"python -m pretrain.convert: error: {e}\n")


if __name__ == "__main__":
    main()
