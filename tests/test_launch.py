"""The cluster launchers (launch/*.sbatch, launch/tpu_pod.sh): their --dry_run commands, and the
stop and requeue logic run for real against stand-ins (a fake trainer, a fake gcloud)."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / 'launch'
MAIN = 'python -m agrepa_jax.main'


def run_script(name: str, *args: str, **environ: str) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if not k.startswith(('SLURM_', 'XLA_', 'NCCL_'))}
  return subprocess.run(
    ['bash', str(LAUNCH / name), *args],
    env={**env, **environ},
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )


def commands(result: subprocess.CompletedProcess) -> list[str]:
  assert result.returncode == 0, result.stderr
  return [line[2:] for line in result.stdout.splitlines() if line.startswith('+ ')]


def start_script(name: str, *args: str, **environ: str) -> subprocess.Popen:
  """The script in a session of its own (a process group, as SLURM's job or a terminal has)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith('SLURM_')}
  return subprocess.Popen(
    ['bash', str(LAUNCH / name), *args],
    env={**env, **environ},
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    start_new_session=True,
  )


def read_until(process: subprocess.Popen, marker: str) -> str:
  """Output up to and including the first line that holds `marker`."""
  lines = []
  for line in process.stdout:
    lines.append(line)
    if marker in line:
      return ''.join(lines)
  raise AssertionError(f'{marker!r} never printed:\n' + ''.join(lines))


# ----- SLURM training job -----
def test_slurm_runs_one_process_per_node_owning_its_gpus(tmp_path):
  workdir = tmp_path / 'run'
  result = run_script(
    'slurm.sbatch',
    '--dry_run',
    'configs/paper_single.py',
    str(workdir),
    '--config.seed=3',
    SLURM_CPUS_ON_NODE='96',
  )
  exports, mkdir, srun = commands(result)
  assert 'JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7' in exports
  assert '--xla_gpu_enable_latency_hiding_scheduler=true' in exports
  assert mkdir == f'mkdir -p {workdir}/logs'
  assert srun.startswith('srun --ntasks-per-node=1 --cpus-per-task=96 --gpu-bind=none')
  assert f'--output={workdir}/logs/slurm-%j-task%t.log --open-mode=append' in srun
  assert srun.split(' python ', 1)[1].split() == [
    *'-m agrepa_jax.main --distributed --config configs/paper_single.py'.split(),
    *f'--workdir {workdir} --config.mesh.data=-1 --config.mesh.fsdp=8 --config.seed=3'.split(),
  ]
  assert not workdir.exists()  # a dry run creates nothing


def test_slurm_one_process_per_gpu_by_option_and_bucket_workdirs_log_locally(tmp_path):
  result = run_script(
    'slurm.sbatch',
    '--dry_run',
    'configs/paper_single.py',
    'gs://bucket/run',
    SLURM_NTASKS_PER_NODE='8',
    SLURM_CPUS_ON_NODE='96',
    SLURM_JOB_ID='41',
    SLURM_SUBMIT_DIR=str(tmp_path),
    FSDP='16',
  )
  exports, mkdir, srun = commands(result)
  assert exports.endswith('JAX_LOCAL_DEVICE_IDS=')  # jax gives task SLURM_LOCALID its GPU
  assert mkdir == f'mkdir -p {tmp_path}/logs/slurm-41'
  assert '--ntasks-per-node=8 --cpus-per-task=12' in srun
  assert f'--output={tmp_path}/logs/slurm-41/slurm-%j-task%t.log' in srun
  assert '--config.mesh.fsdp=16' in srun


def test_slurm_xla_flags_are_known_to_this_jaxlib(tmp_path):
  (exports, *_) = commands(run_script('slurm.sbatch', '--dry_run', 'c.py', str(tmp_path)))
  flags = exports.split("XLA_FLAGS='")[1].split("'")[0]
  check = subprocess.run(
    [sys.executable, '-c', 'import jax; jax.numpy.zeros(1).block_until_ready()'],
    env={**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'},
    capture_output=True,
    text=True,
    check=False,
  )
  assert check.returncode == 0, check.stderr[-2000:]  # XLA aborts on an unknown flag


def test_slurm_requeues_after_the_time_limit_checkpoint(tmp_path):
  """USR1 before the time limit: the step gets SIGTERM, exits 6 after its checkpoint (the
  stand-in does so at once), and the job requeues itself."""
  script = start_script(
    'slurm.sbatch', '--dry_run', 'c.py', str(tmp_path), SLURM_JOB_ID='77', DRY_RUN_SECONDS='30'
  )
  read_until(script, 'stand-in job step started')
  start = time.monotonic()
  script.send_signal(signal.SIGUSR1)
  output = script.communicate(timeout=20)[0]
  assert script.returncode == 6 and time.monotonic() - start < 10
  assert 'time_limit: SIGTERM to the job step' in output
  assert '+ scontrol requeue 77' in output


@pytest.mark.parametrize('requeue_on_term', ['0', '1'])
def test_slurm_cancel_stops_without_requeue_unless_asked(tmp_path, requeue_on_term):
  """scancel (and a preemption) sends SIGTERM to every process of the job: the step saves and
  exits 6; the job stays stopped, or with REQUEUE_ON_TERM=1 is requeued."""
  script = start_script(
    'slurm.sbatch',
    '--dry_run',
    'c.py',
    str(tmp_path),
    SLURM_JOB_ID='78',
    DRY_RUN_SECONDS='30',
    REQUEUE_ON_TERM=requeue_on_term,
  )
  read_until(script, 'stand-in job step started')
  os.killpg(script.pid, signal.SIGTERM)
  output = script.communicate(timeout=20)[0]
  assert script.returncode == 6
  assert ('+ scontrol requeue 78' in output) == (requeue_on_term == '1')


def test_slurm_features_array_then_the_index(tmp_path):
  workdir = tmp_path / 'run'
  submit = commands(
    run_script(
      'slurm_features.sbatch', '--dry_run', '--submit', '16', 'configs/x.py', str(workdir), '--a=1'
    )
  )
  script = str(LAUNCH / 'slurm_features.sbatch')
  logs = f'{workdir}/logs'
  assert submit == [
    f'mkdir -p {logs}',
    f'sbatch --parsable --array=0-15 --output={logs}/features-%A_%a.log {script} configs/x.py '
    f'{workdir} --a=1',
    f'sbatch --parsable --dependency=afterok:ARRAY_JOB --export=ALL,AGREPA_SCAN_ID=ARRAY_JOB '
    f'--output={logs}/features-%j-index.log '
    f'{script} configs/x.py {workdir} --a=1',
  ]
  task = run_script(
    'slurm_features.sbatch',
    '--dry_run',
    'configs/x.py',
    str(workdir),
    SLURM_ARRAY_TASK_ID='5',
    SLURM_ARRAY_TASK_COUNT='16',
  )
  features = f'{MAIN} --config configs/x.py --workdir {workdir} --mode features'
  assert commands(task) == [f'env JAX_PLATFORMS=cpu {features} --task 5 --num_tasks 16']
  index = run_script('slurm_features.sbatch', '--dry_run', 'configs/x.py', str(workdir))
  assert commands(index) == [f'env JAX_PLATFORMS=cpu {features}']


# ----- Cloud TPU pod -----
def test_tpu_pod_ships_the_code_clears_locks_and_starts_every_worker(tmp_path):
  result = run_script(
    'tpu_pod.sh',
    '--dry_run',
    'configs/paper_single.py',
    'gs://bucket/runs/paper',
    "--config.note='a b'",
    DRY_RUN_WORKERS='3',
    LOG_DIR=str(tmp_path / 'logs'),
  )
  lines = commands(result)
  ssh = 'gcloud compute tpus tpu-vm ssh TPU --zone=ZONE'
  scp = 'gcloud compute tpus tpu-vm scp'
  assert lines[0].endswith(f'tar --null -T - -czf {tmp_path}/logs/code.tar.gz')
  assert lines[1] == (
    f'{scp} {tmp_path}/logs/code.tar.gz TPU:/tmp/agrepa_jax_code.tar.gz --zone=ZONE --worker=all'
  )
  assert lines[2].startswith(f"{ssh} --worker=all '--command=rm -rf ~/agrepa_jax && mkdir")
  assert "pip install --quiet -e '\\''.[tpu,gcs]'\\''" in lines[2]
  assert lines[3] == (
    f"{ssh} --worker=all '--command=sudo fuser --kill /dev/vfio/* /dev/accel* 2>/dev/null; "
    "sudo rm -f /tmp/libtpu_lockfile; true'"
  )
  main = (
    'cd ~/agrepa_jax && echo $$ > /tmp/agrepa_jax_main.pid && exec python3 -m agrepa_jax.main '
    '--distributed --config configs/paper_single.py --workdir gs://bucket/runs/paper '
    "--config.note=\\'\\''a\\ b\\'\\''"
  )
  assert lines[4:7] == [f"{ssh} --worker={i} '--command={main}'" for i in range(3)]
  assert lines[7].startswith(f"{ssh} --worker=all '--command=pid=$(cat /tmp/agrepa_jax_main.pid")
  assert 'kill -TERM $pid' in lines[7] and '$(seq 120)' in lines[7] and 'kill -KILL' in lines[7]
  assert lines[8:] == [  # the workers' own logs: on their local disks, the workdir is a bucket
    f'{scp} TPU:/tmp/agrepa_jax_logs/gs_bucket_runs_paper/process_*.log {tmp_path}/logs/ '
    f'--zone=ZONE --worker={i}'
    for i in range(3)
  ]
  assert not (tmp_path / 'logs').exists()


def test_tpu_pod_skips_shipping_and_lock_clearing_by_option(tmp_path):
  result = run_script(
    'tpu_pod.sh',
    '--dry_run',
    'c.py',
    '/mnt/shared/run',
    SHIP='0',
    CLEAR_LOCKS='0',
    REMOTE_DIR='/opt/code',
    DRY_RUN_WORKERS='1',
  )
  first, stop = commands(result)  # no collection: a shared workdir holds the workers' logs
  assert '--worker=0' in first and '--command=cd /opt/code && ' in first
  assert '--worker=all' in stop
  assert run_script('tpu_pod.sh', '--dry_run', 'c.py', 'w', REMOTE_DIR='~').returncode == 2


FAKE_GCLOUD = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_DIR/gcloud.log"
worker() {  # a trainer on worker $1: runs $2 seconds, exits $3; on SIGTERM it exits 6
  trap 'kill $!; echo "worker $1 got SIGTERM" >> "$FAKE_DIR/gcloud.log"; exit 6' TERM
  echo $$ > "$FAKE_DIR/worker$1.pid"; sleep "$2" & wait; exit "$3"
}
case "$*" in
  *describe*) echo 2 ;;
  *--worker=0*exec\\ python3*) worker 0 30 0 ;;
  *--worker=1*exec\\ python3*)
    until [[ -f $FAKE_DIR/worker0.pid ]]; do sleep 0.05; done
    worker 1 "$WORKER_1_SECONDS" 3 ;;
  *kill\\ -TERM*)  # as the real command: TERM, then wait until the trainer has exited
    for pid in $(cat "$FAKE_DIR"/worker*.pid); do
      kill -TERM "$pid" 2>/dev/null
      while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
    done ;;
