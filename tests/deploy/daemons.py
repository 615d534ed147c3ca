"""Real daemons for the deployment tests, started and stopped on loopback under one base directory.

SlurmCluster: munged + slurmctld + one slurmd per node (``node1``, ``node2``: all on this machine) as root,
all state, logs and the munge key under ``base``; clients find it through ``SLURM_CONF`` (``cluster.env``).
Nothing is written to /etc.
Prometheus: a server with a given config, on 127.0.0.1:<free port>, with a tiny HTTP API client.
Recipes and timings: shared/notes/spike_ops.md.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parents[2]


def free_port(count: int = 1) -> int:
    """A port p such that p..p+count-1 are all free right now, drawn from 10000-19999: below the kernel's ephemeral
    range (32768 up by default), where any outgoing connection, e.g. a rank's rendezvous, may take a port between
    this check and the bind it is for, and below pretrain.sh's rendezvous ports (20000 + job id % 12000)."""
    draw = random.Random()
    for _ in range(500):
        base = draw.randrange(10000, 20000 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("", p))  # every address, as the trainer's metrics endpoint binds 0.0.0.0
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found in 10000-19999")


def wait_until(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value; TimeoutError naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------------------------- Slurm
SLURM_CONF = """\
ClusterName=rnalmtest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1,sched_interval=1
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
ReturnToService=2
InactiveLimit=0
KillWait=10
MinJobAge=600
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""
# Every "node" is a slurmd of its own on this machine (own port, spool, pid and log via %n), reached at
# 127.0.0.1: enough for real multi-node jobs (`sbatch --nodes=2`) on one host.
NODE_LINE = "NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={port} CPUs={cpus} State=UNKNOWN"


# Pending reasons that mean the request does not fit the one test node (fail at once instead of timing out).
NEVER_RUNS = {"PartitionConfig", "PartitionNodeLimit", "PartitionTimeLimit", "BadConstraints", "ReqNodeNotAvail"}


@dataclass
class SlurmCluster:
    base: Path
    nodes: int = 2
    cpus: int = field(default_factory=lambda: max(2, os.cpu_count() or 1))   # per node
    # munged wants every parent of its socket traversable by all; pytest's tmp dirs are 0700, so the socket
    # (and munged's pid file) live in a private 0755 dir directly under the system temp dir.
    run_dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="rnalm-munge-")))

    @property
    def conf(self) -> Path:
        return self.base / "slurm.conf"

    @property
    def sock(self) -> Path:
        return self.run_dir / "munge.sock"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, scontrol, ...) talking to this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def start(self) -> "SlurmCluster":
        b = self.base
        for d in ("state", "spool", "log", "munge/etc"):
            (b / d).mkdir(parents=True, exist_ok=True)
        (b / "munge" / "etc").chmod(0o700)
        self.run_dir.chmod(0o755)
        key = b / "munge" / "etc" / "munge.key"
        if not key.exists():
            _run(["mungekey", "--create", f"--keyfile={key}"])
        _run(["munged", "-S", str(self.sock), f"--key-file={key}", f"--log-file={b}/log/munged.log",
              f"--pid-file={self.run_dir}/munged.pid", f"--seed-file={b}/munge/etc/munged.seed"])
        lines = [NODE_LINE.format(name=n, port=free_port(), cpus=self.cpus) for n in self.node_names]
        self.conf.write_text(SLURM_CONF.format(base=b, sock=self.sock, ctld_port=free_port(),
                                               node_lines="\n".join(lines)))
        _run(["slurmctld", "-i"], env=self.env)
        for name in self.node_names:
            _run(["slurmd", "-N", name], env=self.env)

        def all_idle():
            states = self.cmd("sinfo", "-h", "-N", "-o", "%T", check=False).split()
            return len(states) == self.nodes and set(states) == {"idle"}

        try:
            wait_until(all_idle, timeout=30, interval=0.1, what=f"{self.nodes} Slurm nodes to become idle")
        except TimeoutError as e:
            raise RuntimeError(f"{e}\n{self.logs()}") from None
        return self

    @property
    def node_names(self) -> list[str]:
        return [f"node{i}" for i in range(1, self.nodes + 1)]

    def stop(self) -> None:
        # Let every job end first: a slurmstepd whose slurmd is gone never exits.
        self.cmd("scancel", "--user=root", check=False)
        try:
            wait_until(lambda: not self.cmd("squeue", "-h", check=False).strip(), 60, what="the queue to drain")
        except TimeoutError:
            self.cmd("scancel", "--full", "--signal=KILL", "--user=root", check=False)
            time.sleep(2)
        self.cmd("scontrol", "shutdown", check=False)
        for pid_file in ["slurmctld.pid"] + [f"slurmd-{n}.pid" for n in self.node_names]:
            _wait_pid_file_gone(self.base / pid_file, timeout=15)
        for pid in self.leftover_pids():   # e.g. after a job killed at the worst moment
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["munged", "-S", str(self.sock), "--stop"], capture_output=True)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def leftover_pids(self) -> list[int]:
        """Processes of this cluster still alive (daemons, step daemons, tasks): they carry its SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit() and int(proc.name) != os.getpid():
                try:
                    if marker in (proc / "environ").read_bytes().split(b"\0"):
                        pids.append(int(proc.name))
                except OSError:
                    continue
        return pids

    def cmd(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (rc {r.returncode}): {r.stderr.strip()}")
        return r.stdout

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id. ``env`` adds variables to the job's environment."""
        r = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                           capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed (rc {r.returncode}): {r.stderr.strip()}")
        return r.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.cmd("scontrol", "show", "job", "-o", job_id)
        return dict(m.groups() for m in re.finditer(r"(\w+(?::\w+)?)=(\S*)", out))

    def wait_state(self, job_id: str, states: set[str], timeout: float) -> dict[str, str]:
        info: dict[str, str] = {}

        def reached():
            nonlocal info
            info = self.job(job_id)
            if info.get("JobState") == "PENDING" and info.get("Reason") in NEVER_RUNS:
                raise RuntimeError(f"job {job_id} can never run on the test node: Reason={info['Reason']} {info}")
            return info.get("JobState") in states

        try:
            wait_until(reached, timeout, interval=0.5, what=f"job {job_id} to reach {sorted(states)}")
        except TimeoutError as e:
            raise TimeoutError(f"{e}; last: {info}") from None
        return info

    def logs(self) -> str:
        parts = []
        for name in ["slurmctld.log", "munged.log"] + [f"slurmd-{n}.log" for n in self.node_names]:
            p = self.base / "log" / name
            if p.exists():
                parts.append(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


def _run(args: list[str], env: dict[str, str] | None = None) -> None:
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed (rc {r.returncode}): {r.stderr.strip()}")


def _wait_pid_file_gone(pid_file: Path, timeout: float) -> None:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------ Prometheus
def prometheus_test_config(work: Path, interval: str = "1s") -> Path:
    """A copy of deploy/prometheus (prometheus.yml + rules/) in ``work`` with test-speed intervals; nothing else
    changes, so the relative paths (rules/, targets/*.json) resolve as in a real deployment: a job's target file
    goes to ``work/targets``."""
    import yaml

    prom_dir = REPO / "deploy" / "prometheus"
    shutil.copytree(prom_dir / "rules", work / "rules")
    (work / "targets").mkdir()
    cfg = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval=interval, evaluation_interval=interval)
    for job in cfg["scrape_configs"]:
        for sd in job.get("file_sd_configs", []):
            sd["refresh_interval"] = interval
    out = work / "prometheus.yml"
    out.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


@dataclass
class Prometheus:
    config: Path
    data_dir: Path
    log: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def targets_dir(self) -> Path:
        """Where file_sd looks for training jobs (targets/*.json next to prometheus.yml)."""
        return self.config.parent / "targets"

    def start(self) -> "Prometheus":
        self.port = self.port or free_port()
        self.proc = subprocess.Popen(
            ["prometheus", f"--config.file={self.config}", f"--storage.tsdb.path={self.data_dir}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-lifecycle"],
            stdout=subprocess.DEVNULL, stderr=open(self.log, "w"))

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                return requests.get(f"{self.url}/-/ready", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_until(ready, timeout=30, interval=0.1, what="prometheus /-/ready")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, **params) -> dict | list:
        r = requests.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus {path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """Instant query; the result vector (each item: metric labels + value)."""
        return self.api("query", query=expr)["result"]

    def wait_for(self, expr: str, timeout: float = 30, what: str | None = None) -> list[dict]:
        return wait_until(lambda: self.query(expr), timeout, interval=0.5, what=what or f"a result for {expr!r}")

    def active_targets(self, job: str) -> list[dict]:
        return [t for t in self.api("targets", state="active")["activeTargets"] if t["labels"].get("job") == job]


def start_prometheus(work: Path) -> Prometheus:
    """A Prometheus with the repository's config and rules (test intervals), its files under ``work``;
    training jobs are discovered from ``server.targets_dir``."""
    work.mkdir(parents=True, exist_ok=True)
    cfg = prometheus_test_config(work)
    return Prometheus(cfg, work / "data", work / "prometheus.log").start()


def value(sample: dict) -> float:
    return float(sample["value"][1])


def read_jsonl(path: Path) -> list[dict]:
    """The complete lines' records: a line the writer is still writing is left for the next read."""
    lines = path.read_text().split("\n")[:-1]
    return [json.loads(line) for line in lines if line.strip()]


def require_tools(*names: str) -> None:
    """Install the missing system tools with deploy/install_sysdeps.sh (apt, as root); skip with the
    installer's reason only when that is impossible."""
    import pytest

    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    r = subprocess.run(["bash", str(REPO / "deploy" / "install_sysdeps.sh")], capture_output=True, text=True)
    still = [n for n in names if shutil.which(n) is None]
    if still:
        why = (r.stderr or r.stdout).strip() or f"installer exited {r.returncode}"
        pytest.skip(f"{', '.join(still)} not installed and could not be installed: {why}")
