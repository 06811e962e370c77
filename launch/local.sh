#!/usr/bin/env bash
# Runs the main job on this machine: every local device (CPU, one or more GPUs) in one process.
#   launch/local.sh [CONFIG] [WORKDIR] [--config.KEY=VALUE ...]
# Re-running with the same WORKDIR resumes from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
config=${1:-configs/default.py}
workdir=${2:-workdir/$(basename "${config%.py}")}
shift $(( $# > 2 ? 2 : $# ))
exec python -m agrepa_jax.main --config "$config" --workdir "$workdir" "$@"