esac
"""


def fake_pod(tmp_path, worker_1_seconds: str) -> subprocess.Popen:
  """tpu_pod.sh on 2 workers through a fake gcloud: worker 0 trains until SIGTERM, worker 1
  fails with status 3 `worker_1_seconds` after worker 0 started."""
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'gcloud').write_text(FAKE_GCLOUD)
  (bin_dir / 'gcloud').chmod(0o755)
  return start_script(
    'tpu_pod.sh',
    'c.py',
    '/mnt/shared/run',
    TPU='pod',
    ZONE='z',
    SHIP='0',
    LOG_DIR=str(tmp_path / 'logs'),
    PATH=f'{bin_dir}:{os.environ["PATH"]}',
    FAKE_DIR=str(tmp_path),
    WORKER_1_SECONDS=worker_1_seconds,
  )


def test_tpu_pod_stops_every_worker_when_one_fails(tmp_path):
  pod = fake_pod(tmp_path, worker_1_seconds='0')
  output = pod.communicate(timeout=30)[0]
  assert pod.returncode == 3, output
  assert 'a worker exited with 3: stopping every worker' in output
  calls = (tmp_path / 'gcloud.log').read_text()
  assert 'sudo rm -f /tmp/libtpu_lockfile' in calls
  assert 'worker 0 got SIGTERM' in calls
  assert sorted(p.name for p in (tmp_path / 'logs').iterdir()) == ['worker_0.log', 'worker_1.log']


def test_tpu_pod_stops_every_worker_on_ctrl_c(tmp_path):
  pod = fake_pod(tmp_path, worker_1_seconds='30')
  read_until(pod, 'workers; logs in')
  while len(list(tmp_path.glob('worker*.pid'))) < 2:
    time.sleep(0.05)
  pod.send_signal(signal.SIGINT)
  output = pod.communicate(timeout=30)[0]
  assert pod.returncode == 130, output
  assert 'interrupted: stopping every worker' in output
  calls = (tmp_path / 'gcloud.log').read_text()
  assert 'worker 0 got SIGTERM' in calls and 'worker 1 got SIGTERM' in calls
