"""Corpus report next to the manifest: summary.json plus PNG plots (matplotlib, Agg backend)."""
from __future__ import annotations

import json
import multiprocessing as mp
from pathlib import Path

import numpy as np

from .arrays import concat_ranges, offsets_from_lengths
from .digest import PAD, segment_digests
from .background import Background
from .shards import ShardInfo
from .store import Store

TOP_LABELS = 20


def _stats(x: np.ndarray) -> dict:
    if len(x) == 0:
        return {"n": 0}
    q = np.percentile(x, [5, 50, 95])
    return {"n": int(len(x)), "min": int(x.min()), "p5": float(q[0]), "median": float(q[1]), "mean": float(x.mean()),
            "p95": float(q[2]), "max": int(x.max())}


def top_labels(store: Store, keep: np.ndarray, k: int = TOP_LABELS) -> list[tuple[str, int]]:
    """Most frequent labels among the kept records (digest-counted, so only k strings are decoded)."""
    if not store.has_labels:
        return []
    lens = store.label_len[keep].astype(np.int64) + 1
    starts = store.label_off[keep]

    blob = np.concatenate((store.labels[concat_ranges(starts, lens)], np.zeros(PAD, np.uint8)))
    off = offsets_from_lengths(lens)
    h = segment_digests(blob, off)
    _, first, count = np.unique(h, return_index=True, return_counts=True)
    order = np.argsort(-count, kind="stable")[:k]
    out = []
    for i in order.tolist():
        r = first[i]
        label = blob[off[r]: off[r + 1] - 1].tobytes().decode("utf-8", "replace")
        out.append((label or "(none)", int(count[i])))
    return out


def _plain(text: str) -> str:
    """`text` drawn as it is: matplotlib reads text between two `$` as maths (a label `a_$^$` ended the build)."""
    return text.replace("$", r"\$")


def _plot_corpus(report_dir: Path, store: Store, keep: np.ndarray, sources: list[dict]) -> dict:
    """Length, per-input and label plots (no clusters needed); their statistics for corpus.json."""
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    lengths = np.asarray(store.seq_len[keep])
    labels = top_labels(store, keep)

    fig, ax = plt.subplots(figsize=(7, 4))
    if len(lengths):
        ax.hist(lengths, bins=np.unique(np.geomspace(max(1, lengths.min()), lengths.max() + 1, 60).astype(int)))
    ax.set(xscale="log", xlabel="sequence length (nt)", ylabel="records", title="Kept sequence lengths")
    _save(fig, report_dir / "lengths.png")

    fig, ax = plt.subplots(figsize=(7, 1.5 + 0.4 * len(sources)))
    names = [_plain(Path(s["path"]).name) for s in sources]
    left = np.zeros(len(sources))
    for key in ("kept", "duplicates", "rejected"):
        vals = np.array([s.get(key, 0) for s in sources], float)
        ax.barh(names, vals, left=left, label=key)
        left += vals
    ax.set(xlabel="records", title="Records per input")
    ax.legend()
    _save(fig, report_dir / "sources.png")

    if labels:
        fig, ax = plt.subplots(figsize=(7, 1.5 + 0.3 * len(labels)))
        ax.barh([_plain(lab) for lab, _ in labels][::-1], [c for _, c in labels][::-1])
        ax.set(xlabel="kept records", title=f"Top {len(labels)} labels")
        _save(fig, report_dir / "labels.png")
    else:  # an OUT reused from a build with labels must not keep that build's plot
        (report_dir / "labels.png").unlink(missing_ok=True)
    return {"length_nt": _stats(lengths), "top_labels": labels}


def _plot_clusters(report_dir: Path, cluster_dir: Path) -> dict:
    import matplotlib.pyplot as plt

    cluster_id = np.load(cluster_dir / "cluster_id.npy", mmap_mode="r")
    sizes = np.bincount(cluster_id)
    fig, ax = plt.subplots(figsize=(7, 4))
    if len(sizes):
        values, freq = np.unique(sizes, return_counts=True)
        ax.loglog(values, freq, "o", ms=3)
    ax.set(xlabel="cluster size (records)", ylabel="clusters", title="Cluster-size distribution")
    _save(fig, report_dir / "cluster_sizes.png")
    return {**_stats(sizes), "singletons": int((sizes == 1).sum())}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _report_main(conn, parent_end, report_dir: Path, store: Store, keep: np.ndarray, sources: list[dict]) -> None:
    import matplotlib

    parent_end.close()  # else recv() would wait for ever once the build process is gone, never seeing EOF
    matplotlib.use("Agg")
    corpus = _plot_corpus(report_dir, store, keep, sources)
    corpus["cluster_size"] = _plot_clusters(report_dir, Path(conn.recv()))
    (report_dir / "corpus.json").write_text(json.dumps(corpus))


class ReportProcess(Background):
    """The plots, drawn in a background process started before clustering: what needs no clusters is drawn while
    MMseqs2 runs; `clusters_ready` lets it draw the cluster sizes; `join` before `write_summary`."""

    def __init__(self, report_dir: Path, store: Store, keep: np.ndarray, sources: list[dict]):
        child, self._conn = mp.get_context("fork").Pipe(duplex=False)
        super().__init__("report", _report_main, child, self._conn, report_dir, store, keep, sources)
        child.close()

    def clusters_ready(self, cluster_dir: Path) -> None:
        try:
            self._conn.send(str(cluster_dir))
        except BrokenPipeError:  # it ended early (e.g. a full disk): its own error, not the pipe's
            self.join()
            raise


def write_summary(report_dir: Path, counts: dict, sources: list[dict], shards: list[ShardInfo],
                  seconds: dict, build_key: str) -> dict:
    corpus = json.loads((report_dir / "corpus.json").read_text())
    summary = {"build_key": build_key, "counts": counts, **corpus, "sources": sources,
               "stage_seconds": {k: round(v, 3) for k, v in seconds.items()},
               "shards": {"count": len(shards), "bytes": sum(s.bytes for s in shards)}}
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
