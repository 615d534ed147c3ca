"""Predictions for the user's FASTA with a fine-tuned model.

`predict_ss`: structures as dot-bracket (one OUT/predictions.dbn: header, sequence, structure), or one
bpseq / ct file per record (OUT/<id>.bpseq|ct). `predict_table`: classes (splice, classify) or values (mrl,
regress) as TSV.
Batched by length, on CPU or GPU.
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from finetune.backbone import load_finetuned
from finetune.results import write_json
from finetune.structure import (BRACKETS, FastaRecord, StructureError, StructureRecord, read_fasta,
                                to_dot_bracket, to_rna, warn_unknown_letters, write_bpseq, write_ct)
from finetune.trainer import pick_device
from rnalm.files import atomic_write, check_out_dir

PREDICTIONS_LIST = "predict_ss.json"  # what a predict-ss run wrote into OUT (model, FASTA, threshold, files)


@dataclass
class PredictConfig:
    model: str = ""                 # fine-tuned model directory (finetune.json + finetuned.safetensors)
    fasta: str = ""
    out: str = "predictions"        # a directory
    batch_size: int = 8
    device: str = "auto"
    progress: bool = True


@dataclass
class StructurePredictConfig(PredictConfig):
    format: Literal["dbn", "bpseq", "ct"] = "dbn"
    threshold: float | None = None  # override the threshold tuned on validation (a pair probability, 0..1)
    max_len: int = 1022             # longer records are refused (memory grows as length^2)


def require_inputs(model: str, fasta: str, model_kind: str = "a fine-tuned model directory") -> None:
    """Checked before anything is read (an empty --fasta was read as the directory '.')."""
    if not model:
        raise ValueError(f"--model is required: {model_kind}")
    if not fasta:
        raise ValueError("--fasta is required")


def _load(cfg: PredictConfig, task: str):
    if cfg.batch_size < 1:
        raise ValueError(f"--batch_size ({cfg.batch_size}) must be >= 1")
    device = pick_device(cfg.device)  # before the (giga: 2.6 GB) load
    return load_finetuned(cfg.model, device, task=task)


def safe_name(record_id: str) -> str:
    """A file name for an id: other characters than letters, digits and ._- replaced, no leading dot (hidden)."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", record_id)[:200]
    return re.sub(r"^\.+", lambda m: "_" * len(m.group()), name) or "record"


def predict_ss(cfg: StructurePredictConfig) -> list[StructureRecord]:
    from finetune.tasks.ss import predict_pairs

    require_inputs(cfg.model, cfg.fasta)
    out = check_out_dir(cfg.out, "--out")
    if cfg.threshold is not None and not 0 <= cfg.threshold <= 1:
        raise ValueError(f"--threshold ({cfg.threshold}) is a pair probability: it must be in [0, 1]")
    records = read_fasta(cfg.fasta)  # validates before the model is loaded
    check_lengths(records, cfg)
    warn_unknown_letters(records, cfg.fasta, structures=True)
    check_not_replacing(out, ["predictions.dbn"] if cfg.format == "dbn" else
                        [f"{name}.{cfg.format}" for name in per_record_names([r.id for r in records])])
    model, meta = _load(cfg, "ss")
    threshold = cfg.threshold if cfg.threshold is not None else float(meta["threshold"])
    pairs = predict_pairs(model, [r.sequence for r in records], threshold, cfg.batch_size, cfg.progress)
    out.mkdir(parents=True, exist_ok=True)
    preds = [StructureRecord(r.id, to_rna(r.sequence), p) for r, p in zip(records, pairs)]
    files = planned_files(preds, cfg.format)
    check_not_replacing(out, files)  # again: the .bpseq files of structures dot-bracket cannot hold are known now
    remove_listed(out / PREDICTIONS_LIST)
    listing = {"model": cfg.model, "fasta": cfg.fasta, "format": cfg.format, "threshold": threshold,
               "records": len(preds), "files": files}
    write_json({**listing, "complete": False}, out / PREDICTIONS_LIST)  # first: a killed run's files are its own
    _write_dbn(preds, out) if cfg.format == "dbn" else _write_per_record(preds, out, cfg.format)
    write_json({**listing, "complete": True}, out / PREDICTIONS_LIST)
    return preds


def planned_files(preds: list[StructureRecord], fmt: str) -> list[str]:
    """The files predict-ss writes for `preds` in format `fmt`."""
    names = per_record_names([p.id for p in preds])
    if fmt != "dbn":
        return [f"{name}.{fmt}" for name in names]
    return ["predictions.dbn", *(f"{name}.bpseq" for name, p in zip(names, preds) if _dot_bracket(p) is None)]


def _dot_bracket(pred: StructureRecord) -> str | None:
    """None: more pseudoknot levels than dot-bracket has brackets."""
    try:
        return to_dot_bracket(pred.pairs, len(pred))
    except StructureError:
        return None


