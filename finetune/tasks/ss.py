"""Secondary-structure fine-tuning: bpRNA (TR0 -> VL0 -> TS0), ArchiveII leave-one-family-out, or the user's own
structure files (`--data.dataset=files --data.train=... --data.test=...`).

Training: batches of (tokens, true pairs); BCE on the strict upper triangle per sequence, averaged over the
batch. Validation after each epoch tunes the probability threshold over the grid (paper: 0.01..0.29) for
the best mean F1; the best epoch's weights and threshold are saved. Test: that threshold, the same
post-processing and metric, RNAfold on the same records in the same table.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from finetune.backbone import (BackboneConfig, TaskModel, backbone_files, load_backbone, load_finetuned,
                               mark_finished, save_finetuned)
from finetune.heads import HeadConfig, SecondaryStructureHead, upper_triangle_bce
from finetune.metrics import mean_scores, ss_report
from finetune.postprocess import THRESHOLD_GRID, decode_at_thresholds, decode_pairs
from finetune.results import markdown_table, write_results
from finetune.rnafold import rnafold_pairs
from finetune.ss_data import ARCHIVEII_FAMILIES, SSSplits, archiveii_fold, bprna_splits, load_archiveii
from finetune.structure import StructureRecord, pairs_to_matrix, read_structures
from finetune.tasks.common import (DEFAULT_DATA_ROOT, CheckedSplitOptions, Splits, batched_inference, minibatches,
                                   model_device, tokens_for)
from finetune.tasks.user_data import removal_note, required, user_splits, valid_source
from finetune.trainer import TrainConfig, fit, pick_device, seed_everything
from finetune import outlock
from finetune.unfreeze import UnfreezeConfig
from rnalm.runlock import RunLock, RunLockError

TABLE_COLUMNS = ("n", "f1", "f1_shift", "precision_shift", "recall_shift", "threshold")
SUMMARY_COLUMNS = ("n", "f1", "f1_shift", "rnafold_f1", "rnafold_f1_shift")


@dataclass
class SSDataConfig(CheckedSplitOptions):
    root: str = DEFAULT_DATA_ROOT
    dataset: Literal["bprna", "archiveii", "files"] = "bprna"
    test_family: str = "all"               # ArchiveII: one of the 9 families, several (comma-separated), or all
    train: str = ""                        # files: the user's structures (finetune.structure.read_structures:
    valid: str = ""                        # .bpseq, .ct, .dbn, dot-bracket .csv, or a directory of them); no
    test: str = ""                         # valid: valid_fraction of train
    valid_fraction: float = 0.1            # ArchiveII, files: random share of the training records for validation
    near_dup_kmer: int = 8                 # leakage filter (finetune.neardup) of train/valid against test; files:
    near_dup_containment: float = 0.5      # kmer 0 keeps them
    near_dup_shared_run: int = 0           # files: also an identical stretch of this many nt; 0: no such check
    max_train_len: int = 1022              # nucleotides; longer training records are skipped (and counted)
    limit_train: int | None = None         # first N (after a seeded shuffle): quick runs and tests
    limit_valid: int | None = None
    limit_test: int | None = None
    seed: int = 0


@dataclass
class SSEvalConfig:
    thresholds: list[float] = field(default_factory=lambda: list(THRESHOLD_GRID))
    tune_on: Literal["f1_shift", "f1"] = "f1_shift"   # the paper reports (and tunes on) the +-1 F1
    rnafold: bool = True                                # score RNAfold on the same test records

    def __post_init__(self) -> None:
        """Checked with the options, before a train run clears OUT (an empty grid failed after the first epoch)."""
        if not self.thresholds or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"--eval.thresholds must be pair probabilities in [0, 1], at least one; got "
                             f"{self.thresholds}")


def check_rnafold(cfg: SSEvalConfig) -> None:
    """Before any work: without ViennaRNA a run failed after its last epoch (or evaluation), writing no results.
    (Not with the options: a machine without it must still parse an ss command that turns RNAfold off.)"""
    if cfg.rnafold and importlib.util.find_spec("RNA") is None:
        raise ValueError("--eval.rnafold=true scores ViennaRNA's RNAfold, which is not installed here: `pip install "
                         "viennarna` (in the finetune extra), or --eval.rnafold=false")


@dataclass
class SSConfig:
    model: BackboneConfig = field(default_factory=BackboneConfig)
    data: SSDataConfig = field(default_factory=SSDataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        out_dir="finetune_out/ss", epochs=30, batch_size=1, lr=5e-4, optimizer="adam", lr_decay_steps=7000))
    unfreeze: UnfreezeConfig = field(default_factory=lambda: UnfreezeConfig(
        head_only_epochs=3, every=3, blocks_per_step=3, max_blocks=24))
    head: HeadConfig = field(default_factory=HeadConfig)
    eval: SSEvalConfig = field(default_factory=SSEvalConfig)


# ------------------------------------------------------------------ data
def _limit(records: list[StructureRecord], n: int | None, seed: int) -> list[StructureRecord]:
    if n is None or n >= len(records):
        return records
    idx = np.random.default_rng(seed).permutation(len(records))[:n]
    return [records[i] for i in sorted(idx)]


def check_files_option(cfg: SSDataConfig) -> None:
    """--data.train/valid/test name the user's files: with another dataset they would be ignored unseen."""
    given = [f"--data.{k}" for k in ("train", "valid", "test") if getattr(cfg, k)]
    if given and cfg.dataset != "files":
        raise ValueError(f"{', '.join(given)} name structure files: add --data.dataset=files (the data set is "
                         f"{cfg.dataset})")


