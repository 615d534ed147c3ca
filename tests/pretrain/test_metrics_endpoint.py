"""Scrape every rank's real endpoint during a 2-rank training run, then stop it with SIGTERM to torchrun."""
from __future__ import annotations

import signal
import socket

import pytest

from pretrain.checkpoint import latest_tag, tag_for
from tests.deploy.daemons import free_port

from .test_metrics import CONTRACT_NAMES, scrape, value
from .trainer_runs import events, read_log, run_trainer, signal_tree, start_trainer, step_lines, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_every_rank_serves_live_metrics_and_sigterm_saves_and_stops(pretrain_shards, tmp_path):
    out = tmp_path / "run"
    proc = start_trainer(pretrain_shards, out, "--train.max_steps=400", "--optim.decay_steps=400",
                         "--checkpoint.every=0", "--metrics.run_id=metrics-test")
    try:
        start = wait_for(lambda: events(read_log(out), "start"), 120, "start event", proc)[0]
        ports = start["metrics_ports"]
        assert len(ports) == 2 and len(set(ports)) == 2
        wait_for(lambda: len(step_lines(read_log(out))) >= 3, 120, "step 3", proc)
        per_rank = [scrape(port) for port in ports]
        for samples in per_rank:
            names = {n.removesuffix("_bucket").removesuffix("_count").removesuffix("_sum") for n in samples}
            assert CONTRACT_NAMES <= names
            assert value(samples, "rnalm_train_steps_total") >= 3 and value(samples, "rnalm_train_step") >= 3
            assert value(samples, "rnalm_train_tokens_total") > 0 and value(samples, "rnalm_train_samples_total") > 0
            assert 0 < value(samples, "rnalm_train_loss") < 10
            assert value(samples, "rnalm_train_learning_rate") > 0
            assert value(samples, "rnalm_train_step_duration_seconds_count") >= 3
            assert value(samples, "rnalm_train_tokens_per_second") > 0
            assert value(samples, "rnalm_device_memory_allocated_bytes") > 0
            (info,) = samples["rnalm_run_info"]
            assert info.labels["run_id"] == "metrics-test" and info.labels["world_size"] == "2"
        proc.send_signal(signal.SIGTERM)  # to torchrun only: it passes SIGTERM on to its workers
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            signal_tree(proc, signal.SIGKILL)
    records = read_log(out)
    stopped = events(records, "preempted")
    assert len(stopped) == 1 and stopped[0]["step"] < 400
    assert latest_tag(out / "checkpoints") == tag_for(stopped[0]["step"])


def test_a_metrics_port_held_by_another_job_does_not_stop_the_run(pretrain_shards, tmp_path):
    """Two jobs on one node with the same metrics.port_base: the second died with a traceback, then was a refused
    start; a requeue that lands beside another job ended a weeks-long run over its metrics. It trains on."""
    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        proc = run_trainer(pretrain_shards, tmp_path / "run", "--train.max_steps=1", "--metrics.bind=127.0.0.1",
                           f"--metrics.port_base={port}", nproc=1)
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("python -m pretrain.train: warning: ")]
    assert f"rank 0: metrics endpoint 127.0.0.1:{port} (metrics.port_base {port} + local rank 0): " in line
    assert "another job on this node may hold it: this rank trains on without metrics" in line
    assert "OSError" not in proc.stderr
    (start,) = events(read_log(tmp_path / "run"), "start")
    assert start["metrics_ports"] == [None] and events(read_log(tmp_path / "run"), "done")


def test_a_metrics_address_this_node_lacks_says_so(pretrain_shards, tmp_path):
    """It blamed another job on the node for the port, as for a port in use."""
    proc = run_trainer(pretrain_shards, tmp_path / "run", "--train.max_steps=1", "--metrics.bind=192.0.2.1",
                       f"--metrics.port_base={free_port(1)}", nproc=1, expect_rc=1)   # TEST-NET-1: nobody's address
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("python -m pretrain.train: error: ")]
    assert "metrics endpoint 192.0.2.1:" in line and "check metrics.bind (an address of this node" in line
    assert "another job" not in line and "(exitcode: 2)" in proc.stderr
