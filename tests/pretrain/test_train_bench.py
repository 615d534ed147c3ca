"""bench/pretrain_bench.py on CPU with the tiny model: the GPU benchmark's logic end to end."""
from __future__ import annotations

import json
import subprocess

import pytest

from .trainer_runs import PY, REPO, trainer_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_bench_reports_packed_trainer_and_padded_baseline(pretrain_shards, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([PY, "bench/pretrain_bench.py", "--tiny", "--steps", "3", "--warmup", "1",
                           "--padded-batch", "8", "--padded-steps", "2", "--nproc", "1",
                           "--shards", str(pretrain_shards), "--out", str(out)],
                          cwd=REPO, env=trainer_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())
    packed, padded = result["packed"], result["padded"]
    assert (packed["world_size"], packed["steps"], packed["precision"]) == (1, 3, "fp32")
    assert packed["real_tokens_per_s"] > 0 and 0 < packed["mfu"] < 1 and 0 <= packed["loader_wait_fraction"] < 1
    assert packed["peak_memory_gib"] > 0 and packed["last_loss"] < 4
    assert (padded["batch"], padded["steps"]) == (8, 2) and padded["real_tokens_per_s"] > 0
    assert result["packed_over_padded"] == pytest.approx(packed["real_tokens_per_s"] / padded["real_tokens_per_s"])
    assert result["params"] == 106_624 and 50 < result["corpus_mean_tokens"] < 256
