"""MFU formula and the Prometheus exporter (real prometheus-client HTTP server, scraped over HTTP)."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from pretrain.metrics import TrainMetrics
from pretrain.mfu import FlopCounter, mfu, peak_flops_of
from rnalm.config import ModelConfig
from rnalm.model import RiNALMo
from tests.contract import METRIC_NAMES
from tests.deploy.daemons import free_port

CONTRACT_NAMES = METRIC_NAMES


def scrape(port: int) -> dict[str, list]:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s)
    return samples


def value(samples: dict[str, list], name: str) -> float:
    (s,) = samples[name]
    return s.value


def test_step_flops_follow_the_stated_formula():
    cfg = ModelConfig.preset("nano", dim=64, num_layers=2, num_heads=4)
    model = RiNALMo(cfg)
    encoder = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("embedding", "lm_mask_head")))
    head = sum(p.numel() for n, p in model.named_parameters() if n.startswith("lm_mask_head"))
    lengths, masked = [5, 10, 120], 20
    expected = 6 * encoder * 135 + 6 * head * masked + 12 * 2 * 64 * (25 + 100 + 14400)
    assert FlopCounter(cfg).step_flops(lengths, masked) == pytest.approx(expected, rel=1e-12)
    assert FlopCounter(cfg).step_flops([], 0) == 0.0


def test_giga_parameter_counts_match_the_original_and_mfu_uses_the_peak():
    # Original giga: 650,901,793 parameters with the MLM head, 649,231,371 without; embedding 22 x 1280.
    encoder, head = 649_231_371 - 22 * 1280, 650_901_793 - 649_231_371
    flops = FlopCounter(ModelConfig.preset("giga")).step_flops([1024], 150)
    assert flops == pytest.approx(6 * encoder * 1024 + 6 * head * 150 + 12 * 33 * 1280 * 1024**2, rel=1e-12)
    assert mfu(989e12 * 0.5, 1.0) == pytest.approx(0.5)
    assert mfu(2 * 989e12, 2.0, devices=2) == pytest.approx(0.5)
    assert mfu(1e12, 1.0, peak_flops=4e12) == pytest.approx(0.25)
    assert mfu(1.0, 0.0) == 0.0


@pytest.mark.parametrize("name, peak", [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                        ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                        ("NVIDIA H200 NVL", 835e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                        ("NVIDIA B200", 2250e12), ("Some Future GPU", 989e12)])
def test_mfu_peak_is_the_devices_dense_bf16_figure(name, peak):
    """By the name torch reports: an H200 NVL measured against the SXM part's 989 would understate MFU by 16%."""
    assert peak_flops_of(name) == peak


def test_exporter_serves_every_contract_metric():
    metrics = TrainMetrics(run_id="r1", model="nano", world_size=2, slurm_job_id="77")
    port = metrics.serve("127.0.0.1", 0)
    try:
        assert math.isnan(value(scrape(port), "rnalm_valid_loss"))  # no validation yet: no number
        metrics.record_step(step=41, loss=2.5, lr=1e-4, grad_norm=0.7, tokens=1000, samples=9, seconds=0.5, mfu=0.25,
                            loader_wait=0.01, corrupt_shards=0)
        metrics.record_step(step=42, loss=2.0, lr=2e-4, grad_norm=0.6, tokens=500, samples=4, seconds=0.25, mfu=0.3,
                            loader_wait=0.02, corrupt_shards=1)
        metrics.record_checkpoint(1.5)
        metrics.valid_loss.set(2.2)
        samples = scrape(port)
    finally:
        metrics.close()
    names = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in samples}
    assert CONTRACT_NAMES <= names
    assert value(samples, "rnalm_train_tokens_total") == 1500
    assert value(samples, "rnalm_train_samples_total") == 13
    assert value(samples, "rnalm_train_steps_total") == 2 and value(samples, "rnalm_train_step") == 42
    assert value(samples, "rnalm_train_loss") == 2.0 and value(samples, "rnalm_train_learning_rate") == 2e-4
    assert value(samples, "rnalm_train_tokens_per_second") == 2000
    assert value(samples, "rnalm_dataloader_wait_seconds_total") == pytest.approx(0.03)
    assert value(samples, "rnalm_dataloader_corrupt_shards") == 1
    assert value(samples, "rnalm_train_step_duration_seconds_count") == 2
    assert value(samples, "rnalm_checkpoint_duration_seconds") == 1.5
    assert time.time() - 60 < value(samples, "rnalm_checkpoint_last_success_timestamp_seconds") <= time.time()
    assert value(samples, "rnalm_train_grad_norm") == 0.6 and value(samples, "rnalm_train_mfu_ratio") == 0.3
    assert value(samples, "rnalm_device_memory_peak_bytes") >= value(samples, "rnalm_device_memory_allocated_bytes")
    assert value(samples, "rnalm_device_memory_allocated_bytes") > 0
    (info,) = samples["rnalm_run_info"]
    assert info.labels == {"run_id": "r1", "model": "nano", "world_size": "2", "slurm_job_id": "77"}
    assert time.time() - 60 < value(samples, "rnalm_train_last_step_timestamp_seconds") <= time.time()
    with socket.socket() as s:  # close() frees the port at once (a requeued rank on this node binds it again)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def test_no_train_loss_is_served_before_the_first_step():
    """A 0 scraped while the rank starts up (or a requeued rerun resumes) became the job's 1-hour loss minimum,
    and RnalmLossDiverging (loss > 1.5 x that minimum) fired ~10 minutes into every run."""
    metrics = TrainMetrics(run_id="r1", model="nano", world_size=2)
    port = metrics.serve("127.0.0.1", 0)
    try:
        before = scrape(port)
        metrics.record_step(step=1, loss=3.3, lr=1e-5, grad_norm=1.0, tokens=100, samples=1, seconds=0.5, mfu=0.1,
                            loader_wait=0.0, corrupt_shards=0)
        metrics.record_step(step=2, loss=3.2, lr=1e-5, grad_norm=1.0, tokens=100, samples=1, seconds=0.5, mfu=0.1,
                            loader_wait=0.0, corrupt_shards=0)
        after = scrape(port)
    finally:
        metrics.close()
    assert "rnalm_train_loss" not in before and value(before, "rnalm_train_start_timestamp_seconds") > 1.7e9
    assert value(after, "rnalm_train_loss") == 3.2


