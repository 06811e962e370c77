"""Claims on pieces of work in a directory that every builder sees (local, NFS or gs://).

Builders of one feature store (the processes of a training job, the tasks of a SLURM array, or two
runs started by hand) share work without talking to each other: a builder *claims* a piece
(a listing unit, the tokenizer, a shard) by creating `<name>.claim` exclusively, keeps it fresh
with a heartbeat while it works, and removes it when the piece's result is written. A claim whose
heartbeat is older than `stale_after` seconds belongs to a builder that died; another builder
takes it over. Nobody waits in a collective: a builder that needs another's result polls for it.
"""

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid

from etils import epath

HEARTBEAT_SECONDS = 30.0


def owner_name() -> str:
  return f'{socket.gethostname()}:{os.getpid()}'


def process_is_gone(owner: str) -> bool:
  """Whether `owner` ('host:pid') names a process of this host that no longer runs."""
  host, _, pid = owner.rpartition(':')
  if host != socket.gethostname() or not pid.isdigit():
    return False
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # it runs, as another user
    return False
  return False


def create_exclusive(path: epath.Path, content: str) -> bool:
  """Creates `path` with `content` unless it exists; True if this call created it."""
  text = os.fspath(path)
  if '://' not in text:
    try:
      handle = os.open(text, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(handle, 'w') as f:
      f.write(content)
    return True
  if text.startswith('gs://'):  # the object store's own precondition: create if absent
    from google.api_core import exceptions
    from google.cloud import storage

    bucket, _, name = text[len('gs://') :].partition('/')
    blob = storage.Client().bucket(bucket).blob(name)
    try:
      blob.upload_from_string(content, if_generation_match=0)
    except exceptions.PreconditionFailed:
      return False
    return True
  raise ValueError(f'{path}: claims need a local, NFS or gs:// directory')


class Claims:
  """Claims under `directory`; `stale_after` seconds without a heartbeat frees a claim."""

  def __init__(self, directory: epath.Path, stale_after: float, owner: str | None = None):
    self.directory, self.stale_after = directory, stale_after
    self.owner = owner or owner_name()

  def path(self, name: str) -> epath.Path:
    return self.directory / f'{name}.claim'

  def holder(self, name: str) -> dict | None:
    """{'owner', 'age'} of a live claim on `name`; None if there is none, or it is stale: no
    heartbeat for `stale_after` seconds, or its owner was a process of this host that is gone."""
    path = self.path(name)
    try:
      age = time.time() - modified_time(path)
      owner = json.loads(path.read_text() or '{}').get('owner', '?')
    except (FileNotFoundError, json.JSONDecodeError):
      return None
    if age > self.stale_after or process_is_gone(owner):
      return None
    return {'owner': owner, 'age': age}

  def try_claim(self, name: str) -> bool:
    """Claims `name`; a stale claim is taken over (renamed aside first, so only one builder can)."""
    path = self.path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    content = json.dumps({'owner': self.owner, 'since': time.time()})
    if create_exclusive(path, content):
      return True
    if self.holder(name) is not None:
      return False
    aside = path.parent / f'.{path.name}.stale.{uuid.uuid4().hex}'
    try:
      path.rename(aside)
    except FileNotFoundError:  # another builder took it over (or it was just released)
      return create_exclusive(path, content)
    aside.unlink(missing_ok=True)
    logging.warning('took over the stale claim %s', path)
    return create_exclusive(path, content)

  def release(self, name: str) -> None:
    self.path(name).unlink(missing_ok=True)

  @contextlib.contextmanager
  def held(self, name: str):
    """Keeps a claim this builder holds fresh while the block runs, and releases it after."""
    stop = threading.Event()

    def beat():
      while not stop.wait(min(HEARTBEAT_SECONDS, self.stale_after / 4)):
        with contextlib.suppress(OSError):
          touch(self.path(name))

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      self.release(name)


def modified_time(path: epath.Path) -> float:
  text = os.fspath(path)
  return os.stat(text).st_mtime if '://' not in text else path.stat().mtime


def touch(path: epath.Path) -> None:
  text = os.fspath(path)
  if '://' not in text:
    os.utime(text)
  else:
    path.write_text(path.read_text())


def run_once(claims: Claims, name: str, is_done, work, poll_seconds: float = 2.0) -> None:
  """Runs `work()` under the claim `name` unless `is_done()`; while another builder holds the
  claim, polls until it is done (or its claim goes stale and this builder takes the work over)."""
  last_log = time.monotonic()
  while not is_done():
    if claims.try_claim(name):
      with claims.held(name):
        if not is_done():
          work()
      return
    if time.monotonic() - last_log >= 60.0:
      holder = claims.holder(name) or {'owner': '?', 'age': 0.0}
      logging.info('waiting for %s, held by %s for %.0f s', name, holder['owner'], holder['age'])
      last_log = time.monotonic()
    time.sleep(poll_seconds)
