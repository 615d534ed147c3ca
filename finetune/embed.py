"""Sequence embeddings of a FASTA: the CLS vector and the mean over nucleotides (CLS/EOS/pads excluded).

Writes OUT/cls.npy and OUT/mean.npy (float32 [N, D], rows in FASTA order, filled batch by batch on disk),
OUT/ids.txt (one id per row), OUT/labels.txt when the headers carry `label_key=value`, and OUT/embeddings.png:
t-SNE of the CLS vectors (PCA when there are fewer than `tsne_min` sequences; a sample of `plot_max` of them
when there are more) coloured by label. A run first removes all of these; ids.txt is written after the arrays,
so an OUT without it holds an interrupted run's.
"""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch

from finetune.backbone import BackboneConfig, load_backbone
from finetune.heads import nucleotide_mask
from finetune.predict import require_inputs
from finetune.structure import FastaRecord, header_label, read_fasta, warn_unknown_letters
from finetune.tasks.common import length_sorted_batches, tokens_for
from finetune.trainer import pick_device
from rnalm.files import atomic_write, check_out_dir

OUTPUTS = ("ids.txt", "labels.txt", "cls.npy", "mean.npy", "embeddings.png")


@dataclass
class EmbedConfig:
    model: str = ""                  # any backbone: converted dir, original .pt, multimolecule, fine-tuned dir
    overrides: dict[str, Any] = field(default_factory=dict)  # ModelConfig fields, e.g. {num_heads: 4} for a .pt
    fasta: str = ""
    out: str = "embeddings"
    label_key: str = "class"         # header field `key=value` used to colour the plot (e.g. class, rfam_id, family)
    max_len: int = 1022              # longer sequences are embedded from their first max_len nucleotides
    limit: int | None = None         # a seeded random sample of this many records (not the first N), kept in FASTA order
    batch_size: int = 16
    device: str = "auto"
    plot: Literal["auto", "tsne", "pca", "none"] = "auto"
    tsne_min: int = 50
    plot_max: int = 20_000           # the plot shows a seeded sample of this many (t-SNE takes hours on millions)
    max_legend: int = 12             # labels beyond the most frequent ones are drawn as "other"
    seed: int = 0
    progress: bool = True


@torch.no_grad()
def embed(cfg: EmbedConfig) -> dict[str, Any]:
    """{"cls": [N, D], "mean": [N, D], "plot": the plot's path or None}."""
    require_inputs(cfg.model, cfg.fasta, "a checkpoint (file or directory)")
    out = check_out_dir(cfg.out, "--out")
    counts = {"max_len": cfg.max_len, "batch_size": cfg.batch_size, "plot_max": cfg.plot_max, "limit": cfg.limit}
    low = [f"--{name} ({value})" for name, value in counts.items() if value is not None and value < 1]
    if low:
        raise ValueError(f"{', '.join(low)}: must be >= 1")
    records = read_fasta(cfg.fasta)
    if cfg.limit is not None and cfg.limit < len(records):  # a seeded random sample, kept in FASTA order
        keep = np.sort(np.random.default_rng(cfg.seed).choice(len(records), cfg.limit, replace=False))
        records = [records[i] for i in keep]
    warn_unknown_letters(records, cfg.fasta)
    warn_truncated(records, cfg)
    labels = [header_label(cfg.fasta, r, cfg.label_key) or "NA" for r in records]
    device = pick_device(cfg.device)
    lm = load_backbone(BackboneConfig(path=cfg.model, overrides=cfg.overrides)).to(device).eval()
    seqs = [r.sequence[: cfg.max_len] for r in records]
    out.mkdir(parents=True, exist_ok=True)
    for stale in OUTPUTS:  # an earlier run's: none may be left beside these records' arrays
        (out / stale).unlink(missing_ok=True)
    write_embeddings(lm, seqs, out, cfg.batch_size, cfg.progress)
    if any(lab != "NA" for lab in labels):
        atomic_write(out / "labels.txt", "\n".join(labels) + "\n")
    atomic_write(out / "ids.txt", "\n".join(r.id for r in records) + "\n")  # last: it marks a complete set
    cls, mean = (np.load(out / f"{name}.npy", mmap_mode="r") for name in ("cls", "mean"))
    plot = out / "embeddings.png" if cfg.plot != "none" and len(records) >= 3 else None
    plotted = plot_embeddings(cls, labels, plot, cfg) if plot is not None else None
    return {"cls": cls, "mean": mean, "plot": plot, "plotted": plotted}


def embed_sequences(lm: torch.nn.Module, seqs: Sequence[str], batch_size: int = 16) -> dict[str, np.ndarray]:
    """From Python: {"cls": [N, D], "mean": [N, D]} float32 arrays of `seqs` (rows in their order) by `lm`, a
    RiNALMo on the device it is on (e.g. `load_backbone(BackboneConfig(path=...))`, in eval mode)."""
    arrays = {name: np.empty((len(seqs), lm.config.dim), dtype=np.float32) for name in ("cls", "mean")}
    fill_embeddings(arrays, lm, list(seqs), batch_size, progress=False)
    return arrays