def load_splits(cfg: SSDataConfig, family: str | None = None) -> SSSplits:
    check_files_option(cfg)
    if cfg.dataset == "bprna":
        splits = bprna_splits(cfg.root)
    elif cfg.dataset == "files":
        splits = file_splits(cfg)
    else:
        family = family or fold_families(cfg.test_family)[0]
        splits = archiveii_fold(load_archiveii(cfg.root), family, cfg.valid_fraction, cfg.seed,
                                cfg.near_dup_kmer, cfg.near_dup_containment)
    train = [r for r in splits.train if 2 <= len(r) <= cfg.max_train_len]
    splits.info["skipped_train_longer_than_max_train_len"] = sum(len(r) > cfg.max_train_len for r in splits.train)
    # a single nucleotide has no pair to learn: its loss is the mean over an empty triangle (NaN, no gradient)
    splits.info["skipped_train_shorter_than_2_nt"] = sum(len(r) < 2 for r in splits.train)
    parts = [_limit(part, limit, cfg.seed) for part, limit in
             ((train, cfg.limit_train), (splits.valid, cfg.limit_valid), (splits.test, cfg.limit_test))]
    Splits(*parts, splits.info.get("removed_near_duplicates", 0)).nonempty()
    return SSSplits(*parts, splits.info)


def file_splits(cfg: SSDataConfig) -> SSSplits:
    """The user's structure files; train/valid minus near-duplicates of test records (finetune.neardup)."""
    read = {name: read_structures(required(getattr(cfg, name), name)) for name in ("train", "test")}
    valid = read_structures(cfg.valid) if cfg.valid else None
    s = user_splits(read["train"], valid, read["test"], lambda r: r.sequence,
                    replace(cfg, limit_train=None, limit_valid=None, limit_test=None))
    return SSSplits(s.train, s.valid, s.test, {"dataset": "files", "test": cfg.test, "train": cfg.train,
                                                "valid": valid_source(cfg),
                                                "removed_near_duplicates": s.removed_near_duplicates,
                                                "removed_valid_near_train": s.removed_valid_near_train})


def test_records(cfg: SSDataConfig) -> list[StructureRecord]:
    """The test set alone (evaluation): the user's test file is read without the training file."""
    check_files_option(cfg)
    if cfg.dataset != "files":
        return load_splits(cfg).test
    return _limit(read_structures(required(cfg.test, "test")), cfg.limit_test, cfg.seed)


# ------------------------------------------------------------------ model pieces
def ss_loss(model: TaskModel, batch: list[StructureRecord]) -> torch.Tensor:
    device = model_device(model)
    logits = model(tokens_for([r.sequence for r in batch], device))
    losses = [upper_triangle_bce(lg.float(), torch.from_numpy(pairs_to_matrix(r.pairs, len(r))).to(device))
              for lg, r in zip(logits, batch)]
    return torch.stack(losses).mean()


@torch.no_grad()
def pair_probabilities(model: TaskModel, seqs: list[str], batch_size: int, progress: bool,
                       reduce: Callable[[np.ndarray, str], Any]) -> list[Any]:
    """`reduce(probs, seq)` per sequence (in input order) of its symmetric [L, L] pair probabilities; a batch's
    matrices are dropped once reduced, so memory does not grow with the number of sequences."""
    device = model_device(model)

    def run(idx: list[int]) -> list[Any]:
        logits = model(tokens_for([seqs[i] for i in idx], device))
        probs = [torch.sigmoid(lg.float()).cpu().numpy() for lg in logits]
        return [reduce(p, seqs[i]) for p, i in zip(probs, idx)]

    return batched_inference(seqs, batch_size, run, desc="pair probabilities", progress=progress)


