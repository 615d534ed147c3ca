#!/usr/bin/env bash
# Installs the external tools the pipeline and its tests use, when missing (Debian/Ubuntu, apt).
# mmseqs2: clustering; openmpi: dataprep --mpi; slurm-wlm + munge: sbatch scripts; prometheus: monitoring.
set -euo pipefail
need=()
command -v mmseqs    >/dev/null || need+=(mmseqs2)
command -v mpirun    >/dev/null || need+=(openmpi-bin libopenmpi-dev)
command -v slurmctld >/dev/null || need+=(slurm-wlm slurm-client)
command -v munged    >/dev/null || need+=(munge)
command -v promtool  >/dev/null || need+=(prometheus)
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
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
