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

from agrepa_jax import checkpoint, config_base, config_checks, console, metrics, train
from agrepa_jax import workdir as workdir_lib
from tests.helpers import tiny_config, write_fake_cache
from tests.test_main import (
  REPO,
  main_env,
  metric_rows,
  run_main,
  start_main,
  tiny_config_file,
)


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


def start(config, workdir, checkpoint_config=None, resumes=False, allow_change=False):
  """A run start's config steps: the check, then (once it passed) the record."""
  changes = workdir_lib.check_config(config, workdir, checkpoint_config, resumes, allow_change)
  workdir_lib.record_config(config, workdir, changes, resumes)


def test_resuming_with_changed_model_settings_fails_and_keeps_the_record(tmp_path):
  start(small_config(), tmp_path)
  stored = (tmp_path / 'config.json').read_text()
  changed = small_config()
  changed.model.update(width=64, num_heads=8)  # num_heads keeps every parameter shape
  changed.optim.learning_rate = 1.0
  saved = workdir_lib.config_record(small_config())  # as saved with the checkpoints
  with pytest.raises(workdir_lib.ConfigChanged) as error:
    start(changed, tmp_path, saved, resumes=True)
  message = str(error.value)
  assert 'model.width: 32 -> 64' in message and 'model.num_heads: 4 -> 8' in message
  assert 'learning_rate' not in message and '--allow_config_change' in message
  assert (tmp_path / 'config.json').read_text() == stored
  assert len(history(tmp_path)) == 1

  start(changed, tmp_path, saved, resumes=True, allow_change=True)
  assert json.loads((tmp_path / 'config.json').read_text())['model']['width'] == 64
  last = history(tmp_path)[-1]
  assert last['allowed_structural_change'] and last['changes']['model.width'] == [32, 64]


@pytest.mark.parametrize('config_json', [None, '', '{"model": {"num_heads": 8}}'])
def test_drift_is_judged_against_the_checkpoint_whatever_config_json_holds(tmp_path, config_json):
  if config_json is not None:  # None: deleted; '': emptied; else stale
    (tmp_path / 'config.json').write_text(config_json)
  heads = small_config()
  heads.model.num_heads = 8
  saved = workdir_lib.config_record(small_config())
  with pytest.raises(workdir_lib.ConfigChanged, match='model.num_heads: 4 -> 8'):
    workdir_lib.check_config(heads, tmp_path, saved, resumes=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == (
    [] if config_json is None else ['config.json']
  )


def test_training_settings_may_change_on_resume_and_are_recorded(tmp_path):
  start(small_config(), tmp_path)
  changed = small_config(num_steps=5000, log_every=7)
  changed.optim.learning_rate = 3e-4
  changed.data.cache_dir = '/elsewhere'
  changed.model.remat = 'full'
  start(changed, tmp_path, workdir_lib.config_record(small_config()), resumes=True)
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
    assert stop.reached(10) and not stop.preempted  # Ctrl-C: exit status 0
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(1)
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGINT) is before


def test_sigterm_stops_at_the_next_check_as_a_preemption():
  before = signal.getsignal(signal.SIGTERM)
  stop = checkpoint.StopRequest(check_every=2)
  try:
    assert not stop.reached(2) and not stop.preempted
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.reached(4) and stop.preempted  # exit status 6
  finally:
    stop.restore()
  assert signal.getsignal(signal.SIGTERM) is before


def lock_path(workdir):
  return workdir / workdir_lib.LOCK_NAME


@pytest.mark.parametrize(
  'signum, raised', [(signal.SIGTERM, console.Preempted), (signal.SIGINT, KeyboardInterrupt)]
)
def test_a_signal_while_the_workdir_is_held_releases_the_lock(tmp_path, signum, raised):
  runner = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
  try:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(raised), workdir_lib.exclusive(tmp_path):
      assert lock_path(tmp_path).exists()
      os.kill(os.getpid(), signum)
      time.sleep(5)
    assert {s: signal.getsignal(s) for s in before} == before
  finally:
    signal.signal(signal.SIGINT, runner)
  assert not lock_path(tmp_path).exists()


