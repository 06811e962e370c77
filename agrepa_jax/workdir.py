"""What a training workdir guarantees: one writer at a time, and a record of the config it holds.

The lock (`DIR/lock.json`) names its holder (host, pid, start time) and carries a heartbeat that
a background thread renews; a lock whose holder is gone (its pid on this host, or its heartbeat
for longer than STALE_SECONDS anywhere) is taken over with a warning. Multi-host runs take it once,
on process 0. `DIR/config.json` is the config of the run that wrote the checkpoints; a resumed run
may change only settings that do not shape the parameters or the data (STRUCTURAL_KEYS), and
every run start appends its changes to `DIR/config_history.jsonl`. docs/reliability.md has more.
"""

import contextlib
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

import jax
from etils import epath

from agrepa_jax import files
from agrepa_jax.console import RunError

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


@contextlib.contextmanager
def exclusive(workdir):
  """Holds `workdir` for this run (on process 0); every process fails if another run holds it."""
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
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


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


def record_config(config, workdir, resumes: bool, allow_change: bool = False):
  """Checks `config` against the one stored with the checkpoints, then records it (process 0).

  `resumes`: the workdir has checkpoints. A change to a STRUCTURAL_KEYS key then raises
  ConfigChanged listing every such key, old -> new, unless `allow_change`. The stored config.json
  is replaced only after the check; each call appends a row to config_history.jsonl.
  """
  workdir = epath.Path(workdir)
  new = config_record(config)
  stored_path = workdir / CONFIG_NAME
  old = json.loads(stored_path.read_text()) if stored_path.exists() else None
  changes = config_changes(old, new) if old is not None else {}
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
    logging.warning('%s has checkpoints but no %s: recording this config', workdir, CONFIG_NAME)
  if changes:
    logging.info('config changes since the last run of %s:\n%s', workdir, format_changes(changes))
  if jax.process_index() != 0:
    return
  row = {
    'time': _now(),
    'resumes': resumes,
    'changes': {k: list(v) for k, v in changes.items()},
    'allowed_structural_change': bool(resumes and structural),
  }
  files.append_line(workdir / HISTORY_NAME, json.dumps(row))
  files.write_atomic(stored_path, json.dumps(new, indent=2))
