#!/usr/bin/env bash
# Runs the main job on every worker of a Cloud TPU VM slice, one process per host.
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh CONFIG WORKDIR [--config.K=V ...]
#   launch/tpu_pod.sh --dry_run CONFIG WORKDIR [...]   # prints every command, runs none
#
# 1. Ships this checkout (its tracked files as they are on disk) to REMOTE_DIR (default
#    ~/agrepa_jax) on every worker and installs it there with pip (extras tpu, gcs).
#    SHIP=0 skips both: the code is already at REMOTE_DIR on every worker.
# 2. Clears stale TPU locks on every worker (CLEAR_LOCKS=0 skips it): kills the processes that
#    hold the TPU devices (/dev/vfio/*, /dev/accel*) and removes /tmp/libtpu_lockfile.
# 3. Starts agrepa_jax.main --distributed on every worker; each one's output goes to
#    LOG_DIR/worker_<i>.log on this machine (default logs/<TPU>/<time>).
# 4. When a worker fails, or on Ctrl-C, stops every worker (SIGTERM: a checkpoint where the run
#    can still save one; SIGKILL after STOP_SECONDS, default 120) and exits with the failure.
# 5. Collects each worker's process log (agrepa_jax writes it on the worker's local disk when
#    WORKDIR is a bucket) into LOG_DIR.
# WORKDIR and data.cache_dir must be gs:// paths or on a filesystem every host sees (Filestore).
# Re-running the same command resumes from the last checkpoint.
set -euo pipefail
dry_run=0
if [[ ${1:-} == --dry_run ]]; then dry_run=1; shift; fi
config=${1:?config file}; workdir=${2:?workdir}; shift 2
tpu=${TPU:-}; zone=${ZONE:-}
if ((dry_run)); then
  tpu=${tpu:-TPU}; zone=${zone:-ZONE}
else
  : "${tpu:?set TPU to the TPU VM name}" "${zone:?set ZONE}"
fi
remote_dir=${REMOTE_DIR:-'~/agrepa_jax'}  # expanded on the workers, not here
case $remote_dir in
  '' | / | '~' | '~/') echo "REMOTE_DIR=$remote_dir: give a directory of its own" >&2; exit 2 ;;
esac
log_dir=${LOG_DIR:-logs/$tpu/$(date +%Y%m%d-%H%M%S)}
pid_file=/tmp/agrepa_jax_main.pid
stop_seconds=${STOP_SECONDS:-120}
repository=$(cd "$(dirname "$0")/.." && pwd)

show() {  # prints a command as one would type it, each argument with spaces in single quotes
  local line=+ arg
  for arg in "$@"; do
    if [[ $arg =~ ^[][A-Za-z0-9_./:=,@%+~*-]+$ ]]; then
      line+=" $arg"
    else
      line+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "$line"
}
run() {  # prints a command; runs it unless --dry_run
  show "$@"
  ((dry_run)) || "$@"
}
ssh_workers() {  # WORKERS COMMAND: one command on some workers ('all' or an index)
  run gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker="$1" --command="$2"
}

if ((dry_run)); then
  workers=${DRY_RUN_WORKERS:-2}
else
  workers=$(gcloud compute tpus tpu-vm describe "$tpu" --zone="$zone" \
    --format='value(networkEndpoints.len())')
fi
((dry_run)) || mkdir -p "$log_dir"

if [[ ${SHIP:-1} == 1 ]]; then
  archive=$log_dir/code.tar.gz
  echo "+ git -C $repository ls-files -z | tar --null -T - -czf $archive"
  ((dry_run)) || git -C "$repository" ls-files -z | tar -C "$repository" --null -T - -czf "$archive"
  run gcloud compute tpus tpu-vm scp "$archive" "$tpu:/tmp/agrepa_jax_code.tar.gz" \
    --zone="$zone" --worker=all
  ssh_workers all "rm -rf $remote_dir && mkdir -p $remote_dir && \
tar -xzf /tmp/agrepa_jax_code.tar.gz -C $remote_dir && \
cd $remote_dir && python3 -m pip install --quiet -e '.[tpu,gcs]'"
fi
if [[ ${CLEAR_LOCKS:-1} == 1 ]]; then
  ssh_workers all "sudo fuser --kill /dev/vfio/* /dev/accel* 2>/dev/null; \
sudo rm -f /tmp/libtpu_lockfile; true"
fi

stop_workers() {
  ssh_workers all "pid=\$(cat $pid_file 2>/dev/null) || exit 0; kill -TERM \$pid 2>/dev/null; \
for s in \$(seq $stop_seconds); do kill -0 \$pid 2>/dev/null || exit 0; sleep 1; done; \
kill -KILL \$pid 2>/dev/null; true"
}
collect_logs() {
  [[ $workdir == *://* ]] || return 0  # on a shared filesystem they are in WORKDIR/logs already
  local name
  name=$(sed -E 's/[^[:alnum:]_.-]+/_/g' <<<"$workdir")
  for ((i = 0; i < workers; i++)); do
    run gcloud compute tpus tpu-vm scp "$tpu:/tmp/agrepa_jax_logs/$name/process_*.log" \
      "$log_dir/" --zone="$zone" --worker="$i" || true
  done
}
interrupted() {
  trap - INT TERM
  echo 'interrupted: stopping every worker'
  stop_workers
  collect_logs
  exit 130
}
trap interrupted INT TERM

main_args=$(printf ' %q' --config "$config" --workdir "$workdir" "$@")
pids=()
for ((i = 0; i < workers; i++)); do
  # The worker's shell writes its pid, then becomes the trainer (exec): stop_workers signals it.
  command="cd $remote_dir && echo \$\$ > $pid_file && "
  command+="exec python3 -m agrepa_jax.main --distributed$main_args"
  if ((dry_run)); then
    ssh_workers "$i" "$command"
  else
    ssh_workers "$i" "$command" >"$log_dir/worker_$i.log" 2>&1 &
    pids+=($!)
  fi
done
echo "$workers workers; logs in $log_dir (worker_0.log has the progress bar)"

status=0
if ((dry_run)); then
  stop_workers  # what a failed worker or Ctrl-C runs
else
  remaining=${#pids[@]}
  while ((remaining > 0)); do
    code=0
    wait -n "${pids[@]}" || code=$?
    remaining=$((remaining - 1))
    if ((code != 0 && status == 0)); then
      status=$code
      echo "a worker exited with $code: stopping every worker"
      stop_workers
    fi
  done
fi
collect_logs
exit "$status"