@torch.no_grad()
def fill_embeddings(arrays: dict[str, np.ndarray], lm: torch.nn.Module, seqs: list[str], batch_size: int,
                    progress: bool) -> None:
    """arrays["cls"] and arrays["mean"] ([N, D]) filled batch by batch, sequences of similar length together."""
    device = next(lm.parameters()).device
    for idx in length_sorted_batches(seqs, batch_size, desc="embed", progress=progress):
        tokens = tokens_for([seqs[i] for i in idx], device)
        rep = lm(tokens).representation.float()
        arrays["cls"][idx] = rep[:, 0].cpu().numpy()
        arrays["mean"][idx] = nucleotide_mean(rep, tokens).cpu().numpy()


def write_embeddings(lm: torch.nn.Module, seqs: list[str], out: Path, batch_size: int,
                     progress: bool) -> None:
    """OUT/cls.npy and OUT/mean.npy filled batch by batch on disk (memory stays one batch whatever the number of
    records) and renamed into place when complete; a failure leaves no partial file."""
    tmp = {name: out / f".{name}.npy.tmp" for name in ("cls", "mean")}
    try:
        arrays = {name: _preallocated(path, (len(seqs), lm.config.dim)) for name, path in tmp.items()}
        fill_embeddings(arrays, lm, seqs, batch_size, progress)
        for array in arrays.values():
            array.flush()
        del arrays
        for name, path in tmp.items():
            os.replace(path, out / f"{name}.npy")
    finally:
        for path in tmp.values():
            path.unlink(missing_ok=True)


def _preallocated(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """A float32 .npy memmap whose disk blocks are reserved now: a full disk fails here with a message, not with
    a SIGBUS when a page of the sparse file is written hours later."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):  # a file system without it
                return array
            raise OSError(e.errno, f"{path}: cannot reserve {size / 1e9:.2f} GB for the embeddings "
                                   f"({e.strerror})") from e
    return array


def nucleotide_mean(rep: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean over each row's nucleotides (CLS, EOS and pads excluded) of a padded [B, L, D] representation."""
    nucleotide = nucleotide_mask(tokens).to(rep.dtype)
    return (rep * nucleotide[..., None]).sum(1) / nucleotide.sum(1, keepdim=True).clamp_min(1)


def warn_truncated(records: list[FastaRecord], cfg: EmbedConfig) -> None:
    long = [r for r in records if len(r.sequence) > cfg.max_len]
    if long:
        first = max(long, key=lambda r: len(r.sequence))
        print(f"warning: {cfg.fasta}: {len(long)} record(s) longer than --max_len={cfg.max_len} are embedded from "
              f"their first {cfg.max_len} nt only; longest: {first.id!r} ({len(first.sequence)} nt)", file=sys.stderr)


def legend_groups(labels: list[str], max_legend: int) -> np.ndarray:
    """Each label, or "other" where it is not among the max_legend most frequent (ties: alphabetical)."""
    names, counts = np.unique(labels, return_counts=True)
    top = set(names[np.argsort(-counts, kind="stable")][:max_legend])
    return np.array([lab if lab in top else "other" for lab in labels])


def plot_embeddings(x: np.ndarray, labels: list[str], path: Path, cfg: EmbedConfig) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    total = len(x)
    if total > cfg.plot_max:
        keep = np.sort(np.random.default_rng(cfg.seed).choice(total, cfg.plot_max, replace=False))
        x, labels = x[keep], [labels[i] for i in keep]
    method = cfg.plot if cfg.plot != "auto" else ("tsne" if len(x) >= cfg.tsne_min else "pca")
    if method == "tsne":
        xy = TSNE(n_components=2, init="pca", perplexity=min(30.0, (len(x) - 1) / 3),
                  random_state=cfg.seed).fit_transform(x)
    else:
        xy = PCA(n_components=2, random_state=cfg.seed).fit_transform(x)
    shown = legend_groups(labels, cfg.max_legend)
    fig, ax = plt.subplots(figsize=(8, 6))
    for k, lab in enumerate(sorted(set(shown), key=lambda s: (s == "other", s))):
        sel = shown == lab
        ax.scatter(xy[sel, 0], xy[sel, 1], s=6, alpha=0.7, label=f"{lab} ({sel.sum()})",
                   color="lightgrey" if lab == "other" else plt.cm.tab20((2 * k) % 20 + (k // 10) % 2))
    shown_of = f"{len(x):,} sequences" + (f" sampled of {total:,}" if total > len(x) else "")
    ax.set_title(f"{method.upper()} of CLS embeddings ({shown_of}, colour: {cfg.label_key})")
    ax.legend(markerscale=3, fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"{method} of {shown_of}"