def predict_pairs(model: TaskModel, seqs: list[str], threshold: float, batch_size: int = 8,
                  progress: bool = True) -> list[np.ndarray]:
    """Post-processed pairs per sequence (in input order): [n_pairs, 2] arrays of 0-based (i, j), i < j; no
    [L, L] matrix outlives its batch."""
    return pair_probabilities(model, seqs, batch_size, progress, lambda p, s: decode_pairs(p, s, threshold))


def tune_threshold(per_seq: list[list[np.ndarray]], records: list[StructureRecord], thresholds: list[float],
                   shift: bool) -> tuple[float, float]:
    """(threshold, mean F1) maximising mean F1 over records; the lowest threshold wins ties.
    per_seq[i][k]: the pairs of records[i] decoded at thresholds[k]."""
    scores = [mean_scores([(r.pairs, preds[k], len(r)) for r, preds in zip(records, per_seq)], shift=shift).f1
              for k in range(len(thresholds))]
    best = min(range(len(thresholds)), key=lambda k: (-scores[k], thresholds[k]))  # in any order of the grid
    return float(thresholds[best]), float(scores[best])


def evaluate_records(model: TaskModel, records: list[StructureRecord], threshold: float, batch_size: int,
                     progress: bool = True) -> dict[str, Any]:
    preds = predict_pairs(model, [r.sequence for r in records], threshold, batch_size, progress)
    items = [(r.pairs, pred, len(r)) for pred, r in zip(preds, records)]
    return {**ss_report(items), "threshold": threshold}


def rnafold_row(records: list[StructureRecord]) -> dict[str, Any]:
    return ss_report([(r.pairs, rnafold_pairs(r.sequence), len(r)) for r in records])


# ------------------------------------------------------------------ commands
def train_one(cfg: SSConfig, out_dir: Path, family: str | None = None,
              splits: SSSplits | None = None) -> dict[str, Any]:
    seed_everything(cfg.train.seed)
    splits = load_splits(cfg.data, family) if splits is None else splits
    lm = load_backbone(cfg.model)
    model = TaskModel(lm, SecondaryStructureHead(lm.config.dim, cfg.head))
    tcfg = TrainConfig(**{**asdict(cfg.train), "out_dir": str(out_dir)})
    shift = cfg.eval.tune_on == "f1_shift"

    def validate(m: TaskModel) -> dict[str, Any]:
        # decoded at every threshold inside each batch: no [L, L] matrix outlives its batch
        per_seq = pair_probabilities(m, [r.sequence for r in splits.valid], tcfg.eval_batch_size, tcfg.progress,
                                     lambda p, s: decode_at_thresholds(p, s, cfg.eval.thresholds))
        thr, f1 = tune_threshold(per_seq, splits.valid, cfg.eval.thresholds, shift)
        return {cfg.eval.tune_on: f1, "threshold": thr}

    def save(m: TaskModel, val: dict[str, Any]) -> None:
        save_finetuned(m, out_dir, {"task": "ss", "head": asdict(cfg.head), "threshold": val["threshold"],
                                    "valid": val, "data": splits.info, "backbone": asdict(cfg.model)}, finished=False)

    history = fit(model, tcfg, cfg.unfreeze, lambda e: minibatches(splits.train, tcfg.batch_size, tcfg.seed, e),
                  ss_loss, validate, save, score_key=cfg.eval.tune_on)
    mark_finished(out_dir)
    best, meta = load_finetuned(out_dir, pick_device(tcfg.device))
    init = "" if cfg.model.random_preset is None else " (random init)"
    name = f"{lm.config.name}{init} fine-tuned"
    rows = {name: evaluate_records(best, splits.test, meta["threshold"], tcfg.eval_batch_size, tcfg.progress)}
    if cfg.eval.rnafold:
        rows["RNAfold"] = rnafold_row(splits.test)
    result = {"task": "ss", "test_set": _test_name(cfg.data, family), "rows": rows, "data": splits.info,
              "splits": {"train": len(splits.train), "valid": len(splits.valid), "test": len(splits.test)},
              "history": history, "settings": run_settings(cfg, family)}
    write_results(out_dir, "results", result, _titled_table(result))
    return result


def _test_name(cfg: SSDataConfig, family: str | None) -> str:
    if cfg.dataset == "bprna":
        return "bpRNA TS0"
    if cfg.dataset == "files":
        return Path(cfg.test).name
    return f"ArchiveII {family or fold_families(cfg.test_family)[0]} (held-out family)"


