"""A real Prometheus, configured with the shipped prometheus.yml + rules, finds the trainer's metrics
endpoints (pretrain.metrics.TrainMetrics, one per rank) through the file_sd target file that pretrain.sh
writes (deploy/slurm/prom_targets.py), scrapes them, evaluates the rules and answers every dashboard query."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.daemons import REPO, free_port, value, wait_until
from tests.deploy.test_prometheus_rules import alert_names

pytestmark = [pytest.mark.system, pytest.mark.timeout(180)]
JOB_ID = "4242"

# Two ranks of one node in one process, each with its own registry and port, stepping every 0.2 s
# (they save a "checkpoint" at step 3). SIGUSR1 takes rank 1 down (its endpoint closes).
EXPORTER = r"""
import signal, sys, time
from pretrain.metrics import TrainMetrics
base = int(sys.argv[1])
ranks = [TrainMetrics(run_id="live", model="nano", world_size=2, slurm_job_id="%s") for _ in range(2)]
for i, m in enumerate(ranks):
    m.serve("127.0.0.1", base + i)
signal.signal(signal.SIGUSR1, lambda *_: ranks[1].close())
print("serving", flush=True)
step = 0
while True:
    step += 1
    for m in ranks:
        m.record_step(step=step, loss=3.0 / step, lr=1e-4, grad_norm=1.0, tokens=512, samples=4, seconds=0.2, mfu=0.01,
                      loader_wait=0.01, corrupt_shards=0)
        if step == 3:
            m.record_checkpoint(0.5)
    time.sleep(0.2)
