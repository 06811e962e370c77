#!/usr/bin/env bash
# Runs the main job on every worker of a Cloud TPU VM pod slice, one process per host.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh configs/paper_single.py /mnt/shared/runs/paper [--config.K=V ...]
# The repository must be checked out at the same path on every worker (REPO, default ~/agrepa_jax),
# and WORKDIR and data.cache_dir must be gs:// paths (pip install -e '.[gcs]') or on a filesystem
# every host sees (Filestore/NFS). Re-running the same command resumes from the last checkpoint.
# Each worker's output is kept apart in LOG_DIR/worker_<i>.log on this machine (default
# logs/<TPU>/<time>); the job fails if any worker fails.
set -euo pipefail
: "${TPU:?set TPU to the TPU VM name}" "${ZONE:?set ZONE}"
config=${1:?config file}; workdir=${2:?workdir}; shift 2
repo=${REPO:-'~/agrepa_jax'}  # expanded on the workers, not here
log_dir=${LOG_DIR:-logs/$TPU/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$log_dir"
workers=$(gcloud compute tpus tpu-vm describe "$TPU" --zone "$ZONE" \
  --format='value(networkEndpoints.len())')
remote_args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")
pids=()
for ((i = 0; i < workers; i++)); do
  gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker="$i" --command \
    "cd $repo && python -m agrepa_jax.main --distributed$remote_args" \
    >"$log_dir/worker_$i.log" 2>&1 &
  pids+=($!)
done
echo "$workers workers; logs in $log_dir (worker_0.log has the progress bar)"
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
