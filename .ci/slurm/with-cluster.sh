#!/usr/bin/env bash
# Runs a command with a one-node Slurm cluster up: starts it in a fresh state directory, exports
# SLURM_CONF and RECYCLE_SLURM_TESTS=1 (which turns on tests/it/slurm/cluster.rs), runs the
# command, and stops the daemons however the command ends. Exit status: the command's.
# Usage: .ci/slurm/with-cluster.sh cargo test
# Ports: RECYCLE_SLURMCTLD_PORT / RECYCLE_SLURMD_PORT (defaults in start.sh).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=$(mktemp -d "${TMPDIR:-/tmp}/recycle-slurm.XXXXXX")
trap '"$here/stop.sh" "$state"' EXIT
"$here/start.sh" "$state"
export SLURM_CONF="$state/slurm.conf" RECYCLE_SLURM_TESTS=1
"$@"