""" % JOB_ID


def write_targets(targets_dir: Path, port_base: int, job_id: str = JOB_ID, job_name: str = "live-test") -> Path:
    """The file_sd file exactly as pretrain.sh writes it (same helper, same arguments)."""
    out = targets_dir / f"rnalm-{job_id}.json"
    subprocess.run([sys.executable, str(REPO / "deploy/slurm/prom_targets.py"), "--out", str(out),
                    "--job-id", job_id, "--job-name", job_name, "--hosts", "127.0.0.1",
                    "--tasks-per-node", "2", "--port-base", str(port_base)], check=True)
    return out


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((REPO / "deploy/prometheus/grafana_dashboard.json").read_text())
    out = []
    for p in dash["panels"]:
        for t in p["targets"]:
            expr = t["expr"].replace("$slurm_job_id", JOB_ID).replace("$__rate_interval", "10s")
            out.append((p["title"], expr))
    return out


@pytest.fixture
def exporter():
    port_base = free_port(2)
    proc = subprocess.Popen([sys.executable, "-c", EXPORTER, str(port_base)], cwd=REPO,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "serving"
    yield proc, port_base
    proc.kill()
    proc.wait()


def test_prometheus_scrapes_ranks_found_through_file_sd(tmp_path, prometheus_factory, exporter):
    proc, port_base = exporter
    prom = prometheus_factory()
    target_file = write_targets(prom.targets_dir, port_base)   # written while Prometheus runs, as in a real job

    up = prom.wait_for(f'up{{job="rnalm_train",slurm_job_id="{JOB_ID}"}} == 1', timeout=30)
    wait_until(lambda: len(prom.query(f'up{{slurm_job_id="{JOB_ID}"}} == 1')) == 2, 15, what="both ranks up")
    up = prom.query(f'up{{slurm_job_id="{JOB_ID}"}}')
    labels = sorted((s["metric"]["rank"], s["metric"]["local_rank"], s["metric"]["instance"]) for s in up)
    assert labels == [("0", "0", f"127.0.0.1:{port_base}"), ("1", "1", f"127.0.0.1:{port_base + 1}")]
    assert all(s["metric"]["slurm_job_name"] == "live-test" for s in up)

    tokens = prom.wait_for(f'rnalm_train_tokens_total{{slurm_job_id="{JOB_ID}"}} > 0')
    assert {s["metric"]["rank"] for s in tokens} <= {"0", "1"} and all(value(s) > 0 for s in tokens)
    info = prom.wait_for(f'rnalm_run_info{{slurm_job_id="{JOB_ID}"}}')
    assert info[0]["metric"]["model"] == "nano"
    assert not [k for k in info[0]["metric"] if k.startswith("exported_")]  # the rank's and the target's labels agree

    # Recording rules produce per-job series; no rule fails to evaluate.
    prom.wait_for(f'slurm_job:rnalm_train_tokens_per_second:rate5m{{slurm_job_id="{JOB_ID}"}} > 0')
    wait_until(lambda: prom.query(f'slurm_job:rnalm_checkpoint_age_seconds:min{{slurm_job_id="{JOB_ID}"}} < 600'),
               20, what="checkpoint age of the job")
    step_age = prom.query(f'slurm_job:rnalm_train_last_step_age_seconds:min{{slurm_job_id="{JOB_ID}"}}')
    assert step_age and value(step_age[0]) < 30
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert sorted(r["name"] for r in rules if r["type"] == "alerting") == sorted(alert_names())  # all loaded
    assert all(r["health"] != "err" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    # Every dashboard query is valid PromQL; the per-rank training panels have data.
    for title, expr in dashboard_queries():
        prom.query(expr)            # raises on a PromQL error
        if "DCGM" not in expr and "valid_loss" not in expr and "nonfinite" not in expr:
            # waited for: one slow scrape (1 s interval and timeout) leaves a panel empty until the next one
            wait_until(lambda: prom.query(expr), 10, what=f"data in dashboard panel {title!r} ({expr})")

    # A rank whose endpoint dies shows up as down and RnalmRankDown goes pending for that rank.
    proc.send_signal(signal.SIGUSR1)
    prom.wait_for(f'up{{slurm_job_id="{JOB_ID}",rank="1"}} == 0', timeout=20)

    def rank_down_alert():  # rank 1's: a slow scrape can make rank 0's go pending for a moment too
        alerts = prom.api("alerts")["alerts"]
        return [a for a in alerts if a["labels"]["alertname"] == "RnalmRankDown" and a["labels"]["rank"] == "1"]

    alert = wait_until(rank_down_alert, 20, what="RnalmRankDown alert for rank 1")
    assert alert[0]["state"] in ("pending", "firing")

    # Removing the target file (as pretrain.sh does when the job ends) makes Prometheus drop the targets.
    target_file.unlink()
    wait_until(lambda: not prom.active_targets("rnalm_train"), 30, what="targets to disappear")


def test_a_job_whose_ports_another_job_holds_gets_none_of_its_series(prometheus_factory, exporter):
    """Job 4343's ranks found their ports taken by job 4242's (they train on without metrics): its targets scrape
    4242's ranks. Those series carry 4343's target labels, but their rnalm_run_info keeps 4242 (honor_labels), so
    the rules count none of them for 4343 (no throughput, no step age, no rank up) and RnalmRankDown
    goes pending for its ranks; job 4242's own figures are untouched."""
    _, port_base = exporter
    prom = prometheus_factory()
    write_targets(prom.targets_dir, port_base)
    write_targets(prom.targets_dir, port_base, job_id="4343", job_name="unwatched")
    wait_until(lambda: len(prom.query('up{slurm_job_id="4343"} == 1')) == 2, 30, what="4343's targets scraped")
    prom.wait_for('rnalm_train_tokens_total{slurm_job_id="4343"} > 0')      # the other job's data, under 4343
    info = prom.wait_for('rnalm_run_info{slurm_job_name="unwatched"}')
    assert {s["metric"]["slurm_job_id"] for s in info} == {JOB_ID}

    prom.wait_for(f'slurm_job:rnalm_train_tokens_per_second:rate5m{{slurm_job_id="{JOB_ID}"}} > 0')
    assert prom.query('slurm_job:rnalm_train_tokens_per_second:rate5m{slurm_job_id="4343"}') == []
    assert prom.query('slurm_job:rnalm_train_last_step_age_seconds:min{slurm_job_id="4343"}') == []
    assert value(prom.wait_for('slurm_job:rnalm_ranks_up:sum{slurm_job_id="4343"}')[0]) == 0
    assert value(prom.wait_for(f'slurm_job:rnalm_ranks_up:sum{{slurm_job_id="{JOB_ID}"}} == 2')[0]) == 2

    def rank_down(job):
        return {a["labels"]["rank"] for a in prom.api("alerts")["alerts"]
                if a["labels"]["alertname"] == "RnalmRankDown" and a["labels"]["slurm_job_id"] == job}

    wait_until(lambda: rank_down("4343") == {"0", "1"}, 20, what="RnalmRankDown for both ranks of job 4343")
    assert rank_down(JOB_ID) == set()
