#!/bin/bash
# Fine-tuning on a Slurm GPU cluster: one `python -m finetune ...` command per job, on one GPU. An ArchiveII
# leave-one-family-out run over several families goes to a job array: every array task runs the same command,
# takes the families no other task holds (OUT/<family>/run.lock), one at a time, and the task that finds every
# family finished writes the summary (OUT/results.md).
#
#   sbatch deploy/slurm/finetune.sh ss train --model.path=giga_model --train.out_dir=runs/ss_bprna
#   sbatch --array=0-8 deploy/slurm/finetune.sh ss train --model.path=giga_model --data.dataset=archiveii \
#          --data.test_family=all --train.out_dir=runs/ss_archiveii          # the paper's 9 families on 9 GPUs
#   sbatch deploy/slurm/finetune.sh predict-ss --model=runs/ss_bprna --fasta=my.fa --out=pred --format=ct
#   CPU only (tests):  sbatch --gpus-per-node=0 deploy/slurm/finetune.sh ...
#
# Every #SBATCH default can be overridden on the sbatch command line; all arguments go to `python -m finetune`.
# Knobs: RNALM_REPO (repository root; default: the submit directory), RNALM_PYTHON (default:
# $RNALM_REPO/.venv/bin/python).
# Stopped (time limit, preemption, a failed task)? Submit the same command again: ArchiveII families finished
# with the same settings are reused; a single run starts again. A requeued task takes over its own family's lock.
#
#SBATCH --job-name=rnalm-finetune
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -uo pipefail

NAME=finetune.sh
RNALM_REPO=${RNALM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$RNALM_REPO/deploy/slurm/common.sh" ] \
  || { echo "[finetune.sh] error: $RNALM_REPO is not the repository root (submit from it or set RNALM_REPO)" >&2; exit 1; }
# shellcheck source=deploy/slurm/common.sh
source "$RNALM_REPO/deploy/slurm/common.sh"
[ $# -gt 0 ] || die "no arguments: give a python -m finetune command, e.g. ss train --model.path=MODEL --train.out_dir=OUT"

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}} PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1
TASK=${SLURM_ARRAY_TASK_ID:+, array task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID}
log "job $SLURM_JOB_ID$TASK on $(hostname), GPU(s) ${CUDA_VISIBLE_DEVICES:-none}: python -m finetune $*"
"$PYTHON" -m finetune "$@"
RC=$?
log "python -m finetune ended with exit code $RC"
exit "$RC"
