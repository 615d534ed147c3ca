#!/usr/bin/env bash
# Installs the external tools the pipeline and its tests use, when missing (Debian/Ubuntu, apt).
# g++ + Python headers: DeepSpeed compiles its CPU comm op at start-up; python3-venv: `make`'s .venv;
# mmseqs2: clustering; openmpi: dataprep --mpi; slurm-wlm + munge: sbatch scripts; prometheus: monitoring.
set -euo pipefail
export PATH="$PATH:/usr/sbin:/sbin"  # slurmctld, slurmd, munged live there, off a plain user's PATH
PYTHON3=${PYTHON3:-python3}
need=()
command -v g++ >/dev/null || need+=(g++)
"$PYTHON3" -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' \
  2>/dev/null || need+=(python3-dev)
"$PYTHON3" -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
command -v mmseqs >/dev/null || need+=(mmseqs2)
command -v mpirun >/dev/null || need+=(openmpi-bin libopenmpi-dev)
for tool in slurmctld slurmd sbatch scontrol; do
  command -v "$tool" >/dev/null || { need+=(slurm-wlm slurm-client); break; }
done
{ command -v munged && command -v mungekey; } >/dev/null || need+=(munge)
command -v promtool >/dev/null || need+=(prometheus)
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