def _titled_table(result: dict[str, Any]) -> str:
    data = result.get("data", {})
    note = (f"\n{removal_note(data['removed_near_duplicates'], data.get('removed_valid_near_train', 0))}\n"
            if data.get("dataset") == "files" else "")
    return f"### {result['test_set']}\n\n" + markdown_table(result["rows"], TABLE_COLUMNS, "model") + note


def fold_families(test_family: str) -> list[str]:
    """`all` -> the paper's 9 families; `a,b` -> several folds; `a` -> one fold."""
    fams = list(ARCHIVEII_FAMILIES) if test_family == "all" else [f for f in test_family.split(",") if f]
    unknown = [f for f in fams if f not in ARCHIVEII_FAMILIES]
    if unknown or not fams:
        raise ValueError(f"data.test_family: unknown {unknown or test_family!r}; use one or more (comma-separated) "
                         f"of {', '.join(ARCHIVEII_FAMILIES)}, or all")
    if twice := sorted({f for f in fams if fams.count(f) > 1}):
        raise ValueError(f"data.test_family: {', '.join(twice)} given twice (it would count twice in the mean)")
    return fams


def several_families(cfg: SSConfig) -> bool:
    return cfg.data.dataset == "archiveii" and len(fold_families(cfg.data.test_family)) > 1


def run_settings(cfg: SSConfig, family: str | None) -> dict[str, Any]:
    """What a run's results depend on: its config (with the fold's family, paths resolved; not where it is
    written, its device, evaluation batch or progress bars) and the backbone's files (name, size, time). A
    finished fold with equal settings is reused."""
    cfg = replace(cfg, data=replace(cfg.data, test_family=family or cfg.data.test_family))
    settings = asdict(cfg)
    for key in ("out_dir", "device", "eval_batch_size", "progress"):
        del settings["train"][key]
    for section, key in (("model", "path"), ("data", "root"), ("data", "train"), ("data", "valid"), ("data", "test")):
        if settings[section][key]:
            settings[section][key] = os.path.realpath(settings[section][key])
    settings["backbone_files"] = backbone_files(cfg.model)
    return json.loads(json.dumps(settings, default=str))  # as results.json holds them


def several_family_settings(cfg: SSConfig) -> dict[str, Any]:
    """The settings OUT/folds.json records of a several-family run (the families in any order)."""
    return run_settings(cfg, ",".join(sorted(fold_families(cfg.data.test_family))))


def fold_results(fold_dir: Path) -> dict[str, Any] | None:
    """The fold's results.json (a fold's last write: there only when it completed), None without one."""
    try:
        return json.loads((fold_dir / "results.json").read_text())
    except (OSError, ValueError):
        return None


