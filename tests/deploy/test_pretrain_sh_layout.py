"""pretrain.sh's multi-node layout without a cluster: the batch environment of an 8-node x 8-GPU job set by hand,
stub scontrol/srun/squeue on PATH, a stand-in trainer. srun's stub runs the wrapped command as the first and the
last task, so the ranks' RANK/LOCAL_RANK/WORLD_SIZE/MASTER_* are the ones the real tasks would get."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.daemons import REPO

STUBS = {
    "scontrol": r"""case "$1 $2" in
  "show hostnames") for i in $(seq -f '%02g' 1 "$NODES"); do echo "gpu$i"; done ;;
  "show node") echo "NodeName=$4 NodeAddr=10.0.0.$((10#${4#gpu})) State=ALLOCATED" ;;
  "requeue "*) echo "scontrol $*" >> "$CALLS" ;;
esac""",
    "squeue": "exit 0",
    "scancel": 'echo "scancel $*" >> "$CALLS"',
    # [--options] bash -c SCRIPT rank PYTHON ARGS...: the first and last task. A job's --gpus-per-task (or a site's
    # SLURM_GPU_BIND) binds each task to its own GPU unless srun says --gpu-bind=none (srun(1)).
    "srun": r"""echo "srun $*" >> "$CALLS"; bind=${SLURM_GPUS_PER_TASK:+per_task}${SLURM_GPU_BIND:-}
while [ "${1#--}" != "$1" ]; do [ "$1" = --gpu-bind=none ] && bind=; shift; done
task() { SLURM_PROCID=$1 SLURM_LOCALID=$2 CUDA_VISIBLE_DEVICES=${bind:+$2} "${@:3}"; }
task 0 0 "$@" && task $((SLURM_NTASKS - 1)) $((TASKS - 1)) "$@" """,
}
TRAINER = r"""if [ "$1 $2" = '-m pretrain.train' ]; then
  if [ -n "${CUDA_VISIBLE_DEVICES:-}" ] && [ "$LOCAL_RANK" -gt 0 ]; then   # one device: cuda:0 only
    echo "rank $RANK: CUDA error: invalid device ordinal" >&2; exit 1
  fi
  echo "rank $RANK local $LOCAL_RANK world $WORLD_SIZE master $MASTER_ADDR:$MASTER_PORT" >> "$CALLS"
  cp "$SD/rnalm-$SLURM_JOB_ID.json" "$SD/seen.json"; exit 0
fi
exec "$REAL_PYTHON" "$@"
"""


def run_script(tmp: Path, nodes: int, tasks: int, gpus: int, job_id: int = 123456, trainer: str = TRAINER,
               args: tuple[str, ...] = (), env: dict[str, str] | None = None
               ) -> tuple[subprocess.CompletedProcess, str, Path]:
    bin_dir, sd = tmp / "bin", tmp / "sd"
    bin_dir.mkdir()
    sd.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (tmp / "python").write_text(f"#!/bin/bash\n{trainer}")
    (tmp / "python").chmod(0o755)
    calls = tmp / "calls"
    calls.touch()
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp), "NODES": str(nodes), "TASKS": str(tasks),
           "CALLS": str(calls), "SD": str(sd), "REAL_PYTHON": sys.executable, "RNALM_PYTHON": str(tmp / "python"),
           "RNALM_PROM_SD_DIR": str(sd), "SLURM_JOB_ID": str(job_id), "SLURM_JOB_NAME": "rnalm-pretrain",
           "SLURM_SUBMIT_DIR": str(REPO), "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]",
           "SLURM_NTASKS": str(nodes * tasks), "SLURM_TASKS_PER_NODE": f"{tasks}(x{nodes})",
           "SLURM_GPUS_ON_NODE": str(gpus), "SLURM_CPUS_PER_TASK": "8", **(env or {})}
    # Output to files, not pipes: a background `sleep` of the script's USR1 forwarder would hold a pipe open.
    with open(tmp / "stdout", "w+") as out, open(tmp / "stderr", "w+") as err:
        r = subprocess.run(["bash", str(REPO / "deploy/slurm/pretrain.sh"), "pretrain/configs/giga.yaml",
                            "--data.shards=/shared/shards", *args], cwd=REPO, env=env, stdout=out, stderr=err,
                           timeout=120)
    r.stdout, r.stderr = (tmp / "stdout").read_text(), (tmp / "stderr").read_text()
    return r, calls.read_text(), sd


def test_eight_nodes_of_eight_gpus(tmp_path):
    r, calls, sd = run_script(tmp_path, nodes=8, tasks=8, gpus=8)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "8 node(s)" in r.stdout and "64 ranks, 8 GPU(s)/node, master 10.0.0.1:23456" in r.stdout
    assert "rank 0 local 0 world 64 master 10.0.0.1:23456" in calls
    assert "rank 63 local 7 world 64 master 10.0.0.1:23456" in calls
    groups = json.loads((sd / "seen.json").read_text())
    assert [g["targets"] for g in groups] == [[f"10.0.0.{n}:{9500 + local}"] for n in range(1, 9) for local in range(8)]
    assert [g["labels"]["rank"] for g in groups] == [str(i) for i in range(64)]
    assert groups[63]["labels"] == {"rank": "63", "local_rank": "7", "node": "gpu08", "slurm_job_id": "123456",
                                    "slurm_job_name": "rnalm-pretrain"}
    assert not (sd / "rnalm-123456.json").exists()  # removed when the job ended


@pytest.mark.parametrize("binding", [{"SLURM_GPUS_PER_TASK": "1"}, {"SLURM_GPU_BIND": "map_gpu:0,1,2,3"}])
def test_tasks_see_every_gpu_of_their_node_whatever_the_job_binds(tmp_path, binding):
    """`sbatch --gpus-per-task=1` (common site advice) or a site's GPU binding left each task one device, and every
    local rank >= 1 failed at cuda:LOCAL_RANK."""
    r, calls, _ = run_script(tmp_path, nodes=2, tasks=4, gpus=4, env=binding)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "--gpu-bind=none" in calls and "rank 7 local 3 world 8" in calls


def test_cpu_jobs_ask_srun_for_no_gpu_binding(tmp_path):
    r, calls, _ = run_script(tmp_path, nodes=1, tasks=2, gpus=0)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "srun" in calls and "--gpu-bind" not in calls


def test_jobs_sharing_a_node_serve_metrics_on_ports_of_their_own(tmp_path):
    """Every job served on the config's port base: a second job on the node was refused at start (port in use)."""
    ports = {}
    for job_id, args in ((123456, ()), (123457, ()), (123458, ("--metrics.port_base=9700",)),
                         (123459, ("--metrics.port-base=9700",))):   # the trainer's other spelling: was shifted
        tmp = tmp_path / str(job_id)
        tmp.mkdir()
        r, calls, sd = run_script(tmp, nodes=1, tasks=4, gpus=4, job_id=job_id, args=args)
        assert r.returncode == 0, r.stdout + r.stderr
        ports[job_id] = [g["targets"][0].rsplit(":", 1)[1] for g in json.loads((sd / "seen.json").read_text())]
        # the ranks serve what the targets say
        assert any(f"--metrics.port{c}base={ports[job_id][0]}" in calls for c in "_-")
    assert ports == {123456: ["9500", "9501", "9502", "9503"], 123457: ["9516", "9517", "9518", "9519"],
                     123458: ["9700", "9701", "9702", "9703"],    # an explicit base is taken as it is
                     123459: ["9700", "9701", "9702", "9703"]}


