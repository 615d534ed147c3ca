#!/bin/bash
# RiNALMo pretraining on a Slurm GPU cluster: one task per GPU through srun (no ssh/pdsh), env:// rendezvous
# for DeepSpeed, self-requeue on the pre-time-limit signal, Prometheus file_sd targets for every rank.
#
#   sbatch deploy/slurm/pretrain.sh [CONFIG.yaml] [--section.key=value ...]
#   sbatch --nodes=4 --time=2-00:00:00 deploy/slurm/pretrain.sh pretrain/configs/giga.yaml \
#          --data.shards=/shared/shards --train.out_dir=/shared/runs/giga
#   (a step is token_budget x GPUs tokens: docs/pretrain.md "Batch size and epochs" sets it for the original's batch)
#   CPU only (tests, demo):  sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 \
#          deploy/slurm/pretrain.sh pretrain/configs/tiny_cpu.yaml --data.shards=...
#
# Every #SBATCH default below can be overridden on the sbatch command line. Submit from the repository root
# (or set RNALM_REPO). Knobs (environment variables at submit time; sbatch passes them to the job):
#   RNALM_REPO               repository root                          (default: the submit directory)
#   RNALM_PYTHON             interpreter                              (default: $RNALM_REPO/.venv/bin/python)
#   RNALM_METRICS_PORT_BASE  rank r serves metrics on port base+LOCAL_RANK (default: the config's
#                            metrics.port_base + 16 x (job id % 32), so jobs that share a node rarely collide:
#                            9500-10011 for the shipped configs; an explicit --metrics.port_base=N argument wins,
#                            and neither is shifted)
#   RNALM_PROM_SD_DIR        where the file_sd target file goes       (default: $RNALM_REPO/deploy/prometheus/targets)
#   RNALM_MASTER_PORT        rendezvous port on the first node        (default: 20000 + job id % 12000, below 32768)
#   RNALM_MIN_RUN_S          the least a run must get before the time limit's signal for the job to requeue on it
#                            (default 600: a start-up and some steps; docs/cluster.md "Preemption, time limits")
#   NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...: cluster-specific NCCL settings; export them before sbatch.
#
# Preemption/time limit: Slurm sends USR1 to this shell 5 minutes before the limit (--signal=B:USR1@300); it
# is forwarded to the ranks, which save a checkpoint at the next step boundary and exit 0; then the job requeues
# itself and the rerun resumes from the newest checkpoint in train.out_dir (same job id, output appended).
# A crash after a new checkpoint requeues too; a failed job keeps its Prometheus targets, so RnalmRankDown pages.
# scancel or a preemption: every rank gets SIGTERM and saves if it can within KillWait; no requeue by this script.
#
#SBATCH --job-name=rnalm-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out

set -uo pipefail

# (common.sh, sourced below, defines them again alike: here for a signal that comes before it is read)
log() { echo "[pretrain.sh $(date '+%F %T')] $*"; }
die() { log "error: $*" >&2; exit 1; }

# ----------------------------------------------------------------------------------------- signals
# First of all: Slurm may send the time-limit USR1 up to 60 s before it is due, so at the job's very start
# (short limits); an untrapped USR1 would kill this shell and end the job instead of requeueing it.
PREEMPTED=0
TERMINATED=0
# shellcheck disable=SC2317  # trap handlers
on_usr1() {
  PREEMPTED=1
  SIGNAL_AT=${SIGNAL_AT:-$SECONDS}
  log "USR1 (time limit or preemption): ranks checkpoint and exit, then the job requeues"
  forward_usr1
}
# shellcheck disable=SC2317
forward_usr1() {  # once the ranks are launched (else right after srun, below), and once
  [ -n "${STEP_PID:-}" ] && [ -z "${FORWARDER:-}" ] || return 0
  # To the job steps (the ranks), not this shell; repeated, because a rank still starting up ignores USR1
  # until the trainer has installed its handler (see the srun line).
  ( while kill -0 "$STEP_PID" 2>/dev/null; do scancel --signal=USR1 "$SLURM_JOB_ID"; sleep 20; done ) &
  FORWARDER=$!
}
# shellcheck disable=SC2317
on_term() {
  TERMINATED=1
  log "SIGTERM: the job is being cancelled or preempted by Slurm; waiting for the ranks to save"
  # The target file goes now: Slurm SIGKILLs this shell too when the ranks' save outlasts KillWait, and the
  # EXIT trap would never run (dead targets left to Prometheus: RnalmRankDown for a job that is gone).
  [ -n "${TARGETS:-}" ] && rm -f "$TARGETS"
}
trap on_usr1 USR1
trap on_term TERM

