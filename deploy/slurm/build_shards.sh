#!/bin/bash
# Build pretraining shards with dataprep's MPI mode across nodes: one MPI rank per node (srun + PMIx, no
# mpirun/ssh), each rank using its node's CPUs for parsing/shard writing (--workers) and MMseqs2 (--threads).
# Input and output must be on a file system every node sees.
#
#   sbatch deploy/slurm/build_shards.sh --input /shared/raw/*.fa.gz --out /shared/shards [build_shards.py options]
#   sbatch --nodes=8 --cpus-per-task=64 deploy/slurm/build_shards.sh --input ... --out ...
#
# Every #SBATCH default can be overridden on the sbatch command line; all arguments go to
# dataprep/build_shards.py (options given here win over the --workers/--threads defaults). Knobs:
#   RNALM_REPO     repository root   (default: the submit directory)
#   RNALM_PYTHON   interpreter       (default: $RNALM_REPO/.venv/bin/python)
#   RNALM_SRUN_MPI srun --mpi plugin (default: pmix; `srun --mpi=list` shows what the cluster has)
# Interrupted? Submit the same command again: build_shards.py reuses its finished stages and MMseqs2 steps
# (OUT/.work; after a node crash, delete OUT/.work/*.tmp first: docs/dataprep.md).
#
#SBATCH --job-name=rnalm-shards
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out

set -uo pipefail

NAME=build_shards.sh
RNALM_REPO=${RNALM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$RNALM_REPO/deploy/slurm/common.sh" ] \
  || { echo "[build_shards.sh] error: $RNALM_REPO is not the repository root (submit from it or set RNALM_REPO)" >&2; exit 1; }
# shellcheck source=deploy/slurm/common.sh
source "$RNALM_REPO/deploy/slurm/common.sh"
[ $# -gt 0 ] || die "no arguments: give at least --input FILE... --out DIR (see python dataprep/build_shards.py -h)"

CPUS=${SLURM_CPUS_PER_TASK:-1}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1   # parallelism comes from ranks, --workers and --threads
# The ranks fork worker processes after MPI_Init, which InfiniBand verbs (Open MPI's openib/UCX) do not survive
# on older kernels and rdma-core (ibv_fork_init(3): data corruption, segfaults). The MPI traffic here is small
# control data and arrays: Open MPI's ob1 over TCP/shared memory (set OMPI_MCA_pml/btl to choose otherwise).
export OMPI_MCA_pml=${OMPI_MCA_pml:-ob1} OMPI_MCA_btl=${OMPI_MCA_btl:-^openib,uct,ofi}
log "job $SLURM_JOB_ID: $SLURM_NTASKS MPI ranks on $SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], $CPUS CPUs each"

srun --mpi="${RNALM_SRUN_MPI:-pmix}" --kill-on-bad-exit=1 --cpus-per-task="$CPUS" \
  "$PYTHON" dataprep/build_shards.py --mpi --workers "$CPUS" --threads "$CPUS" "$@"
RC=$?
log "build_shards.py ended with exit code $RC"
exit "$RC"
