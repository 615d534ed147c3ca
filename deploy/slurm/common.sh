# Sourced by the sbatch scripts of this folder, after they set NAME (their name, for the log) and RNALM_REPO:
# log/die, the check that the job runs under sbatch, the repository root as working directory, and PYTHON
# (RNALM_PYTHON; default: the repository's .venv, else python3 only where there is no .venv at all: a given
# interpreter that does not run here, or a .venv whose link points nowhere on this node, is an error, not another
# python with other packages).
# shellcheck shell=bash
log() { echo "[$NAME $(date '+%F %T')] $*"; }
die() { log "error: $*" >&2; exit 1; }

[ -n "${SLURM_JOB_ID:-}" ] || die "run me with sbatch (SLURM_JOB_ID is not set)"
cd "$RNALM_REPO" || die "cannot cd to $RNALM_REPO"
if [ -n "${RNALM_PYTHON:-}" ]; then  # a path, or a command on PATH (python3.12)
  PYTHON=$(command -v "$RNALM_PYTHON") && [ -x "$PYTHON" ] \
    || die "RNALM_PYTHON=$RNALM_PYTHON is not an executable on $(hostname)"
elif [ -e "$RNALM_REPO/.venv/bin/python" ] || [ -L "$RNALM_REPO/.venv/bin/python" ]; then
  PYTHON=$RNALM_REPO/.venv/bin/python
  [ -x "$PYTHON" ] || die "$PYTHON does not run on $(hostname) (a link to $(readlink "$PYTHON") that is" \
    "not here?): build the .venv where every node sees its interpreter, or set RNALM_PYTHON"
else
  PYTHON=$(command -v python3) || die "no python: no $RNALM_REPO/.venv and no python3 on PATH; set RNALM_PYTHON"
fi
# (a module-built python without its LD_LIBRARY_PATH on this node is executable but does not start)
"$PYTHON" -c '' || die "$PYTHON does not start on $(hostname) (its output above)"
log "python: $PYTHON"
