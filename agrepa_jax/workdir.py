"""What a training workdir guarantees: one writer at a time, and a record of the config it holds.

The lock (`DIR/lock.json`) names its holder (host, pid, start time) and carries a heartbeat that
a background thread renews; a lock whose holder is gone (its pid on this host, or its heartbeat
for longer than STALE_SECONDS anywhere) is taken over with a warning. Multi-host runs take it once,
on process 0. While it is held, SIGTERM and Ctrl-C raise exceptions (outside the training loop,
which stops on them by itself), so that the lock is released whenever they arrive. Each checkpoint
carries the config of the run that wrote it; a resumed run may change only settings that do not
shape the parameters or the data (STRUCTURAL_KEYS). Once a run has started, `DIR/config.json`
holds its config and `DIR/config_history.jsonl` its changes. docs/reliability.md has more.
"""

import contextlib
import datetime
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import threading
import time
import uuid

import jax
from etils import epath

from agrepa_jax import files
from agrepa_jax.console import Preempted, RunError, UsageError

LOCK_NAME = 'lock.json'
CONFIG_NAME = 'config.json'
HISTORY_NAME = 'config_history.jsonl'
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 600.0  # a heartbeat this old means the holder is gone, on any host

# Config keys (a section or one key) that shape the parameters or the data: a resumed run must
# keep them unless --allow_config_change. Everything else (lr, steps, logging) may change.
STRUCTURAL_KEYS = ('model', 'teachers', 'data', 'bitc.form', 'optim.ema_decay')
# Keys inside STRUCTURAL_KEYS that change neither: where and how the data is stored and read,
# how the step is computed.
RUNTIME_KEYS = (
  'data.cache_dir',
  'data.chunk_size',
  'data.shard_clips',
  'data.num_workers',
  'model.remat',
  'model.dtype',
  'model.scan_unroll',
  'model.dropout_rng',
)


class WorkdirLocked(RunError):
  exit_code = 3


class ConfigChanged(RunError):
  exit_code = 4


def check_workdir(workdir: epath.Path):
  """Raises UsageError unless `workdir` is a directory this user can write, or can be created as
  one. Writes nothing; object stores show their permissions at the first write."""
  if workdir.exists() and not workdir.is_dir():
    raise UsageError(f'--workdir {workdir}: a file, not a directory')
  if not files.is_local(workdir):
    return
  existing = pathlib.Path(workdir)
  while not existing.exists():
    existing = existing.parent
  if not existing.is_dir():
    raise UsageError(f'--workdir {workdir}: {existing} is a file, not a directory')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise UsageError(f'--workdir {workdir}: {existing} is not writable by this user')


def preemption_service_running() -> bool:
  """Whether JAX's preemption notifier owns SIGTERM (multi-process runs, jax.distributed)."""
  return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


def _now() -> str:
  return datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # alive, owned by another user
    return True
  return True


def _create_exclusive(path: epath.Path, text: str) -> bool:
  """Creates `path` with `text` unless it exists; False if it does (or another writer won)."""
  if files.is_local(path):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      return False
    with os.fdopen(fd, 'w') as f:
      f.write(text)
    return True
  if path.exists():  # object stores have no exclusive create: write, then check who won
    return False
  path.write_text(text)
  time.sleep(1.0)
  return path.read_text() == text


def describe_holder(holder: dict) -> str:
  return (
    f'host {holder.get("host")}, pid {holder.get("pid")}, started {holder.get("started")}, '
    f'last heartbeat {holder.get("heartbeat")}'
  )


def holder_is_gone(holder: dict, now: float | None = None) -> bool:
  """Whether the run that wrote the lock `holder` has ended (it cannot have released the lock)."""
  now = time.time() if now is None else now
  if holder.get('host') == socket.gethostname() and not _pid_alive(int(holder.get('pid', -1))):
    return True
  return now - float(holder.get('heartbeat_time', 0.0)) > STALE_SECONDS


