"""dataprep.report: the label counts and statistics of the corpus report (exact values on small inputs), the report
process's own error."""
from __future__ import annotations

import numpy as np
import pytest

from dataprep.normalize import NormalizeConfig, parse_chunk
from dataprep.report import ReportProcess, _plot_clusters, _stats, top_labels
from dataprep.store import Store, StoreWriter


def labelled_store(tmp_path, families: list[str | None]) -> Store:
    text = "".join(f">r{i}{f' family={fam}' if fam else ''}\nACGU\n" for i, fam in enumerate(families))
    w = StoreWriter(tmp_path / "store", labels=True)
    w.append(parse_chunk(text.encode(), 1, NormalizeConfig(min_len=1, label_key="family")), 0, 0)
    w.close()
    return Store(tmp_path / "store")


def test_top_labels_count_the_kept_records_most_frequent_first(tmp_path):
    store = labelled_store(tmp_path, ["tRNA", "5S", "tRNA", None, "SRP", "5S", "tRNA", None, "5S_rRNA"])
    labels = top_labels(store, np.arange(9))   # (ties in no particular order)
    assert dict(labels) == {"tRNA": 3, "5S": 2, "(none)": 2, "SRP": 1, "5S_rRNA": 1}
    assert [count for _, count in labels] == [3, 2, 2, 1, 1]
    assert top_labels(store, np.array([4, 1, 5]), k=1) == [("5S", 2)]
    assert top_labels(store, np.zeros(0, np.int64)) == []


def test_statistics_and_cluster_sizes(tmp_path):
    assert _stats(np.array([4, 1, 3, 2, 10])) == {"n": 5, "min": 1, "p5": 1.2, "median": 3.0, "mean": 4.0,
                                                   "p95": pytest.approx(8.8), "max": 10}
    assert _stats(np.zeros(0)) == {"n": 0}
    np.save(tmp_path / "cluster_id.npy", np.array([0, 0, 1, 2, 2, 2, 3]))
    import matplotlib

    matplotlib.use("Agg")
    sizes = _plot_clusters(tmp_path, tmp_path)
    assert (sizes["n"], sizes["max"], sizes["singletons"]) == (4, 3, 2) and (tmp_path / "cluster_sizes.png").exists()
    np.save(tmp_path / "cluster_id.npy", np.zeros(0, np.int64))      # a corpus of no kept record
    assert _plot_clusters(tmp_path, tmp_path) == {"n": 0, "singletons": 0}


def test_a_report_process_that_failed_early_raises_its_own_error_not_the_pipes(tmp_path):
    """A report process that died before the clusters were ready (a full disk, say) made the build fail with
    BrokenPipeError, the message of the pipe it no longer read."""
    (tmp_path / "report").write_text("a file where the report directory goes")
    report = ReportProcess(tmp_path / "report", None, None, [])
    report._proc.join(30)   # dead before the clusters are sent
    with pytest.raises(FileExistsError):
        report.clusters_ready(tmp_path)
