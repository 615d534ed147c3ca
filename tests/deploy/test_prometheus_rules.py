"""promtool checks of the shipped Prometheus config, recording/alert rules and the alert unit tests."""
from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.daemons import REPO, require_tools
from tests.contract import METRIC_NAMES

pytestmark = pytest.mark.system
PROM = REPO / "deploy" / "prometheus"
RULES = PROM / "rules"

# Metric names the trainer exports (contract C); the dashboard and rules may use only these (plus Prometheus'
# own `up` and the DCGM exporter's DCGM_FI_* names).
CONTRACT_METRICS = METRIC_NAMES
HISTOGRAMS = {"rnalm_train_step_duration_seconds"}  # queried as _bucket, _sum, _count


def promtool(*args: str, cwd: Path = PROM) -> subprocess.CompletedProcess:
    require_tools("promtool")
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alert_names() -> list[str]:
    return [r["alert"] for r in rules() if "alert" in r]


def rules() -> list[dict]:
    return [r for g in yaml.safe_load((RULES / "rnalm.yml").read_text())["groups"] for r in g["rules"]]


def test_promtool_checks_config_and_rules():
    r = promtool("check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout
    r = promtool("check", "rules", "rules/rnalm.yml")
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_alert_unit_tests_pass():
    r = promtool("test", "rules", "rnalm_test.yml", cwd=RULES)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_issue_alerts_exist_and_each_has_firing_and_quiet_cases():
    names = alert_names()
    for wanted in ("RnalmTrainingStalled", "RnalmLossNotFinite", "RnalmLossDiverging", "RnalmThroughputLow",
                   "RnalmDataloaderBound", "RnalmShardsSkipped", "RnalmRankDown", "RnalmCheckpointOverdue",
                   "RnalmNonfiniteStepSkipped"):
        assert wanted in names
    tests = yaml.safe_load((RULES / "rnalm_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    for name in names:
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"{name}: no promtool case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{name}: no promtool case where it stays quiet"


def test_promtool_unit_tests_catch_a_broken_threshold(tmp_path):
    """The unit tests are sharp: loosening one threshold (stall after 60 min instead of 10) makes them fail."""
    (tmp_path / "rnalm_test.yml").write_text((RULES / "rnalm_test.yml").read_text())
    alerts = (RULES / "rnalm.yml").read_text()
    broken = alerts.replace("slurm_job:rnalm_train_last_step_age_seconds:min > 600",
                            "slurm_job:rnalm_train_last_step_age_seconds:min > 3600")
    assert broken != alerts
    (tmp_path / "rnalm.yml").write_text(broken)
    r = promtool("test", "rules", "rnalm_test.yml", cwd=tmp_path)
    assert r.returncode != 0
    assert "RnalmTrainingStalled" in r.stdout + r.stderr


def _metric_names(expr: str) -> set[str]:
    """Whole series names with rnalm_ in them (recorded ones as level:metric:operation), not label values."""
    return set(re.findall(r'(?<![\w:"])((?:[a-z_]+:)?rnalm_[a-z0-9_]+(?::[a-z0-9_]+)?)', expr))


def _base_metric(name: str) -> str:
    return re.sub(r"_(bucket|sum|count)$", "", name)


def test_rules_and_dashboard_use_only_contract_metrics():
    exprs = [r["expr"] for r in rules()]
    dash = json.loads((PROM / "grafana_dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    recorded = {r["record"] for r in rules() if "record" in r}
    for expr in exprs:
        for name in _metric_names(expr):  # exactly: a counter queried without _total is an empty series
            assert name in recorded | CONTRACT_METRICS or _base_metric(name) in HISTOGRAMS, \
                f"{name} (in {expr!r}) is neither a trainer metric nor a recorded rule"


def test_dashboard_covers_the_issue_panels():
    dash = json.loads((PROM / "grafana_dashboard.json").read_text())
    assert dash["uid"] and dash["panels"]
    text = json.dumps(dash["panels"])
    for metric in ("tokens", "mfu_ratio", "rnalm_train_loss", "learning_rate", "grad_norm",
                   "dataloader_wait", "dataloader_corrupt_shards", "device_memory"):
        assert metric in text, f"dashboard has no panel for {metric}"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "slurm_job_id"} <= variables
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert 'slurm_job_id=~"$slurm_job_id"' in t["expr"], (p["title"], t["expr"])