class WorkdirLock:
  """Exclusive hold of a workdir by this process, renewed by a heartbeat until `release()`."""

  def __init__(self, workdir):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.holder = {
      'host': socket.gethostname(),
      'pid': os.getpid(),
      'started': _now(),
      'token': uuid.uuid4().hex,
    }
    self._stop = threading.Event()
    self._thread = None

  def _text(self) -> str:
    return json.dumps({**self.holder, 'heartbeat': _now(), 'heartbeat_time': time.time()})

  def _read(self, tries: int = 5) -> dict:
    for _ in range(tries):
      try:
        return json.loads(self.path.read_text())
      except FileNotFoundError:
        return {}
      except json.JSONDecodeError:  # being created this instant, or torn by a crash
        time.sleep(0.2)
    return {'host': '?', 'pid': -1, 'heartbeat_time': 0.0}

  def acquire(self):
    self.path.parent.mkdir(parents=True, exist_ok=True)
    if not _create_exclusive(self.path, self._text()):
      holder = self._read()
      if not holder_is_gone(holder):
        raise WorkdirLocked(
          f'{self.path.parent} is in use by another run ({describe_holder(holder)}); '
          f'stop it first, or delete {self.path} if that run is known to be dead'
        )
      logging.warning(
        'taking over %s: the run that held it is gone (%s)', self.path, describe_holder(holder)
      )
      self.path.unlink(missing_ok=True)
      if not _create_exclusive(self.path, self._text()):
        raise WorkdirLocked(f'{self.path.parent} was taken by another run at the same moment')
    self._thread = threading.Thread(target=self._beat, name='workdir-lock', daemon=True)
    self._thread.start()

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      if self._read().get('token') != self.holder['token']:
        logging.error('%s no longer names this run: another run took over the workdir', self.path)
        return
      files.write_atomic(self.path, self._text())

  def release(self):
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._read().get('token') == self.holder['token']:
      self.path.unlink(missing_ok=True)


def _raise_for(signum: int):
  if signum == signal.SIGINT:
    raise KeyboardInterrupt
  raise Preempted(
    f'{signal.Signals(signum).name} received outside the training steps: stopped; the same '
    'command resumes from the last checkpoint'
  )


class SignalsRaise:
  """Until `close()`: SIGTERM raises console.Preempted and SIGINT KeyboardInterrupt, except inside
  `deferred()` blocks (taking or releasing the lock), at whose end they are raised. Signals this
  process ignores (nohup, a background job) stay ignored.

  Python runs a handler wherever the main thread is, also inside a gc callback or a `__del__`,
  where what it raises would be printed as a traceback and dropped (JAX's `_xla_gc_callback` is
  one): it is dropped quietly, and `raise_received` raises it again at the next point that calls it.
  """

  def __init__(self, signals):
    self.depth, self.pending, self.received = 0, None, None
    self._previous = {
      s: signal.signal(s, self._handle) for s in signals if signal.getsignal(s) != signal.SIG_IGN
    }
    self._previous_unraisable_hook, sys.unraisablehook = sys.unraisablehook, self._unraisable

  def _unraisable(self, unraisable):
    if not isinstance(unraisable.exc_value, Preempted | KeyboardInterrupt):
      self._previous_unraisable_hook(unraisable)

  def _handle(self, signum, frame):
    self.received = self.received or signum
    if self.depth:
      self.pending = self.pending or signum
    else:
      _raise_for(signum)

  @contextlib.contextmanager
  def deferred(self):
    self.depth += 1
    try:
      yield
    finally:
      self.depth -= 1
    if not self.depth and self.pending:
      signum, self.pending = self.pending, None
      _raise_for(signum)

  def raise_received(self):
    """Raises the first signal received, if any: one that a callback swallowed is not lost."""
    if self.received:
      _raise_for(self.received)

  def close(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)
    sys.unraisablehook = self._previous_unraisable_hook


def _acquire_on_process_0(workdir) -> WorkdirLock | None:
  """The lock of `workdir`, taken by process 0; WorkdirLocked on every process if it is held."""
  lock, error = None, ''
  if jax.process_index() == 0:
    lock = WorkdirLock(workdir)
    try:
      lock.acquire()
    except WorkdirLocked as e:
      lock, error = None, str(e)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    failed = multihost_utils.broadcast_one_to_all(int(bool(error)))
    if failed and not error:
      error = f'{workdir} is in use by another run (process 0 names it)'
  if error:
    raise WorkdirLocked(error)
  return lock