# A rank whose start-up is slow: deepspeed.initialize (ZeRO-3 partitioning of giga on many ranks; before it the
# model build under zero.Init and a universal conversion after a world-size change) looks at its endpoint, then
# the process leaves. pretrain.sh writes the rank's file_sd target before srun, so a rank that does not answer for
# 2 minutes of start-up pages RnalmRankDown.
SLOW_START = r"""
import os, sys
import deepspeed, requests
from pretrain.train import main
port = int(sys.argv[1])

def initialize(*args, **kwargs):
    try:
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        print("served" if "rnalm_train_start_timestamp_seconds" in text else "other", flush=True)
    except requests.RequestException:
        print("not served", flush=True)
    os._exit(0)

deepspeed.initialize = initialize
main(["--config", "pretrain/configs/tiny_cpu.yaml", "--data.shards=" + sys.argv[2], "--train.out_dir=" + sys.argv[3],
      f"--metrics.port_base={port}", "--metrics.bind=127.0.0.1"])
"""


def test_a_rank_serves_its_metrics_during_the_start_up(pretrain_shards, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    args = [sys.executable, "-c", SLOW_START, str(port), str(pretrain_shards), str(tmp_path / "run")]
    proc = subprocess.run(args, cwd=Path(__file__).resolve().parents[2], env=dict(env, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=180)
    assert proc.stdout.strip().splitlines()[-1:] == ["served"], proc.stdout + proc.stderr[-3000:]


def test_a_rank_serves_its_metrics_while_it_waits_for_its_peers(pretrain_shards, tmp_path):
    """A rank answers from before the rendezvous: one node slow to start (or never starting) shows as its own
    ranks down, instead of every rank of the job waiting unscraped for it (RnalmRankDown for all)."""
    port = free_port()
    master_port = free_port()
    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(master_port), OMP_NUM_THREADS="1")  # rank 1 never comes
    args = [sys.executable, "-m", "pretrain.train", "--config", "pretrain/configs/tiny_cpu.yaml",
            f"--data.shards={pretrain_shards}", f"--train.out_dir={tmp_path / 'run'}",
            f"--metrics.port_base={port}", "--metrics.bind=127.0.0.1"]
    proc = subprocess.Popen(args, cwd=Path(__file__).resolve().parents[2], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline, samples = time.monotonic() + 90, None
        while samples is None and time.monotonic() < deadline and proc.poll() is None:
            try:
                samples = scrape(port)
            except requests.RequestException:
                time.sleep(0.2)
    finally:
        proc.kill()
        proc.wait()
    assert samples is not None, "no metrics while waiting for rank 1"
    (info,) = samples["rnalm_run_info"]
    assert info.labels["world_size"] == "2" and value(samples, "rnalm_train_start_timestamp_seconds") > 1.7e9


# The resumed rank's endpoint, scraped when its first step begins (then the process leaves).
RESUMED_FIRST_STEP = r"""
import os, sys
import requests
from pretrain import train
port = int(sys.argv[1])

def first_step(self, micro):
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    print(next(line for line in text.splitlines() if line.startswith("rnalm_train_step ")), flush=True)
    os._exit(0)

train.Trainer._train_step = first_step
train.main(["--config", "pretrain/configs/tiny_cpu.yaml", "--data.shards=" + sys.argv[2],
            "--train.out_dir=" + sys.argv[3], f"--metrics.port_base={port}", "--metrics.bind=127.0.0.1"])
"""


def test_a_resumed_rank_serves_its_step_before_its_first_new_step(pretrain_shards, tmp_path):
    """The Step panel read 0 for the whole start-up of every resumed run (minutes for giga)."""
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    run = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "pretrain.train", "--config", "pretrain/configs/tiny_cpu.yaml",
                            f"--data.shards={pretrain_shards}", f"--train.out_dir={run}", "--train.stop_after=2"],
                           cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    port = free_port()
    proc = subprocess.run([sys.executable, "-c", RESUMED_FIRST_STEP, str(port), str(pretrain_shards), str(run)],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert "resumed from" in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1:] == ["rnalm_train_step 2.0"], proc.stdout + proc.stderr[-3000:]
