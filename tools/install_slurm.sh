#!/usr/bin/env bash
# Installs Debian's SLURM (slurmctld, slurmd, sbatch, srun, scontrol, ...) and munge when missing,
# so the real-daemon launch tests (tests/test_slurm_*.py) can run. Idempotent: does nothing when
# the binaries are already there. Needs root (CI runs as root) and Debian's package mirror.
set -euo pipefail
need=0
for bin in slurmctld slurmd sbatch srun scontrol scancel munged; do
  command -v "$bin" >/dev/null 2>&1 || need=1
done
if [ "$need" = 0 ]; then
  echo "slurm already installed: $(dpkg-query -W -f="\${Version}" slurm-wlm 2>/dev/null || echo unknown)"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install_slurm.sh: error: SLURM is missing and installing it needs root (apt-get install slurm-wlm munge)" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# slurm-wlm pulls slurmctld, slurmd and the client tools; munge authenticates them.
apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
echo "slurm installed: $(dpkg-query -W -f="\${Version}" slurm-wlm)"
