#!/usr/bin/env python3
"""Write the Prometheus file_sd target file of a Slurm training job: one target per rank.

pretrain.sh calls this from the batch shell; the ranks are laid out over the nodes the way `srun` places them
under the job's --distribution (its node level: block fills node i with the next tasks_per_node[i] ranks,
cyclic deals them out one at a time and plane=N N at a time, round the nodes, skipping full ones; local ranks
count 0..n-1 on each node in rank order; under arbitrary only the hostfile knows, so no `rank` label), and a
rank on node h serves its metrics on addr(h):(port_base + local_rank), addr(h) being the node's address
(Slurm's NodeAddr, by default the node name); the `node` label is the node name. The file is written to a
temporary name and renamed, so a watching Prometheus never reads half a file. Stdlib only.

    prom_targets.py --out DIR/rnalm-123.json --job-id 123 --job-name pretrain --hosts "gpu001 gpu002" \
        --addresses "10.0.0.1 10.0.0.2" --tasks-per-node "$SLURM_TASKS_PER_NODE"
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path

_TASKS = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed SLURM_TASKS_PER_NODE, e.g. "4(x2),3" -> [4, 4, 3]."""
    counts: list[int] = []
    for part in spec.split(","):
        m = _TASKS.match(part.strip())
        if m is None:
            raise ValueError(f"cannot parse SLURM_TASKS_PER_NODE={spec!r} (part {part!r})")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def ranks_per_node(tasks_per_node: list[int], distribution: str = "block",
                   plane_size: int | None = None) -> list[list[int]] | None:
    """Each node's global ranks in local-rank order, as srun deals them out under `distribution` (Slurm's
    SLURM_DISTRIBUTION, e.g. "cyclic:block,Pack"; plane's size comes apart, as SLURM_DIST_PLANESIZE); None for
    arbitrary, where the hostfile decides. The step's tasks per node are taken to be the allocation's, as in
    jobs of whole GPU nodes (under plane, Slurm counts them from the nodes' CPUs, which can differ)."""
    level = distribution.split(",")[0].split(":")[0].strip().lower()
    if level in ("", "*", "block", "pack", "nopack"):   # pack/nopack alone keep the default, block
        deal = max(tasks_per_node, default=1)
    elif level == "cyclic":
        deal = 1
    elif level.startswith("plane"):
        size = level.partition("=")[2] or plane_size
        if not str(size).isdigit() or int(size) < 1:
            raise ValueError(f"distribution {distribution!r} without a plane size (SLURM_DIST_PLANESIZE)")
        deal = int(size)
    elif level in ("arbitrary", "hostfile"):
        return None
    else:
        raise ValueError(f"unknown Slurm distribution {distribution!r}")
    layout: list[list[int]] = [[] for _ in tasks_per_node]
    rank, total = 0, sum(tasks_per_node)
    while rank < total:
        for node, ntasks in enumerate(tasks_per_node):
            take = min(deal, ntasks - len(layout[node]))
            layout[node] += range(rank, rank + take)
            rank += take
    return layout


def target_groups(hosts: list[str], tasks_per_node: list[int], port_base: int, job_id: str, job_name: str,
                  addresses: list[str] | None = None, distribution: str = "block",
                  plane_size: int | None = None) -> list[dict]:
    addresses = addresses or hosts
    if not len(hosts) == len(addresses) == len(tasks_per_node):
        raise ValueError(f"{len(hosts)} hosts ({' '.join(hosts)}), {len(addresses)} addresses but tasks per node "
                         f"for {len(tasks_per_node)}")
    layout = ranks_per_node(tasks_per_node, distribution, plane_size)
    groups = []
    for node, (host, addr, ntasks) in enumerate(zip(hosts, addresses, tasks_per_node)):
        for local_rank in range(ntasks):
            rank = {} if layout is None else {"rank": str(layout[node][local_rank])}
            groups.append({
                "targets": [f"{f'[{addr}]' if ':' in addr else addr}:{port_base + local_rank}"],  # IPv6: [a]:p
                "labels": {**rank, "local_rank": str(local_rank), "node": host,
                           "slurm_job_id": job_id, "slurm_job_name": job_name},
            })
    return sorted(groups, key=lambda g: int(g["labels"].get("rank", 0)))


def write_atomic(path: Path, groups: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary name does not end in .json, so a `*.json` file_sd glob never matches it.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(groups, f, indent=1)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="target file (*.json) in the file_sd directory")
    p.add_argument("--job-id", required=True)
    p.add_argument("--job-name", default="")
    p.add_argument("--hosts", required=True, help="node names, whitespace/comma separated, in node order")
    p.add_argument("--addresses", default="", help="the nodes' addresses, same order (default: the names)")
    p.add_argument("--tasks-per-node", required=True, help="SLURM_TASKS_PER_NODE, e.g. '8(x4)'")
    p.add_argument("--port-base", type=int, default=9500)
    p.add_argument("--distribution", default="block", help="srun's --distribution (SLURM_DISTRIBUTION)")
    p.add_argument("--plane-size", type=int, default=None, help="SLURM_DIST_PLANESIZE, for plane")
    a = p.parse_args(argv)
    hosts, addresses = (v.replace(",", " ").split() for v in (a.hosts, a.addresses))
    try:
        groups = target_groups(hosts, expand_tasks_per_node(a.tasks_per_node), a.port_base, a.job_id, a.job_name,
                               addresses, a.distribution, a.plane_size)
    except ValueError as e:
        p.error(str(e))
    if groups and "rank" not in groups[0]["labels"]:
        print(f"prom_targets: no rank labels: under distribution {a.distribution} the hostfile places the ranks",
              file=sys.stderr)
    write_atomic(a.out, groups)


if __name__ == "__main__":
    main()