def test_a_signal_while_the_lock_is_taken_raises_once_it_is_taken_and_releases_it(
  tmp_path, monkeypatch
):
  create = workdir_lib._create_exclusive

  def create_then_signal(path, text):
    created = create(path, text)
    os.kill(os.getpid(), signal.SIGTERM)  # handled before the lock is fully taken
    time.sleep(0.1)
    assert path.exists()
    return created

  monkeypatch.setattr(workdir_lib, '_create_exclusive', create_then_signal)
  with pytest.raises(console.Preempted, match='SIGTERM'), workdir_lib.exclusive(tmp_path):
    pytest.fail('the run must not start after the signal')
  assert not lock_path(tmp_path).exists()


def test_a_signal_that_a_finalizer_swallowed_is_raised_at_the_next_check(tmp_path, capsys):
  class SignalledWhenCollected:
    def __del__(self):  # like JAX's gc callback: what a handler raises in here is dropped
      os.kill(os.getpid(), signal.SIGTERM)
      deadline = time.time() + 5
      while time.time() < deadline:
        time.sleep(0.01)

  hook_before = sys.unraisablehook
  with (
    pytest.raises(console.Preempted, match='SIGTERM'),
    workdir_lib.exclusive(tmp_path) as signals,
  ):
    SignalledWhenCollected()  # collected at once: the signal lands in __del__
    assert signals.received == signal.SIGTERM
    assert 'Traceback' not in capsys.readouterr().err  # dropped quietly, not printed
    signals.raise_received()
  assert not lock_path(tmp_path).exists()
  assert sys.unraisablehook is hook_before


def test_the_nonfinite_flag_keeps_the_first_bad_step():
  track = jax.jit(train.track_nonfinite)
  first = np.int32(0)
  for step, loss, grad_norm in ((1, 1.0, 1.0), (2, 1.0, np.inf), (3, np.nan, np.nan), (4, 1, 1)):
    first = track(first, np.int32(step), np.float32(loss), np.float32(grad_norm))
  assert int(first) == 2


# ----- bad input: exit status 2, one line, nothing written -----

CLI_DRIVER = """
import json, os, sys
from absl import app
from agrepa_jax import config_checks, main  # imported once: each case runs in a fork

results = []
for argv in json.loads(sys.argv[1]):
  read, write = os.pipe()
  pid = os.fork()
  if pid == 0:
    os.dup2(write, 2)
    sys.argv = ['agrepa_jax.main', *argv]
    try:
      app.run(main.main, argv=sys.argv, flags_parser=main.parse_flags)
      code = 0
    except SystemExit as stop:
      code = stop.code if isinstance(stop.code, int) else 1
    sys.stderr.flush()
    os._exit(code)
  os.close(write)
  with os.fdopen(read) as stream:
    stderr = stream.read()
  results.append({'code': os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]), 'stderr': stderr})
print(json.dumps(results))
"""

CONFIG_FILES = {
  'syntax.py': 'def get_config(:\n  pass\n',
  'raises.py': 'def get_config():\n  return undefined_name\n',
  'typo.py': (
    'from agrepa_jax import config_base\n\n\ndef get_config():\n'
    '  config = config_base.base_config()\n  config.model.widht = 64\n  return config\n'
  ),
}


def as_user_prefix() -> list[str] | None:
  """The command prefix under which permission bits bind this process: none for a user; for root,
  a user namespace (root owns the files but is no longer exempt from their bits); None where that
  is not allowed."""
  if os.geteuid() != 0:
    return []
  allowed = subprocess.run(['unshare', '-U', 'true'], capture_output=True).returncode == 0
  return ['unshare', '-U'] if allowed else None


