#!/usr/bin/env bash
# Run HERE before spending device minutes: the GPU plans in tiny mode on the CPU, under the device image's
# interpreter and torch (Python 3.12, torch 2.11.0), with the carried .whl/ installed the way the device installs
# them (common.sh: pip --target /tmp/site). Catches what the .venv (Python 3.11, torch 2.13) and CI cannot: a torch
# API missing from 2.11, a carried wheel that does not import on 3.12. Needs bench/gpu/prepare.sh first, a
# Python 3.12 (PYTHON312=..., else python3.12 or pyenv's) and PyPI once (torch 2.11's wheels, ~4.7 GB venv).
#   bash bench/gpu/rehearse.sh [session|levers|e2e ...]      # default: all three, ~9 min on 2 cores
# Output: $RNALM_REHEARSE_DIR (default /tmp/rnalm_rehearse)/<plan>/{summary.json,session.log,...}.
set -euo pipefail
cd "$(dirname "$0")/../.."
DIR=${RNALM_REHEARSE_DIR:-/tmp/rnalm_rehearse}
VENV=$DIR/venv
# numpy .. packaging: the image's packages our code imports (bench/gpu/image_packages.txt), at PyPI's versions
IMAGE=(torch==2.11.0 "setuptools<82" numpy einops msgpack ninja psutil py-cpuinfo tqdm pyyaml safetensors
       prometheus-client matplotlib scikit-learn packaging)

die() { echo "[rehearse] ERROR: $*" >&2; exit 2; }
compgen -G ".whl/*.whl" > /dev/null || die "no .whl/: run bash bench/gpu/prepare.sh first"
if [[ ! -f $VENV/.complete ]]; then
  py=
  for c in ${PYTHON312:-} $(command -v python3.12) ~/.pyenv/versions/3.12*/bin/python3.12; do
    "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2> /dev/null && { py=$c; break; }
  done
  [[ -n $py ]] || die "no working Python 3.12: set PYTHON312"
  echo "[rehearse] building $VENV (torch 2.11 and the image's packages our code uses)"
  rm -rf "$VENV"
  "$py" -m venv "$VENV" || die "could not create $VENV"
  "$VENV/bin/python" -m pip install -q "${IMAGE[@]}" > "$DIR/pip.log" 2>&1 ||
    { grep -v "^WARNING: Location" "$DIR/pip.log"; die "could not install the image's packages into $VENV"; }
  touch "$VENV/.complete"
fi

plans=("$@"); (( ${#plans[@]} )) || plans=(session levers e2e)
status=0
for p in "${plans[@]}"; do
  rm -rf "${DIR:?}/$p"
  echo "[rehearse] $p"
  # RNALM_GPU_LEVERS as given; unset, the session plan runs them all, and one is enough for the levers plan
  # (set but empty means none)
  levers=(); [[ $p == levers && -z ${RNALM_GPU_LEVERS+set} ]] && levers=(RNALM_GPU_LEVERS=zero2)
  if env "${levers[@]}" OUT=$DIR/$p RNALM_GPU_SESSION_TINY=1 RNALM_GPU_PYTHON=$VENV/bin/python \
     RNALM_GPU_WORK=$DIR/work bash "bench/gpu/$p.sh" > "$DIR/$p.out" 2>&1 &&
     ! grep -q '"status": "\(failed\|timeout\)"' "$DIR/$p/summary.json"; then
    sed -n '/^| step/,$p' "$DIR/$p.out"
  else
    status=1; echo "[rehearse] $p FAILED ($DIR/$p.out):"; tail -n 40 "$DIR/$p.out"
  fi
done
exit $status