@contextlib.contextmanager
def exclusive(workdir):
  """Holds `workdir` for this run (on process 0); every process fails if another run holds it.

  A signal at any moment releases the lock: SIGTERM raises console.Preempted (on multi-process
  runs JAX's preemption notifier keeps SIGTERM, and the loop stops at its next check) and Ctrl-C
  KeyboardInterrupt, each after the lock is taken or released if that is under way. Yields the
  SignalsRaise, whose `raise_received` the run calls between its start-up stages.
  """
  handled = (signal.SIGINT,) if preemption_service_running() else (signal.SIGINT, signal.SIGTERM)
  signals = SignalsRaise(handled)
  lock = None
  try:
    with signals.deferred():
      lock = _acquire_on_process_0(workdir)
    yield signals
  finally:
    with signals.deferred():
      if lock is not None:
        lock.release()
      signals.close()


def flatten(tree: dict, prefix: str = '') -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1}; values normalized through JSON (tuples become lists)."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def config_record(config) -> dict:
  return json.loads(json.dumps(config.to_dict(), default=str))


def is_structural(key: str) -> bool:
  within = lambda names: any(key == n or key.startswith(n + '.') for n in names)
  return within(STRUCTURAL_KEYS) and not within(RUNTIME_KEYS)


MISSING = '<absent>'


def config_changes(old: dict, new: dict) -> dict[str, tuple]:
  """{flat key: (old value, new value)} for every key that differs; MISSING where absent."""
  old, new = flatten(old), flatten(new)
  return {
    k: (old.get(k, MISSING), new.get(k, MISSING))
    for k in sorted(set(old) | set(new))
    if old.get(k, MISSING) != new.get(k, MISSING)
  }


def format_changes(changes: dict[str, tuple]) -> str:
  return '\n'.join(f'  {k}: {old!r} -> {new!r}' for k, (old, new) in changes.items())


def read_stored_config(workdir) -> dict | None:
  """DIR/config.json, or None when it is missing or unreadable (with a warning that names it)."""
  path = epath.Path(workdir) / CONFIG_NAME
  if not path.exists():
    return None
  try:
    record = json.loads(path.read_text())
    if isinstance(record, dict):
      return record
    reason = f'a JSON {type(record).__name__}'
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    reason = str(e)
  logging.warning('%s is not a config record (%s): ignored', path, reason)
  return None


def check_config(
  config, workdir, checkpoint_config: dict | None, resumes: bool, allow_change: bool = False
) -> dict[str, tuple]:
  """The changes of `config` from the one its checkpoints belong to; writes nothing.

  `resumes`: the workdir has checkpoints. `checkpoint_config`: the config saved with the checkpoint
  it resumes from; DIR/config.json stands in for it when None (checkpoints saved before they
  carried their config) and for a run without checkpoints. A change to a STRUCTURAL_KEYS key of a
  resumed run raises ConfigChanged listing every such key, old -> new, unless `allow_change`.
  """
  old = checkpoint_config if checkpoint_config is not None else read_stored_config(workdir)
  changes = config_changes(old, config_record(config)) if old is not None else {}
  structural = {k: v for k, v in changes.items() if is_structural(k)}
  if resumes and structural:
    if not allow_change:
      raise ConfigChanged(
        f'{workdir} holds checkpoints of a different model or data; changed settings:\n'
        f'{format_changes(structural)}\n'
        'use a new --workdir, restore these settings, or pass --allow_config_change'
      )
    logging.warning(
      'resuming with changed model/data settings (--allow_config_change):\n%s',
      format_changes(structural),
    )
  elif resumes and old is None:
    logging.warning('%s has checkpoints but no config record: this config is not checked', workdir)
  if changes:
    logging.info('config changes since the last run of %s:\n%s', workdir, format_changes(changes))
  return changes


def record_config(config, workdir, changes: dict[str, tuple], resumes: bool):
  """Writes `config` to DIR/config.json and appends a row with its `changes` (check_config) to
  DIR/config_history.jsonl, on process 0: once the run has restored and passed every check."""
  if jax.process_index() != 0:
    return
  workdir = epath.Path(workdir)
  row = {
    'time': _now(),
    'resumes': resumes,
    'changes': {k: list(v) for k, v in changes.items()},
    'allowed_structural_change': resumes and any(map(is_structural, changes)),
  }
  files.append_line(workdir / HISTORY_NAME, json.dumps(row))
  files.write_atomic(workdir / CONFIG_NAME, json.dumps(config_record(config), indent=2))