def test_every_bad_value_or_path_exits_2_with_one_error_line_and_writes_nothing(tmp_path):
  for name, text in CONFIG_FILES.items():
    (tmp_path / name).write_text(text)
  held = tmp_path / 'held'  # an existing workdir that no case may change
  (held / 'checkpoints').mkdir(parents=True)
  (held / 'config.json').write_text('{"num_steps": 3}')
  read_only = tmp_path / 'read_only'
  read_only.mkdir(mode=0o555)
  a_file = tmp_path / 'a_file'
  a_file.write_text('not a workdir')
  new = tmp_path / 'new'
  default = ['--config', 'configs/default.py', '--workdir', str(held)]
  cases = {  # name: (arguments, what the error line says)
    'config syntax error': (
      ['--config', str(tmp_path / 'syntax.py'), '--workdir', str(held)],
      f'--config {tmp_path / "syntax.py"}, line 1: invalid syntax',
    ),
    'missing config file': (
      ['--config', str(tmp_path / 'missing.py'), '--workdir', str(new)],
      f'--config {tmp_path / "missing.py"}: no such file',
    ),
    'config file that raises': (
      ['--config', str(tmp_path / 'raises.py'), '--workdir', str(held)],
      f"{tmp_path / 'raises.py'}, line 2: NameError: name 'undefined_name' is not defined",
    ),
    'unknown key in the config file': (
      ['--config', str(tmp_path / 'typo.py'), '--workdir', str(held)],
      'model.widht: no such key (did you mean model.width?)',
    ),
    'unknown key': ([*default, '--config.model.widht=64'], 'model.widht: no such key'),
    'unknown section': ([*default, '--config.modle.width=64'], '--config.modle.width: no such key'),
    'value of another type': (
      [*default, '--config.batch_size=abc'],
      "flag --config.batch_size=abc: invalid literal for int() with base 10: 'abc'",
    ),
    'workdir that is a file': (
      ['--config', 'configs/default.py', '--workdir', str(a_file)],
      f'--workdir {a_file}: a file, not a directory',
    ),
    'read-only workdir': (
      ['--config', 'configs/default.py', '--workdir', str(read_only / 'run')],
      f'--workdir {read_only / "run"}: {read_only} is not writable by this user',
    ),
    'negative learning rate': (
      [*default, '--config.optim.learning_rate=-1e-4'],
      'optim.learning_rate=-0.0001: expected a number > 0',
    ),
    'eval_every < 0': (
      [*default, '--config.eval_every=-1'],
      'eval_every=-1: expected an integer ≥ 0',
    ),
  }
  for key in ('batch_size', 'num_steps', 'keep_checkpoints', 'checkpoint_every', 'log_every',
              'stop_check_every', 'repa.probe_every'):  # fmt: skip
    cases[f'{key}=0'] = ([*default, f'--config.{key}=0'], f'{key}=0: expected an integer ≥ 1')
  prefix = as_user_prefix()
  if prefix is None:  # root without user namespaces writes anywhere
    prefix = []
    del cases['read-only workdir']
  before = workdir_files(held), workdir_files(read_only)
  driver = subprocess.run(
    [*prefix, sys.executable, '-c', CLI_DRIVER, json.dumps([a for a, _ in cases.values()])],
    cwd=REPO,
    env=main_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert driver.returncode == 0, driver.stderr[-3000:]
  assert len(json.loads(driver.stdout)) == len(cases)
  for (name, (_, message)), result in zip(cases.items(), json.loads(driver.stdout)):
    errors = [line for line in result['stderr'].splitlines() if line.startswith('error: ')]
    assert result['code'] == 2 and len(errors) == 1, (name, result)
    assert message in errors[0] and 'Traceback' not in result['stderr'], (name, result)
  assert (workdir_files(held), workdir_files(read_only)) == before
  assert not (held / 'logs').exists() and not new.exists()
  assert a_file.read_text() == 'not a workdir'


def test_config_checks_accept_the_sections_a_config_may_add_and_list_every_problem():
  config = config_base.base_config()
  config.compare = {'num_seeds': 3}  # the compare workflow's section
  config.teachers.beats_fad = {'name': 'beats', 'checkpoint': ''}  # an extra FAD embedding
  config.mesh.presets.v6e_8 = {'devices': 8, 'data': 1, 'fsdp': 8, 'tensor': 1, 'hbm_gb': 32.0}
  config_checks.check(config)
  config.teachers.speech.chekpoint = ''
  config.model.update(dropout=1.0, remat='all')
  config.optim.pct_start = 0.0
  with pytest.raises(console.UsageError) as error:
    config_checks.check(config)
  assert str(error.value).split('; ') == [
    'teachers.speech.chekpoint: no such key (did you mean teachers.speech.checkpoint?)',
    'optim.pct_start=0.0: expected a number in (0, 1)',
    'model.dropout=1.0: expected a number in [0, 1)',
    "model.remat='all': expected one of 'none', 'full', 'dots'",
  ]


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


# ----- checkpoints: damage, the config saved with them, preemption (in-process runs) -----


def quick_config(tmp_path, **changes):
  """The tiny config on its fake store, without held-out evaluation."""
  config = tiny_config(tmp_path / 'cache', eval_every=0, log_every=1, **changes)
  write_fake_cache(config)
  return config


def losses_by_step(workdir):
  return {row['step']: row['loss'] for row in metric_rows(workdir)}


def truncate_largest_array_file(step_dir):
  chunks = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
  largest = max(chunks, key=lambda p: p.stat().st_size)
  largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])


