# Sourced by session.sh, levers.sh and e2e.sh: installs the carried wheels, then runs one plan of runner.py.
# Usage on the device (device tool `run`, carry [".whl", "shared"]): bash bench/gpu/<plan>.sh
# Here, for a CPU check of the logic: OUT=/tmp/o RNALM_GPU_SESSION_TINY=1 RNALM_GPU_PYTHON=.venv/bin/python \
#   RNALM_GPU_SKIP_INSTALL=1 bash bench/gpu/<plan>.sh
set -uo pipefail
export RNALM_GPU_T0=${RNALM_GPU_T0:-$(date +%s)}
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
say() { echo "[$(date +%H:%M:%S) ${PLAN}] $*"; }
die() { echo "[$(date +%H:%M:%S) ${PLAN}] ERROR: $*" >&2; exit 2; }

[[ -n ${OUT:-} ]] || die "OUT is not set (the device tool sets it; elsewhere export OUT=DIR)"
mkdir -p "$OUT" || die "cannot create OUT=$OUT"
PY=${RNALM_GPU_PYTHON:-python3}
command -v "$PY" > /dev/null || die "no Python at '$PY'"
export PYTHONUNBUFFERED=1 RNALM_SHARED_DATA=${RNALM_SHARED_DATA:-$PWD/shared/data}
[[ -f $RNALM_SHARED_DATA/ncrna/ncrna_corpus.fasta.gz ]] ||
  die "no data at $RNALM_SHARED_DATA: run bench/gpu/prepare.sh on the CPU machine and carry \"shared\""

if [[ ${RNALM_GPU_SKIP_INSTALL:-0} != 1 ]]; then
  compgen -G ".whl/*.whl" > /dev/null || die "no wheels in .whl/: run bench/gpu/prepare.sh and carry \".whl\""
  say "installing $(ls .whl/*.whl | wc -l) wheels into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | grep -v "WARNING: Target directory" | tee -a "$OUT/session.log"
  [[ ${PIPESTATUS[0]} == 0 ]] || die "pip install of .whl/ failed (see above)"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
say "python $("$PY" -c 'import sys; print(sys.version.split()[0])'), $(( $(date +%s) - RNALM_GPU_T0 )) s since start"
exec "$PY" bench/gpu/runner.py "$PLAN"
