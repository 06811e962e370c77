#!/usr/bin/env bash
# Runs the main job on this machine: every local device (CPU, one or more GPUs) in one process.
#   launch/local.sh [CONFIG] [WORKDIR] [--config.KEY=VALUE ...]
# Re-running with the same WORKDIR resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/default.py}
[ $# -gt 0 ] && shift
workdir=workdir/$(basename "${config%.py}")
if [ $# -gt 0 ] && [[ $1 != --* ]]; then workdir=$1; shift; fi
exec python -m agrepa_jax.main --config "$config" --workdir "$workdir" "$@"