DAMAGE = {  # what a full disk, a lost file or a torn copy leaves
  4: truncate_largest_array_file,
  3: lambda step_dir: (step_dir / 'state' / '_METADATA').unlink(),
  2: lambda step_dir: (step_dir / 'state' / 'manifest.ocdbt').write_bytes(b'garbage' * 8),
}


def workdir_files(workdir) -> dict:
  """Every file of `workdir` but its logs, with its bytes."""
  return {
    str(p.relative_to(workdir)): p.read_bytes()
    for p in sorted(workdir.rglob('*'))
    if p.is_file() and p.relative_to(workdir).parts[0] != 'logs'
  }


def test_damaged_checkpoints_are_moved_aside_and_the_newest_good_one_resumes_bit_identically(
  tmp_path, caplog
):
  config = quick_config(tmp_path, num_steps=4, checkpoint_every=1, keep_checkpoints=4)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, workdir)
  straight = losses_by_step(workdir)
  for step, damage in DAMAGE.items():
    damage(workdir / 'checkpoints' / str(step))

  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(config, workdir)
  for step, reason in (
    (4, 'Exception: Encountered error while reading array'),  # tensorstore's words
    (3, 'FileNotFoundError: checkpoint 3: no metadata of its arrays'),
    (2, 'ValueError: DATA_LOSS: Error opening'),
  ):
    assert f'checkpoint {step} cannot be restored: {reason}' in caplog.text
  moved = sorted((workdir / checkpoint.DAMAGED_NAME).iterdir())
  assert [p.name.split('-')[0] for p in moved] == ['2', '3', '4']  # kept, not deleted
  assert all((p / 'state').is_dir() for p in moved)
  assert losses_by_step(workdir) == straight  # resumed from step 1: the same draws, the same losses
  assert checkpoint.saved_steps(workdir) == [1, 2, 3, 4]

  for step in checkpoint.saved_steps(workdir):
    (workdir / 'checkpoints' / str(step) / 'data' / 'metadata').write_text('{"step": 1, "rec')
  before = workdir_files(workdir)
  with pytest.raises(checkpoint.NoUsableCheckpoint) as error:
    train.train_and_evaluate(config, workdir)
  assert all(f'  step {step}: JSONDecodeError' in str(error.value) for step in (1, 2, 3, 4))
  assert workdir_files(workdir) == before  # left in place: no silent restart from step 0


def test_sigterm_saves_then_preempts_and_the_config_saved_with_the_checkpoint_judges_drift(
  tmp_path, monkeypatch
):
  config = quick_config(tmp_path, num_steps=100, checkpoint_every=1000, stop_check_every=1)
  write = metrics.MetricWriter.write

  def write_then_sigterm(self, step, scalars):
    write(self, step, scalars)
    if step == 2:
      os.kill(os.getpid(), signal.SIGTERM)

  workdir = tmp_path / 'run'
  with monkeypatch.context() as patch:
    patch.setattr(metrics.MetricWriter, 'write', write_then_sigterm)
    with pytest.raises(console.Preempted, match='after saving step 2'):
      train.train_and_evaluate(config, workdir)
  assert checkpoint.saved_steps(workdir) == [2] and not lock_path(workdir).exists()
  assert checkpoint.saved_config(workdir, 2) == workdir_lib.config_record(config)

  before = workdir_files(workdir)
  heads = config.copy_and_resolve_references()
  heads.model.num_heads = 8  # every parameter keeps its shape
  for text in (None, '', '{"model": {"num_heads": 8}}'):  # config.json deleted, emptied, stale
    (workdir / 'config.json').unlink(missing_ok=True)
    if text is not None:
      (workdir / 'config.json').write_text(text)
    with pytest.raises(workdir_lib.ConfigChanged, match='model.num_heads: 4 -> 8'):
      train.train_and_evaluate(heads, workdir)
  (workdir / 'config.json').write_bytes(before['config.json'])

  wider = config.copy_and_resolve_references()
  wider.model.width = 64
  with pytest.raises(
    workdir_lib.ConfigChanged,
    match=r'other shapes .*first: params.backbone.blocks.attn_out.bias.value: \(3, 32\) saved, ',
  ):
    train.train_and_evaluate(wider, workdir, allow_config_change=True)
  assert workdir_files(workdir) == before  # config, history and checkpoints as they were


# ----- real processes -----


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