NAME=pretrain.sh
RNALM_REPO=${RNALM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
[ -f "$RNALM_REPO/deploy/slurm/common.sh" ] \
  || die "$RNALM_REPO is not the repository root (submit from it or set RNALM_REPO)"
# shellcheck source=deploy/slurm/common.sh
source "$RNALM_REPO/deploy/slurm/common.sh"

# ---------------------------------------------------------------------------------------- arguments
# [CONFIG] then overrides as the trainer takes them (--section.key=value or --section.key value; --config FILE
# works too); normalised to --key=value, picking out what this script needs to know.
CONFIG=pretrain/configs/giga.yaml
if [ $# -gt 0 ] && [[ $1 != --* ]]; then CONFIG=$1; shift; fi
OVERRIDES=()   # expanded as ${OVERRIDES[@]+"${OVERRIDES[@]}"}: bash < 4.4 (RHEL 7) calls an empty array unbound
EXPLICIT_PORT_BASE=""
while [ $# -gt 0 ]; do
  case $1 in
    --*=*) key=${1%%=*}; val=${1#*=}; shift ;;
    --*) key=$1; val=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
    *) die "unexpected argument '$1': overrides look like --section.key=value" ;;
  esac
  k=${key#--}
  case --${k//-/_} in   # the trainer takes --metrics.port-base too
    --config) CONFIG=$val; continue ;;
    --metrics.port_base) EXPLICIT_PORT_BASE=$val ;;
  esac
  OVERRIDES+=("$key=$val")
done
[ -f "$CONFIG" ] || die "config file $CONFIG not found"
if [ -z "$EXPLICIT_PORT_BASE" ] && [ -n "${RNALM_METRICS_PORT_BASE:-}" ]; then
  OVERRIDES+=("--metrics.port_base=$RNALM_METRICS_PORT_BASE")
fi
# The file_sd targets must name what the ranks really serve: the config file with the overrides, as the
# trainer reads it (a YAML `metrics: {enabled: false}` means no targets).
SETTINGS=$("$PYTHON" -m pretrain.config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"} metrics.enabled metrics.port_base \
  train.out_dir) || die "cannot read $CONFIG with the overrides: $SETTINGS"
{ read -r METRICS; read -r PORT_BASE; read -r OUT_DIR; } <<< "$SETTINGS"
# The config's port base is every job's: two jobs on one node (no --exclusive) would both bind it, and the second
# would be refused at start. Each job takes its own slot of 16 ports above it instead, as its targets say.
if [ -z "$EXPLICIT_PORT_BASE" ] && [ -z "${RNALM_METRICS_PORT_BASE:-}" ] && [ "$PORT_BASE" -gt 0 ] \
    && [ $((PORT_BASE + 16 * 32)) -le 65519 ]; then
  PORT_BASE=$((PORT_BASE + 16 * (SLURM_JOB_ID % 32)))
  OVERRIDES+=("--metrics.port_base=$PORT_BASE")
fi

# ---------------------------------------------------------------------- distributed and library settings
# Ranks come from srun: RANK=SLURM_PROCID, LOCAL_RANK=SLURM_LOCALID (set per task in the srun command).
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
# The address Slurm itself uses to reach a node (NodeAddr; the node name when the site sets none).
node_addr() { scontrol show node -o "$1" 2>/dev/null | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 | grep . || echo "$1"; }
ADDRS=()
for h in "${HOSTS[@]}"; do ADDRS+=("$(node_addr "$h")"); done
export MASTER_ADDR=${ADDRS[0]}
export MASTER_PORT=${RNALM_MASTER_PORT:-$((20000 + SLURM_JOB_ID % 12000))}
export WORLD_SIZE=$SLURM_NTASKS
# Ranks in blocks over nodes and CPUs in blocks per socket (block:block; Slurm's default alternates sockets task
# by task), so where the site binds tasks to CPUs, local ranks 0-3 of an 8-GPU, 2-socket node run on the socket of
# GPUs 0-3, as on most boards (`nvidia-smi topo -m`); sbatch --distribution or SLURM_DISTRIBUTION overrides it, and
# the Prometheus targets' rank labels follow it.
DISTRIBUTION=${SLURM_DISTRIBUTION:-block:block}
# srun passes this script's environment to the ranks (MASTER_*, WORLD_SIZE, NCCL_*, PATH) also under
# `sbatch --export=NONE`, whose SLURM_EXPORT_ENV=NONE the job's steps would otherwise inherit (sbatch(1))
export SLURM_EXPORT_ENV=ALL
# NCCL and threads: the one place for them.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
export MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}   # a hung collective kills the job
export PYTHONFAULTHANDLER=1 PYTHONUNBUFFERED=1

GPUS=${SLURM_GPUS_ON_NODE:-0}
[ "$GPUS" -gt 0 ] 2>/dev/null || GPUS=0
# One rank per GPU, rank LOCAL_RANK on cuda:LOCAL_RANK: more tasks than GPUs on a node fail in start-up
# (invalid device ordinal), fewer leave GPUs idle. Typical cause: --gpus-per-node=4 without --ntasks-per-node=4.
# And srun lays the job's SLURM_NTASKS ranks out over the allocation's tasks per node, which the Prometheus targets
# (prom_targets.py) follow: with --ntasks below nodes x --ntasks-per-node the ranks would fill the slots by
# Slurm's own rules, which leave a GPU idle and name targets of ranks that do not exist.
IFS=, read -ra TASK_COUNTS <<< "$SLURM_TASKS_PER_NODE"
TASK_SLOTS=0
for n in "${TASK_COUNTS[@]}"; do
  [[ $n =~ ^([0-9]+)(\(x([0-9]+)\))?$ ]] || die "cannot read SLURM_TASKS_PER_NODE=$SLURM_TASKS_PER_NODE"
  [ "$GPUS" = 0 ] || [ "${BASH_REMATCH[1]}" = "$GPUS" ] || die "$GPUS GPU(s) per node but tasks per node" \
    "$SLURM_TASKS_PER_NODE: one task per GPU is needed; give both, e.g. sbatch --gpus-per-node=$GPUS" \
    "--ntasks-per-node=$GPUS ..."
  TASK_SLOTS=$((TASK_SLOTS + BASH_REMATCH[1] * ${BASH_REMATCH[3]:-1}))
done
[ "$TASK_SLOTS" = "$SLURM_NTASKS" ] || die "the job has $SLURM_NTASKS tasks but tasks per node $SLURM_TASKS_PER_NODE" \
  "($TASK_SLOTS task slots): give --nodes and --ntasks-per-node, without an --ntasks below their product"
log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: ${#HOSTS[@]} node(s) [${HOSTS[*]}], $WORLD_SIZE ranks," \
    "$GPUS GPU(s)/node$([ "$GPUS" = 0 ] && echo ' (CPU mode)'), master $MASTER_ADDR:$MASTER_PORT"
log "config $CONFIG ${OVERRIDES[*]:-}"

# ------------------------------------------------------------------------------- Prometheus file_sd
SD_DIR=${RNALM_PROM_SD_DIR:-$RNALM_REPO/deploy/prometheus/targets}
TARGETS=$SD_DIR/rnalm-$SLURM_JOB_ID.json

remove_stale_targets() {  # files of this user's jobs that no longer run (killed with SIGKILL, node crash)
  local f id state rc
  for f in "$SD_DIR"/rnalm-*.json; do
    # Another user's file stays: with PrivateData=jobs squeue does not show their jobs, live or not.
    [ -e "$f" ] && [ -O "$f" ] || continue
    id=${f##*/rnalm-}; id=${id%.json}
    [ "$id" = "$SLURM_JOB_ID" ] && continue
    # only on squeue's word: a failed query (controller busy, socket timeout) must not end another job's scrape
    state=$(squeue -h -j "$id" -t RUNNING,COMPLETING,SUSPENDED -o %i 2>&1); rc=$?
    if [[ $state == *"Invalid job id"* ]] || { [ "$rc" = 0 ] && [ -z "$state" ]; }; then rm -f "$f"; fi
  done
}

write_targets() {
  if [ "$METRICS" != true ] || [ "$PORT_BASE" = 0 ]; then
    log "no Prometheus targets (metrics.enabled=$METRICS, port_base=$PORT_BASE)"; return
  fi
  remove_stale_targets
  if "$PYTHON" deploy/slurm/prom_targets.py --out "$TARGETS" --job-id "$SLURM_JOB_ID" \
       --job-name "$SLURM_JOB_NAME" --hosts "${HOSTS[*]}" --addresses "${ADDRS[*]}" \
       --tasks-per-node "$SLURM_TASKS_PER_NODE" --port-base "$PORT_BASE" --distribution "$DISTRIBUTION" \
       ${SLURM_DIST_PLANESIZE:+--plane-size "$SLURM_DIST_PLANESIZE"}; then
    log "Prometheus targets: $TARGETS"
  else
    log "warning: could not write $TARGETS (training goes on without Prometheus discovery)"
  fi
}

remove_targets() { rm -f "$TARGETS"; }

RC_FILE=$(mktemp) || die "cannot create a temporary file"
# A failed job keeps its target file: Prometheus then finds its ranks down and RnalmRankDown pages (deleting the
# file, or the next job of this user, which removes it as stale, acknowledges). Removed, a crash or a hung
# collective's abort would end the job without a sound.
# Only an exit through `finish` counts as ending well: bash killed by a signal it does not trap runs this too.
# shellcheck disable=SC2317
on_exit() {
  local rc=$?
  rm -f "$RC_FILE"
  if [ "$rc" = 0 ] && [ "${FINISHED:-}" = 1 ]; then remove_targets
  elif [ -e "${TARGETS:-}" ]; then log "job failed (exit $rc): $TARGETS stays, so that RnalmRankDown pages"; fi
}
trap on_exit EXIT
finish() { FINISHED=1; exit "$1"; }

requeue() {
  [ -n "${FORWARDER:-}" ] && kill "$FORWARDER" 2>/dev/null
  log "requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue failed"  # (the targets stay: RnalmRankDown pages)
  finish 0
}

# A crash requeues the job when the run saved a checkpoint since its start (so a crash that repeats before the
# next checkpoint ends the job: no loop). Zero-padded tags sort as their steps.
# squeue's [D-][HH:]MM:SS as seconds; nothing for UNLIMITED, INVALID or no answer
slurm_seconds() {
  [[ $1 =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 0
  echo $(( ((10#${BASH_REMATCH[2]:-0} * 24 + 10#${BASH_REMATCH[4]:-0}) * 60 + 10#${BASH_REMATCH[5]}) * 60 \
           + 10#${BASH_REMATCH[6]} ))
}
# A signal with at most MAX_LEAD_S of the time limit left is the limit's (--signal=B:USR1@300 by default); when it
# leaves a run less than MIN_RUN_S before it, every run would stop after its start-up and a step and requeue again
MAX_LEAD_S=1800
MIN_RUN_S=${RNALM_MIN_RUN_S:-600}
signalled_soon_by_the_time_limit() {
  local left limit at_signal
  left=$(slurm_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)")
  limit=$(slurm_seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null)")
  [ -n "$left" ] && [ -n "$limit" ] || return 1
  at_signal=$((left + SECONDS - SIGNAL_AT))
  [ "$at_signal" -le "$MAX_LEAD_S" ] && [ $((limit - at_signal)) -lt "$MIN_RUN_S" ]
}
newest_checkpoint() { ls -1 "$OUT_DIR/checkpoints" 2>/dev/null | grep -E '^step[0-9]{8}$' | sort | tail -n 1; }
START_CHECKPOINT=$(newest_checkpoint)

# --------------------------------------------------------------------------------------------- run
write_targets
# Each task: its rank from Slurm, and USR1 ignored until the trainer installs its handler (an early USR1 must
# not kill a rank that is still starting up; the forwarder above repeats it).
# shellcheck disable=SC2016  # $SLURM_PROCID/$SLURM_LOCALID expand inside each task
# srun's exit status goes through a file: `wait` on a step that ended while a trap ran can return -1. This
# subshell outlives a TERM or USR1 sent to the whole job (handlers, unlike ignored signals, are not inherited by srun).
# Every task sees all of its node's GPUs (rank LOCAL_RANK takes cuda:LOCAL_RANK): --gpus-per-task, or a site's
# SLURM_GPU_BIND, would leave each task one device and every local rank >= 1 an invalid device ordinal.
GPU_BIND=()
[ "$GPUS" -gt 0 ] && GPU_BIND=(--gpu-bind=none)
{
  trap : TERM USR1
  srun --kill-on-bad-exit=1 --label --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" ${GPU_BIND[@]+"${GPU_BIND[@]}"} \
    --distribution="$DISTRIBUTION" \
    bash -c 'trap "" USR1; export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID; exec "$@"' rank \
    "$PYTHON" -m pretrain.train --config "$CONFIG" ${OVERRIDES[@]+"${OVERRIDES[@]}"}
  echo $? > "$RC_FILE"
} &
STEP_PID=$!
# Signalled before the ranks started: they start anyway and stop after their first step. Requeued at once
# instead, a job whose time limit is within the --signal lead (Slurm then signals at the start) would requeue
# for ever without a single step; this way every run makes progress.
[ "$PREEMPTED" = 1 ] && forward_usr1

# A trapped signal interrupts `wait` while srun keeps running: wait again.
while kill -0 "$STEP_PID" 2>/dev/null; do wait "$STEP_PID"; done
RC=$(cat "$RC_FILE")
[ -n "$RC" ] || RC=1
log "training step ended with exit code $RC"

# A crash (an NCCL timeout, a GPU error, a killed rank; not a refused start 2, a non-finite stop 3 or unreadable
# shards 4, which would repeat) after a new checkpoint: requeued to resume from it. Not a job Slurm is ending
# (scancel; a preemption requeues it by Slurm's own PreemptMode).
if [ "$TERMINATED" = 1 ]; then
  log "not requeued: Slurm is ending the job"
else
  case $RC in 0|2|3|4) ;; *)
    NOW_CHECKPOINT=$(newest_checkpoint)
    if [ -n "$NOW_CHECKPOINT" ] && [[ $NOW_CHECKPOINT > $START_CHECKPOINT ]]; then
      log "the ranks failed (exit $RC) after saving $NOW_CHECKPOINT (newest at the start: ${START_CHECKPOINT:-none}):" \
          "requeued to resume from it; a failure before the next checkpoint ends the job"
      requeue
    fi ;;
  esac
fi

# Otherwise requeue only on the ranks' word that they stopped on the signal with a checkpoint saved. A run that
# finished anyway, a refused start (exit 2), a non-finite stop (3) or a crash would only repeat itself, and with
# a time limit at or below the --signal lead every run is signalled at once: a requeue loop (Slurm's time-limit
# sweep signals 0-30 s into such a run, so a check at the start missed most).
if [ "$PREEMPTED" = 1 ]; then
  if [ "$RC" = 0 ] && [[ $(tail -n 1 "$OUT_DIR/log.jsonl" 2>/dev/null) == *'"event": "preempted"'* ]]; then
    if signalled_soon_by_the_time_limit; then
      remove_targets  # (a configuration to fix, the progress saved: no RnalmRankDown page)
      die "not requeued: the time limit's signal came ${SIGNAL_AT}s after the start, so every run would stop" \
          "after its start-up and a step (the checkpoint is saved); give --time well above the --signal lead" \
          "(#SBATCH --signal=B:USR1@300) and submit again"
    fi
    requeue
  fi
  log "not requeued: the ranks did not stop on the signal with a checkpoint (see $OUT_DIR/log.jsonl)"
fi
finish "$RC"