def _listed(listing: Path) -> list[str]:
    """The files an earlier predict-ss wrote into this directory (listed in its PREDICTIONS_LIST)."""
    try:
        names = json.loads(listing.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    # a plain name in this directory, nothing else
    return [n for n in names if isinstance(n, str) and n == Path(n).name] if isinstance(names, list) else []


def remove_listed(listing: Path) -> None:
    """Remove what an earlier predict-ss wrote here, so that none of it (e.g. the .ct of a record this run does
    not have) is taken for this run's; other files stay."""
    for name in _listed(listing):
        (listing.parent / name).unlink(missing_ok=True)


def check_not_replacing(out: Path, names: list[str]) -> None:
    """Refuse, before the model is loaded, to write over files that no earlier predict-ss wrote (the user's own
    reference .ct files beside the predictions, say)."""
    ours = set(_listed(out / PREDICTIONS_LIST))
    theirs = [n for n in names if n not in ours and os.path.lexists(out / n)]
    if theirs:
        raise ValueError(f"{out} holds {len(theirs)} file(s) that predict-ss did not write and would replace: "
                         f"{', '.join(theirs[:3])}{' ...' if len(theirs) > 3 else ''}; name another --out")


def check_lengths(records: list[FastaRecord], cfg: StructurePredictConfig) -> None:
    """Refuse records longer than cfg.max_len before any work: the head's [64, L, L] grids (about 1.3 GB at
    1,022 nt, 32 GB at 5,000) would otherwise end the run out of memory, with nothing written."""
    if cfg.max_len < 1:
        raise ValueError(f"--max_len ({cfg.max_len}) must be >= 1")
    long = sorted((r for r in records if len(r.sequence) > cfg.max_len), key=lambda r: -len(r.sequence))
    if long:
        longest = len(long[0].sequence)
        named = ", ".join(f"{r.id!r} ({len(r.sequence)} nt)" for r in long[:3]) + (
            f" and {len(long) - 3} more" if len(long) > 3 else "")
        raise ValueError(f"{cfg.fasta}: {len(long)} record(s) longer than --max_len={cfg.max_len}: {named}. The "
                         f"language model was pretrained on <= 1022 nt, and the structure head needs about "
                         f"{1280 * longest ** 2 / 1e9:.1f} GB of memory for the longest; pass --max_len={longest} "
                         f"to predict them anyway, or split them")


def _write_dbn(preds: list[StructureRecord], out: Path) -> list[str]:
    """OUT/predictions.dbn; a structure that needs more pseudoknot levels than dot-bracket has brackets goes to
    its own .bpseq file instead (named as `--format=bpseq` would name it), with a warning, so none is lost."""
    entries, too_knotted = [], []
    for i, p in enumerate(preds):
        if (brackets := _dot_bracket(p)) is None:
            too_knotted.append(i)
        else:
            entries.append(f">{p.id}\n{p.sequence}\n{brackets}\n")
    atomic_write(out / "predictions.dbn", "".join(entries))
    if too_knotted:
        names = per_record_names([p.id for p in preds])
        for i in too_knotted:
            write_bpseq(preds[i], out / f"{names[i]}.bpseq")
        files = ", ".join(f"{names[i]}.bpseq" for i in too_knotted[:5]) + (" ..." if len(too_knotted) > 5 else "")
        print(f"warning: {len(too_knotted)} predicted structure(s) need more than {len(BRACKETS)} bracket levels: "
              f"written to {out} as {files} instead of in predictions.dbn", file=sys.stderr)
        return ["predictions.dbn", *(f"{names[i]}.bpseq" for i in too_knotted)]
    return ["predictions.dbn"]


def per_record_names(ids: list[str]) -> list[str]:
    """File names (no suffix) of one file per record: the id made safe; when two would clash (ids that differ
    only in replaced characters or in case), every name gets its FASTA position as a prefix."""
    names = [safe_name(rid) for rid in ids]
    if len({n.lower() for n in names}) != len(names):
        names = [f"{i + 1:06d}_{n}" for i, n in enumerate(names)]
    return names


def _write_per_record(preds: list[StructureRecord], out: Path, fmt: str) -> list[str]:
    files = [f"{name}.{fmt}" for name in per_record_names([p.id for p in preds])]
    for p, name in zip(preds, files):
        (write_bpseq if fmt == "bpseq" else write_ct)(p, out / name)
    return files


def predict_table(cfg: PredictConfig, task: str) -> Path:
    """splice, classify: id, predicted class, class probabilities; mrl, regress: id, predicted value. Written to
    OUT/predictions.tsv."""
    require_inputs(cfg.model, cfg.fasta)
    out = check_out_dir(cfg.out, "--out")
    records = read_fasta(cfg.fasta)
    warn_unknown_letters(records, cfg.fasta)
    model, meta = _load(cfg, task)
    seqs = [r.sequence for r in records]
    if "classes" in meta:  # splice, classify
        from finetune.tasks.classify import class_probabilities

        probs = class_probabilities(model, seqs, cfg.batch_size, cfg.progress)
        classes = meta["classes"]
        lines = ["\t".join(["id", "prediction", *(f"p_{c}" for c in classes)])]
        lines += ["\t".join([r.id, classes[int(np.argmax(p))], *(f"{x:.4f}" for x in p)]) for r, p in zip(records, probs)]
    else:  # mrl, regress
        from finetune.tasks.mrl import saved_scaler
        from finetune.tasks.regress import Scaler, predict_values

        scaler = saved_scaler(meta) if task == "mrl" else Scaler(**meta["scaler"])
        values = predict_values(model, seqs, scaler, cfg.batch_size, cfg.progress)
        column = "mrl" if task == "mrl" else "prediction"
        lines = [f"id\t{column}"] + [f"{r.id}\t{v:.4f}" for r, v in zip(records, values)]
    path = out / "predictions.tsv"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "\n".join(lines) + "\n")
    return path
