"""Faults a real user meets: a second run on a workdir, a kill mid-write, config drift,
divergence."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from agrepa_jax import checkpoint, config_base, metrics, train
from agrepa_jax import workdir as workdir_lib
from tests.test_main import REPO, main_env, metric_rows, run_main, tiny_config_file


def dead_pid() -> int:
  process = subprocess.Popen([sys.executable, '-c', 'pass'])
  process.wait()
  return process.pid


def write_lock(workdir, **holder):
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / workdir_lib.LOCK_NAME).write_text(json.dumps(holder))


# ----- metrics.jsonl -----


def test_a_torn_last_metrics_line_is_dropped_with_a_warning_naming_the_file(tmp_path, caplog):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
  with caplog.at_level(logging.WARNING):
    assert metrics.read_metrics(path) == [{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': 1.5}]
  assert str(path) in caplog.text and 'torn' in caplog.text
  path.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')  # damage inside the file is an error
  with pytest.raises(ValueError, match=r'metrics.jsonl, line 2'):
    metrics.read_metrics(path)


# ----- the workdir lock -----


def test_a_held_workdir_refuses_a_second_holder_and_names_the_first(tmp_path):
  first = workdir_lib.WorkdirLock(tmp_path)
  first.acquire()
  try:
    with pytest.raises(workdir_lib.WorkdirLocked) as error:
      workdir_lib.WorkdirLock(tmp_path).acquire()
    message = str(error.value)
    assert f'pid {os.getpid()}' in message and socket.gethostname() in message
    assert first.holder['started'] in message
  finally:
    first.release()
  assert not (tmp_path / workdir_lib.LOCK_NAME).exists()
  with workdir_lib.exclusive(tmp_path):  # free again
    assert json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())['pid'] == os.getpid()


def test_the_holder_renews_its_heartbeat(tmp_path, monkeypatch):
  monkeypatch.setattr(workdir_lib, 'HEARTBEAT_SECONDS', 0.05)
  lock = workdir_lib.WorkdirLock(tmp_path)
  lock.acquire()
  try:
    read = lambda: json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())
    first = read()['heartbeat_time']
    deadline = time.time() + 30
    while time.time() < deadline and read()['heartbeat_time'] == first:
      time.sleep(0.05)
    assert read()['heartbeat_time'] > first and read()['token'] == lock.holder['token']
  finally:
    lock.release()


def test_a_lock_left_by_a_dead_run_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = dead_pid()
  write_lock(
    tmp_path, host=socket.gethostname(), pid=pid, started='then', heartbeat_time=time.time()
  )
  with caplog.at_level(logging.WARNING), workdir_lib.exclusive(tmp_path):
    assert json.loads((tmp_path / workdir_lib.LOCK_NAME).read_text())['pid'] == os.getpid()
  assert 'taking over' in caplog.text and f'pid {pid}' in caplog.text


def test_a_lock_of_another_host_is_stale_only_when_its_heartbeat_is(tmp_path):
  now = time.time()
  fresh = {'host': 'elsewhere', 'pid': 1, 'heartbeat_time': now - 60}
  stale = {**fresh, 'heartbeat_time': now - workdir_lib.STALE_SECONDS - 1}
  assert not workdir_lib.holder_is_gone(fresh, now)
  assert workdir_lib.holder_is_gone(stale, now)
  write_lock(tmp_path, started='earlier', **fresh)
  with pytest.raises(workdir_lib.WorkdirLocked, match='host elsewhere, pid 1, started earlier'):
    workdir_lib.WorkdirLock(tmp_path).acquire()


# ----- the config record -----


def small_config(**changes):
  config = config_base.base_config()
  config.model.update(width=32, num_heads=4)
  config.update(changes)
  return config


def history(workdir):
  return [
    json.loads(line) for line in (workdir / workdir_lib.HISTORY_NAME).read_text().splitlines()
  ]


def test_resuming_with_changed_model_settings_fails_and_keeps_the_record(tmp_path):
  workdir_lib.record_config(small_config(), tmp_path, resumes=False)
  stored = (tmp_path / 'config.json').read_text()
  changed = small_config()
  changed.model.update(width=64, num_heads=8)  # num_heads keeps every parameter shape
  changed.optim.learning_rate = 1.0
  with pytest.raises(workdir_lib.ConfigChanged) as error:
    workdir_lib.record_config(changed, tmp_path, resumes=True)
  message = str(error.value)
  assert 'model.width: 32 -> 64' in message and 'model.num_heads: 4 -> 8' in message
  assert 'learning_rate' not in message and '--allow_config_change' in message
  assert (tmp_path / 'config.json').read_text() == stored
  assert len(history(tmp_path)) == 1

  workdir_lib.record_config(changed, tmp_path, resumes=True, allow_change=True)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['width'] == 64
  last = history(tmp_path)[-1]
  assert last['allowed_structural_change'] and last['changes']['model.width'] == [32, 64]


def test_training_settings_may_change_on_resume_and_are_recorded(tmp_path):
  workdir_lib.record_config(small_config(), tmp_path, resumes=False)
  changed = small_config(num_steps=5000, log_every=7)
  changed.optim.learning_rate = 3e-4
  changed.data.cache_dir = '/elsewhere'
  changed.model.remat = 'full'
  workdir_lib.record_config(changed, tmp_path, resumes=True)
  last = history(tmp_path)[-1]
  assert last['changes'] == {
    'data.cache_dir': ['~/.cache/agrepa_jax', '/elsewhere'],
    'log_every': [50, 7],
    'model.remat': ['none', 'full'],
    'num_steps': [1000, 5000],
    'optim.learning_rate': [1e-4, 3e-4],
  }
  assert not last['allowed_structural_change']
  assert json.loads((tmp_path / 'config.json').read_text())['num_steps'] == 5000


# ----- stopping -----


def test_ctrl_c_stops_at_the_next_check_and_a_second_one_interrupts_at_once():
  before = signal.getsignal(signal.SIGINT)  # SIG_IGN in a background job, nohup or some CI runners
  stop = checkpoint.StopRequest(check_every=5)
  try:
    os.kill(os.getpid(), signal.SIGINT)
    assert not stop.reached(4) and not stop.reached(7)  # no check between multiples
    assert stop.reached(10)
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


def test_the_nonfinite_flag_keeps_the_first_bad_step():
  track = jax.jit(train.track_nonfinite)
  first = np.int32(0)
  for step, loss, grad_norm in ((1, 1.0, 1.0), (2, 1.0, np.inf), (3, np.nan, np.nan), (4, 1, 1)):
    first = track(first, np.int32(step), np.float32(loss), np.float32(grad_norm))
  assert int(first) == 2


# ----- inference modes on a workdir without a checkpoint -----


@pytest.mark.parametrize('mode', ['probe', 'sample', 'eval'])
def test_inference_modes_fail_on_a_workdir_without_checkpoint_before_touching_data(
  tmp_path, monkeypatch, mode
):
  from agrepa_jax.data import prepare
  from agrepa_jax.generation import evaluate
  from agrepa_jax.probe import report

  def no_data(config):
    raise AssertionError('data touched before the checkpoint check')

  monkeypatch.setattr(prepare, 'prepare', no_data)
  run = {'probe': report.run_probe, 'sample': evaluate.run_sample, 'eval': evaluate.run_eval}[mode]
  with pytest.raises(FileNotFoundError, match='no checkpoint in .*train this workdir first'):
    run(config_base.base_config(), tmp_path / 'empty')


# ----- real processes -----


def start_main(*args):
  return subprocess.Popen(
    [sys.executable, '-m', 'agrepa_jax.main', *args],
    cwd=REPO,
    env=main_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


TMP = '.orbax-checkpoint-tmp'  # orbax writes a step here, then renames it


def checkpoint_entries(workdir):
  directory = workdir / 'checkpoints'
  return sorted(p.name for p in directory.iterdir()) if directory.exists() else []


@pytest.mark.slow
def test_a_second_run_is_refused_and_a_run_killed_mid_checkpoint_resumes(tmp_path):
  workdir = tmp_path / 'run'
  endless = tiny_config_file(tmp_path, 10**6, checkpoint_every=1)  # async saves at every step
  first = start_main('--config', endless, '--workdir', str(workdir))
  try:
    deadline = time.time() + 600
    while time.time() < deadline and not checkpoint.saved_steps(workdir):
      time.sleep(0.2)
    second = run_main('--config', endless, '--workdir', str(workdir))
    assert second.returncode == workdir_lib.WorkdirLocked.exit_code, second.stderr[-3000:]
    assert f'pid {first.pid}' in second.stderr and socket.gethostname() in second.stderr
    assert 'Traceback' not in second.stderr
    deadline = time.time() + 120
    while time.time() < deadline and not any(TMP in n for n in checkpoint_entries(workdir)):
      time.sleep(0.01)  # kill while orbax writes a checkpoint
  finally:
    first.kill()
    first.communicate()
  assert first.returncode == -signal.SIGKILL
  saved = checkpoint.saved_steps(workdir)
  with (workdir / 'metrics.jsonl').open('a') as f:
    f.write('{"step": 99999, "lo')  # as if killed while writing a row

  resume = tiny_config_file(tmp_path, saved[-1] + 2, checkpoint_every=1)
  result = run_main('--config', resume, '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'taking over' in result.stderr and f'pid {first.pid}' in result.stderr
  assert 'metrics.jsonl: dropping its last line' in result.stderr
  assert f'resumed from step {saved[-1]}' in result.stderr
  assert checkpoint.saved_steps(workdir)[-1] == saved[-1] + 2
  assert not any(TMP in n for n in checkpoint_entries(workdir))  # the torn write is gone
  assert [r['step'] for r in metric_rows(workdir)][-1] == saved[-1] + 2
  assert not (workdir / workdir_lib.LOCK_NAME).exists()
  assert history(workdir)[-1]['changes'] == {'num_steps': [10**6, saved[-1] + 2]}


@pytest.mark.slow
def test_a_changed_width_is_refused_and_a_diverging_run_keeps_its_last_finite_checkpoint(
  tmp_path,
):
  from tests.helpers import tiny_config

  workdir = tmp_path / 'run'
  config_file = tiny_config_file(tmp_path, 3)
  result = run_main('--config', config_file, '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  stored = (workdir / 'config.json').read_text()

  wider = run_main('--config', config_file, '--workdir', str(workdir), '--config.model.width=64')
  assert wider.returncode == workdir_lib.ConfigChanged.exit_code, wider.stderr[-3000:]
  assert 'model.width: 32 -> 64' in wider.stderr and '--allow_config_change' in wider.stderr
  assert (workdir / 'config.json').read_text() == stored
  assert checkpoint.saved_steps(workdir) == [3]

  diverging = run_main(
    '--config',
    tiny_config_file(tmp_path, 40),
    '--workdir',
    str(workdir),
    '--config.optim.learning_rate=1e9',
    '--config.optim.schedule=constant',
    '--config.keep_checkpoints=1',
    '--config.checkpoint_every=5',  # checked after the log row of the same step is written
    '--config.log_every=5',
  )
  assert diverging.returncode == train.NonFiniteTraining.exit_code, diverging.stderr[-3000:]
  assert 'non-finite loss or gradients from step' in diverging.stderr
  saved = checkpoint.saved_steps(workdir)
  assert len(saved) == 1 and f'Last good checkpoint: step {saved[0]} in ' in diverging.stderr
  losses = {r['step']: r['loss'] for r in metric_rows(workdir)}
  assert not np.isfinite(losses[max(losses)])
  run = checkpoint.restore_trained(tiny_config(tmp_path / 'cache'), workdir)
  params = [np.asarray(p) for p in jax.tree.leaves(nnx.state(run.model))]
  assert run.step == saved[0] and all(np.isfinite(p).all() for p in params)


STOPPING_PROCESS = """
import sys, time
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from agrepa_jax import checkpoint
stop = checkpoint.StopRequest(check_every=2)
print('ready', flush=True)
for step in range(1, 10**6):
  time.sleep(0.02 * (1 + int(sys.argv[2])))  # the processes run at different speeds
  if stop.reached(step):
    print('stopped after', step, flush=True)
    break
"""


@pytest.mark.slow
def test_ctrl_c_on_one_process_stops_every_process_after_the_same_step():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  processes = [
    subprocess.Popen(
      [sys.executable, '-c', STOPPING_PROCESS, address, str(i)],
      cwd=REPO,
      env={**main_env(), 'PYTHONPATH': REPO},
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  try:
    for process in processes:
      assert process.stdout.readline().strip() == 'ready'
    time.sleep(1)
    processes[1].send_signal(signal.SIGINT)
    outputs = [process.communicate(timeout=300) for process in processes]
  finally:
    for process in processes:
      process.kill()
  stopped = [out.strip().splitlines()[-1] for out, _ in outputs]
  assert stopped[0] == stopped[1] and stopped[0].startswith('stopped after'), outputs
  assert [p.returncode for p in processes] == [0, 0], outputs
  assert 'SIGINT received' in outputs[1][1]