def test_rendezvous_port_stays_below_the_ephemeral_range(tmp_path):
    """Ports from 32768 up may be held by any outgoing connection on the first node (Linux's default range)."""
    r, calls, _ = run_script(tmp_path, nodes=1, tasks=1, gpus=1, job_id=19999)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "master 10.0.0.1:27999" in calls


def test_more_tasks_than_gpus_per_node_stops_before_srun(tmp_path):
    """`sbatch --nodes=2 --gpus-per-node=4 pretrain.sh` keeps the script's --ntasks-per-node=8: ranks 4..7 of
    each node would have no GPU (cuda:4 on a node with 4 fails in start-up, after the allocation is held)."""
    r, calls, sd = run_script(tmp_path, nodes=2, tasks=8, gpus=4)
    assert r.returncode != 0 and "srun" not in calls
    assert "4 GPU(s) per node but tasks per node 8(x2)" in r.stdout + r.stderr
    assert "--ntasks-per-node=4" in r.stdout + r.stderr
    assert not list(sd.iterdir())


def test_fewer_tasks_than_gpus_per_node_stops_before_srun(tmp_path):
    """--ntasks-per-node=4 on 8-GPU nodes would train on half the GPUs of the allocation without a word."""
    r, calls, _ = run_script(tmp_path, nodes=2, tasks=4, gpus=8)
    assert r.returncode != 0 and "srun" not in calls
    assert "8 GPU(s) per node but tasks per node 4(x2)" in r.stdout + r.stderr


def test_fewer_tasks_than_the_allocations_task_slots_stops_before_srun(tmp_path):
    """`sbatch --nodes=2 --ntasks-per-node=8 --ntasks=12`: srun would run 12 ranks in 16 slots by Slurm's own
    layout, leaving GPUs idle, while the targets named ranks 12-15 that never run (each a RnalmRankDown page)."""
    r, calls, sd = run_script(tmp_path, nodes=2, tasks=8, gpus=8, env={"SLURM_NTASKS": "12"})
    assert r.returncode != 0 and "srun" not in calls and not list(sd.iterdir())
    assert "the job has 12 tasks but tasks per node 8(x2) (16 task slots)" in r.stdout + r.stderr


def test_the_ranks_get_the_scripts_environment_under_sbatch_export_none(tmp_path):
    """`sbatch --export=NONE` leaves SLURM_EXPORT_ENV=NONE in the job, which its steps inherit: srun started the
    ranks without MASTER_ADDR, WORLD_SIZE or PATH."""
    trainer = TRAINER.replace('echo "rank $RANK', 'echo "export $SLURM_EXPORT_ENV rank $RANK')
    r, calls, _ = run_script(tmp_path, nodes=1, tasks=2, gpus=2, trainer=trainer, env={"SLURM_EXPORT_ENV": "NONE"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "export ALL rank 0 local 0 world 2" in calls
