#!/usr/bin/env bash
# Run HERE (the CPU machine), before a session with a lent GPU: everything the GPU calls need that does not
# travel by itself.
#   .whl/          wheels for CPython 3.12 / x86-64 of every package our code needs that the GPU image lacks
#                  (DeepSpeed built without ops; the rest binary wheels), at the versions of this .venv
#   shared/data/   a copy of ../shared/data (the device gets only the repository, ../shared stays behind)
# Both are git-ignored through .git/info/exclude, and named in the run call's carry (see BENCHMARKS.md,
# "GPU session runbook"). Idempotent: wheels already there are kept; a stale version is replaced.
#   bash bench/gpu/prepare.sh            # PYTHON=... to use another interpreter for pip (default .venv)
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DATA=${RNALM_SHARED_DATA:-../shared/data}
LIMIT_MIB=${RNALM_GPU_TRAVEL_LIMIT_MIB:-60}
WHL=.whl
# In the image already (bench/gpu/image_packages.txt): torch, numpy, einops, msgpack, ninja, psutil,
# py-cpuinfo, tqdm, pyyaml, safetensors, prometheus-client, mpi4py, matplotlib, scikit-learn, packaging.
# typing-extensions is there too, at an unknown version: pydantic 2.14 needs >= 4.16, so ours travels.
BINARY=(webdataset braceexpand zstandard hjson pydantic pydantic-core annotated-types typing-inspection
        typing-extensions viennarna)

log() { echo "[prepare $(date +%H:%M:%S)] $*"; }
die() { echo "[prepare] ERROR: $*" >&2; exit 1; }

exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
for pattern in /.whl/ /shared/; do
  grep -qxF "$pattern" "$exclude" 2>/dev/null || echo "$pattern" >> "$exclude"
done

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1" 2>/dev/null ||
            die "$1 is not installed in $PY (make venv first)"; }
mkdir -p "$WHL"
# keep one version of each distribution: drop any wheel of a wanted name at another version
keep_only() {  # name version
  local prefix=${1//-/_} f
  for f in "$WHL"/*.whl; do
    [[ -e $f ]] || continue
    local base=${f##*/} stem
    stem=$(echo "${base%%-*}" | tr '[:upper:]-' '[:lower:]_')
    if [[ $stem == "${prefix,,}" && $base != "${base%%-*}-$2-"* ]]; then log "removing stale $base"; rm -f "$f"; fi
  done
}

ds=$(version deepspeed)
keep_only deepspeed "$ds"
if ! compgen -G "$WHL/deepspeed-$ds-*.whl" > /dev/null; then
  log "building deepspeed $ds wheel (DS_BUILD_OPS=0: ops are JIT-built on the GPU if ever used)"
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$WHL" "deepspeed==$ds" ||
    die "building the deepspeed wheel failed"
fi

specs=()
for name in "${BINARY[@]}"; do
  v=$(version "$name"); keep_only "$name" "$v"; specs+=("$name==$v")
done
log "downloading ${specs[*]}"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$WHL" "${specs[@]}" || die "pip download failed (no network, or no cp312 wheel of a pinned version)"

log "checking the wheel set: installable on CPython 3.12, one version each, nothing missing"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip install -q --dry-run --no-index --no-deps --find-links "$WHL" --only-binary=:all: \
  --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --target "$tmp/x" "deepspeed==$ds" "${specs[@]}" ||
  die "pip cannot install the wheel set for CPython 3.12"
"$PY" bench/gpu/check_wheels.py --wheels "$WHL" || die "the wheel set is incomplete (see above)"

[[ -f $DATA/README.md ]] || die "no data at $DATA (set RNALM_SHARED_DATA)"
log "copying $DATA -> shared/data"
rm -rf shared/data.tmp && mkdir -p shared && cp -r "$DATA" shared/data.tmp && chmod -R u+w shared/data.tmp
rm -rf shared/data && mv shared/data.tmp shared/data

# what travels: tracked + untracked-not-ignored files, shared/, and the carried .whl
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
whl=$(du -sb "$WHL" | cut -f1); data=$(du -sb shared | cut -f1)
total=$((tree + whl + data))
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }
log "travels: working tree $(mib "$tree") MiB + .whl $(mib "$whl") MiB + shared $(mib "$data") MiB" \
    "= $(mib "$total") MiB"
(( total < LIMIT_MIB * 1048576 )) || die "$(mib "$total") MiB is over the ${LIMIT_MIB} MiB budget (the device takes 64)"
log "ready: carry [\".whl\", \"shared\"] (see BENCHMARKS.md, GPU session runbook)"
