# Sourced by the sbatch scripts of this folder, after they set NAME (their name, for the log) and RNALM_REPO:
# log/die, the check that the job runs under sbatch, the repository root as working directory, and PYTHON
# (RNALM_PYTHON; default: the repository's .venv, else python3).
# shellcheck shell=bash
log() { echo "[$NAME $(date '+%F %T')] $*"; }
die() { log "error: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "run me with sbatch (SLURM_JOB_ID is not set)"
cd "$RNALM_REPO" || die "cannot cd to $RNALM_REPO"
PYTHON=${RNALM_PYTHON:-$RNALM_REPO/.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=$(command -v python3) || die "no python: set RNALM_PYTHON"