def finished_fold(fold_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The fold's results when a run with these settings completed it."""
    result = fold_results(fold_dir)
    return result if result is not None and result.get("settings") == settings else None


def claim_out(cfg: SSConfig) -> None:
    """With OUT held: OUT is this several-family run's (outlock.claim_out)."""
    outlock.claim_out(Path(cfg.train.out_dir), several_family_settings(cfg))


@contextmanager
def several_family_start(cfg: SSConfig) -> Iterator[None]:
    """OUT held for a moment, and claimed for this several-family run."""
    with outlock.held(Path(cfg.train.out_dir)):
        claim_out(cfg)
        yield


def train_fold(cfg: SSConfig, out: Path, family: str) -> dict[str, Any] | None:
    """One ArchiveII fold of a several-family run, OUT/<family>, under the fold's lock: None when another
    process trains it now (the processes of one command, e.g. a Slurm array, share out the families), its
    results when a run of the same settings finished it (an interrupted run goes on where it stopped), else
    trained here."""
    fold_dir, settings = out / family, run_settings(cfg, family)
    lock = RunLock(fold_dir)
    with several_family_start(cfg):  # a claim is made with OUT held (outlock)
        try:
            taken_over = lock.acquire()
        except RunLockError as e:
            print(f"ArchiveII {family}: not claimed: {e}; next family", file=sys.stderr)
            return None
    try:
        if taken_over:
            print(f"ArchiveII {family}: took its lock over ({taken_over})", file=sys.stderr)
        earlier = fold_results(fold_dir)
        if earlier is not None and earlier.get("settings") == settings:
            print(f"ArchiveII {family}: finished earlier with the same settings, reused ({fold_dir}; delete it to "
                  f"train it again)", file=sys.stderr)
            return earlier
        why = (f"; its earlier results, of other settings, go ({outlock.differences(earlier['settings'], settings)})"
               if earlier is not None and "settings" in earlier else "")
        print(f"ArchiveII {family}: training ({fold_dir}){why}", file=sys.stderr)
        return train_one(cfg, fold_dir, family)
    finally:
        lock.release()


def train(cfg: SSConfig, data: SSSplits | None = None) -> dict[str, Any]:
    """bpRNA, files: one run (`data`: its load_splits(cfg.data), when the caller has it already). ArchiveII: one
    run per held-out family (OUT/<family>/, `train_fold`), then a summary with the mean, written by the process
    that finds every fold finished. Processes running the same command share out the families."""
    out = Path(cfg.train.out_dir)
    if cfg.data.dataset in ("bprna", "files"):
        return train_one(cfg, out, splits=data)
    families = fold_families(cfg.data.test_family)
    if len(families) == 1:
        return train_one(cfg, out, families[0])
    for fam in families:
        train_fold(cfg, out, fam)
    folds = {fam: finished_fold(out / fam, run_settings(cfg, fam)) for fam in families}  # also others' folds
    pending = [fam for fam, r in folds.items() if r is None]
    if pending:
        with outlock.held(out):
            holders = {fam: outlock.holder(out / fam) or "held by no process now" for fam in pending}
        return {"task": "ss", "test_set": "ArchiveII leave-one-family-out", "pending": holders}
    return _write_summary(out, families, folds)


def _write_summary(out: Path, families: list[str], folds: dict[str, dict[str, Any]]) -> dict[str, Any]:
    rows: dict[str, dict[str, Any]] = {}
    for fam, r in folds.items():
        model_row = next(v for k, v in r["rows"].items() if k != "RNAfold")
        rows[fam] = {**model_row, **{f"rnafold_{k}": v for k, v in r["rows"].get("RNAfold", {}).items()}}
    numeric = [k for k, v in rows[families[0]].items() if isinstance(v, float)]
    rows[f"mean of {len(families)} families"] = {k: float(np.mean([rows[f][k] for f in families])) for k in numeric}
    summary = {"task": "ss", "test_set": "ArchiveII leave-one-family-out", "rows": rows,
               "removed_near_duplicates": {f: r["data"]["removed_near_duplicates"] for f, r in folds.items()},
               "removed_valid_near_train": {f: r["data"].get("removed_valid_near_train") for f, r in folds.items()}}
    write_results(out, "results", summary, markdown_table(rows, SUMMARY_COLUMNS, "held-out family"))
    return summary


def _evaluation_data(asked: SSDataConfig, meta: dict[str, Any], where: str) -> SSDataConfig:
    """An ArchiveII model is scored on the family it held out, without --data.dataset=archiveii too: the other
    families were its training data, and bpRNA TS0 (the default) holds copies of them (21 of its 473 records). A
    model of the user's structure files is scored on its own test file unless told another (or ArchiveII)."""
    trained = meta.get("data", {})
    if trained.get("dataset") == "files" and asked.dataset != "archiveii" and not asked.test:
        return replace(asked, dataset="files", test=trained["test"])
    if trained.get("dataset") == "ArchiveII" and asked.dataset != "files":
        held_out = trained["test"]
        if asked.test_family not in ("all", held_out):
            raise ValueError(f"{where} was trained on ArchiveII with family {held_out} held out; family "
                             f"{asked.test_family} was in its training data")
        return replace(asked, dataset="archiveii", test_family=held_out)
    if asked.dataset == "archiveii" and len(fold_families(asked.test_family)) != 1:
        raise ValueError("ss evaluate scores one ArchiveII family: set --data.test_family")
    return asked


def evaluate(cfg: SSConfig) -> dict[str, Any]:
    """Score a fine-tuned model (model.path) on the configured test set with its stored threshold."""
    check_rnafold(cfg.eval)
    model, meta = load_finetuned(cfg.model.path, pick_device(cfg.train.device), task="ss")
    data = _evaluation_data(cfg.data, meta, cfg.model.path)
    test = test_records(data)
    rows = {f"{model.lm.config.name} fine-tuned": evaluate_records(model, test, meta["threshold"],
                                                                  cfg.train.eval_batch_size, cfg.train.progress)}
    if cfg.eval.rnafold:
        rows["RNAfold"] = rnafold_row(test)
    out = Path(cfg.train.out_dir)
    result = {"task": "ss", "test_set": _test_name(data, None), "model": cfg.model.path, "rows": rows}
    write_results(out, "eval_results", result, _titled_table(result))
    return result
