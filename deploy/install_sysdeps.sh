#!/usr/bin/env bash
# Installs the external tools the pipeline and its tests use, when missing (Debian/Ubuntu, apt).
#   bash deploy/install_sysdeps.sh pipeline   # `make demo`/`make venv`: g++ + the Python headers (DeepSpeed
#                                             # compiles its CPU comm op at start-up), $PYTHON3's venv, mmseqs2
#   bash deploy/install_sysdeps.sh            # `make test`: also Open MPI (dataprep --mpi), Slurm + munge and
#                                             # Prometheus, whose daemons the tests start on loopback
# (`pipeline` never puts Slurm's or Prometheus's daemons on a cluster's login node, where the site's sbatch is.)
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, munged live there, off a plain user's PATH
PYTHON3=${PYTHON3:-python3}
# the packages of this Python's version (python3-venv and python3-dev are the distro default's: 3.10 on Ubuntu
# 22.04, where `make PYTHON3=python3.11` is the way)
pyver=$("$PYTHON3" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) || pyver=3
need=()
command -v g++ >/dev/null || need+=(g++)
"$PYTHON3" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  2>/dev/null || need+=("python$pyver-dev")
"$PYTHON3" -c 'import ensurepip' 2>/dev/null || need+=("python$pyver-venv")
command -v mmseqs >/dev/null || need+=(mmseqs2)
if [ "${1:-all}" != pipeline ]; then
  command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
  for tool in slurmctld slurmd sbatch scontrol; do
    command -v "$tool" >/dev/null || { need+=(slurm-wlm slurm-client); break; }
  done
  { command -v munged && command -v mungekey; } >/dev/null || need+=(munge)
  command -v promtool >/dev/null || need+=(prometheus)
fi
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "install_sysdeps: apt-get not found; install ${need[*]} yourself (tests that need them will skip)" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
if ! $SUDO true 2>/dev/null; then
  echo "install_sysdeps: not root and no passwordless sudo; missing: ${need[*]} (tests that need them will skip)" >&2
  exit 0
fi
echo "install_sysdeps: installing ${need[*]}"
# (env: sudo's env_reset would drop an exported DEBIAN_FRONTEND, and a package could then ask behind >/dev/null)
if ! { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
       $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
then
  echo "install_sysdeps: apt could not install ${need[*]} (offline, or a package unknown to this release);" \
       "the tests that need them will skip" >&2
fi
