#!/usr/bin/env bash
# Starts munge, slurmctld and slurmd for a one-node cluster on 127.0.0.1 (no systemd).
# Usage: .ci/slurm/start.sh STATE_DIR   — then `export SLURM_CONF=STATE_DIR/slurm.conf`.
# Installs Debian's packages when they are missing. Stop with .ci/slurm/stop.sh STATE_DIR.
set -euo pipefail
state=$(realpath -m "${1:?usage: start.sh STATE_DIR}")
here=$(cd "$(dirname "$0")" && pwd)
if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null || ! command -v sbatch >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null
fi
mkdir -p "$state"/{ctld,spool,munge}
node=$(hostname -s)
sed -e "s|@STATE@|$state|g" -e "s|@NODE@|$node|g" -e "s|@CPUS@|$(nproc)|g" \
    -e "s|@CTLD_PORT@|${RECYCLE_SLURMCTLD_PORT:-16817}|g" -e "s|@SLURMD_PORT@|${RECYCLE_SLURMD_PORT:-16818}|g" \
    "$here/slurm.conf.in" > "$state/slurm.conf"
# munge: a fresh key and socket of our own, so nothing system-wide is touched.
dd if=/dev/urandom bs=1 count=1024 of="$state/munge/munge.key" status=none
chmod 700 "$state/munge"; chmod 400 "$state/munge/munge.key"
munged --force --key-file="$state/munge/munge.key" --socket="$state/munge/munge.socket" \
       --pid-file="$state/munge/munged.pid" --log-file="$state/munge/munged.log" --seed-file="$state/munge/seed"
export SLURM_CONF="$state/slurm.conf"
# Slurm's munge plugin finds the socket through this option.
echo "AuthInfo=socket=$state/munge/munge.socket" >> "$state/slurm.conf"
slurmctld -f "$state/slurm.conf" -i
slurmd -f "$state/slurm.conf"
for _ in $(seq 1 60); do
  if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
    echo "slurm ready: SLURM_CONF=$state/slurm.conf"; exit 0
  fi
  sleep 0.5
done
echo "slurm did not become ready; logs in $state" >&2
sinfo >&2 || true
exit 1
