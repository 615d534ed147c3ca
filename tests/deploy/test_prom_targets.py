"""The file_sd target file pretrain.sh writes for multi-node jobs (rank layout of srun's distribution over the nodes)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.deploy.daemons import REPO

SCRIPT = str(REPO / "deploy" / "slurm" / "prom_targets.py")


def write(tmp_path, hosts: str, tasks: str, port_base: int = 9500, addresses: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "sd" / "rnalm-77.json"), "--job-id", "77",
                           "--job-name", "giga", "--hosts", hosts, "--addresses", addresses, "--tasks-per-node", tasks,
                           "--port-base", str(port_base)], capture_output=True, text=True)


def test_one_target_per_rank_over_nodes(tmp_path):
    r = write(tmp_path, "gpu001\ngpu002 gpu003", "4(x2),2", port_base=9600)
    assert r.returncode == 0, r.stderr
    groups = json.loads((tmp_path / "sd" / "rnalm-77.json").read_text())
    assert [g["targets"] for g in groups] == [[f"gpu001:{9600 + i}"] for i in range(4)] + \
        [[f"gpu002:{9600 + i}"] for i in range(4)] + [["gpu003:9600"], ["gpu003:9601"]]
    assert [g["labels"]["rank"] for g in groups] == [str(i) for i in range(10)]
    assert [g["labels"]["local_rank"] for g in groups] == ["0", "1", "2", "3"] * 2 + ["0", "1"]
    assert {g["labels"]["slurm_job_id"] for g in groups} == {"77"}
    assert {g["labels"]["slurm_job_name"] for g in groups} == {"giga"}
    assert [p.name for p in (tmp_path / "sd").iterdir()] == ["rnalm-77.json"]   # no temporary file left
    assert (tmp_path / "sd" / "rnalm-77.json").stat().st_mode & 0o777 == 0o644   # Prometheus may run as another user


def test_targets_use_node_addresses_and_keep_node_names(tmp_path):
    r = write(tmp_path, "gpu001,gpu002", "2(x2)", addresses="10.0.0.1,10.0.0.2")
    assert r.returncode == 0, r.stderr
    groups = json.loads((tmp_path / "sd" / "rnalm-77.json").read_text())
    assert [(g["targets"][0], g["labels"]["node"]) for g in groups] == [
        ("10.0.0.1:9500", "gpu001"), ("10.0.0.1:9501", "gpu001"), ("10.0.0.2:9500", "gpu002"),
        ("10.0.0.2:9501", "gpu002")]


def test_ipv6_node_addresses_are_bracketed(tmp_path):
    """'fe80::1:9500' passes Prometheus's config check but every scrape fails ('too many colons')."""
    r = write(tmp_path, "gpu001", "2", addresses="fd00::1")
    assert r.returncode == 0, r.stderr
    groups = json.loads((tmp_path / "sd" / "rnalm-77.json").read_text())
    assert [g["targets"] for g in groups] == [["[fd00::1]:9500"], ["[fd00::1]:9501"]]


@pytest.mark.parametrize("hosts,tasks,message", [
    ("a b", "4", "2 hosts (a b), 2 addresses but tasks per node for 1"),
    ("a", "4(y2)", "cannot parse SLURM_TASKS_PER_NODE='4(y2)'"),
])
def test_inconsistent_layout_is_rejected_with_reason(tmp_path, hosts, tasks, message):
    r = write(tmp_path, hosts, tasks)
    assert r.returncode != 0 and message in r.stderr
    assert not (tmp_path / "sd" / "rnalm-77.json").exists()


def test_an_address_list_of_another_length_is_rejected():
    from deploy.slurm.prom_targets import target_groups

    with pytest.raises(ValueError, match=r"2 hosts \(a b\), 1 addresses but tasks per node for 2"):
        target_groups(["a", "b"], [2, 2], 9500, "7", "j", addresses=["10.0.0.1"])


@pytest.mark.timeout(30)   # a plane of 0 dealt nothing, forever
def test_targets_are_in_rank_order_past_rank_nine():
    from deploy.slurm.prom_targets import ranks_per_node, target_groups

    groups = target_groups(["a", "b"], [6, 6], 9500, "7", "j", distribution="cyclic")
    assert [g["labels"]["rank"] for g in groups] == [str(i) for i in range(12)]
    with pytest.raises(ValueError, match="without a plane size"):
        ranks_per_node([2], "plane=0")


@pytest.mark.parametrize("distribution,plane,expected", [
    ("block:block", None, [[0, 1, 2], [3, 4, 5], [6]]),
    ("cyclic", None, [[0, 3, 5], [1, 4, 6], [2]]),
    ("cyclic:block,Pack", None, [[0, 3, 5], [1, 4, 6], [2]]),
    ("Cyclic:Block", None, [[0, 3, 5], [1, 4, 6], [2]]),   # srun reads it in any case
    ("*:cyclic", None, [[0, 1, 2], [3, 4, 5], [6]]),   # "*": the node level's default, block
    ("nopack", None, [[0, 1, 2], [3, 4, 5], [6]]),   # Slurm takes pack/nopack alone: the default, block
    ("hostfile", None, None),
    ("plane=2", None, [[0, 1, 5], [2, 3, 6], [4]]),
    ("plane", 2, [[0, 1, 5], [2, 3, 6], [4]]),   # as srun exports it: SLURM_DISTRIBUTION=plane, SLURM_DIST_PLANESIZE=2
    ("arbitrary", None, None),
])
def test_ranks_are_dealt_out_as_srun_distributes_them(distribution, plane, expected):
    """Nodes of 3, 3 and 1 tasks; cyclic and plane skip a full node, as Slurm's step layout does (its cyclic checked
    against srun in test_slurm_pretrain)."""
    from deploy.slurm.prom_targets import ranks_per_node
    assert ranks_per_node([3, 3, 1], distribution, plane) == expected


def test_rank_labels_follow_the_distribution_and_arbitrary_gets_none(tmp_path):
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "a.json"), "--job-id", "7", "--hosts", "a b",
                        "--tasks-per-node", "2(x2)", "--distribution", "cyclic"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    groups = json.loads((tmp_path / "a.json").read_text())
    assert [(g["labels"]["rank"], g["targets"][0]) for g in groups] == [
        ("0", "a:9500"), ("1", "b:9500"), ("2", "a:9501"), ("3", "b:9501")]
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "b.json"), "--job-id", "7", "--hosts", "a b",
                        "--tasks-per-node", "2(x2)", "--distribution", "arbitrary"], capture_output=True, text=True)
    assert r.returncode == 0 and "no rank labels" in r.stderr, r.stderr
    assert all("rank" not in g["labels"] for g in json.loads((tmp_path / "b.json").read_text()))
    r = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path / "c.json"), "--job-id", "7", "--hosts", "a",
                        "--tasks-per-node", "2", "--distribution", "plane"], capture_output=True, text=True)
    assert r.returncode != 0 and "without a plane size" in r.stderr and not (tmp_path / "c.json").exists()


def test_the_file_is_renamed_into_place_from_a_name_no_json_glob_matches(tmp_path, monkeypatch):
    """file_sd reads every *.json of its directory: the half-written file must not be one."""
    from deploy.slurm import prom_targets

    renamed = []
    monkeypatch.setattr(prom_targets.os, "replace", lambda src, dst: renamed.append((src, dst)))
    prom_targets.write_atomic(tmp_path / "rnalm-1.json", [])
    (src, dst), = renamed
    assert dst == tmp_path / "rnalm-1.json" and not src.endswith(".json") and json.loads(open(src).read()) == []
