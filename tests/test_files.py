"""A workdir in an object store (gs://) works like a local one: no file lands on the local disk,
nothing relies on appending to an object, and the run's records read back the same."""

import json
import os

import matplotlib
import numpy as np
import pytest
import soundfile as sf
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from ml_collections import ConfigDict
from tensorboardX import record_writer

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from agrepa_jax import audio, checkpoint, console, files, metrics, workdir  # noqa: E402
from agrepa_jax.generation import evaluate  # noqa: E402


class FakeBucketBackend(epath_backend.Backend):
  """gs://<path> stored under a local root; like an object store, it cannot append."""

  def __init__(self, root):
    self.root = root
    self.disk = epath_backend.os_backend

  def _local(self, path) -> str:
    text = os.fspath(path)
    assert text.startswith('gs://'), text
    return os.path.join(self.root, text.removeprefix('gs://'))

  def open(self, path, mode):
    if 'a' in mode:
      raise NotImplementedError(f'object stores cannot append ({path})')
    if 'w' in mode:
      os.makedirs(os.path.dirname(self._local(path)), exist_ok=True)
    return self.disk.open(self._local(path), mode)

  def exists(self, path):
    return self.disk.exists(self._local(path))

  def isdir(self, path):
    return self.disk.isdir(self._local(path))

  def listdir(self, path):
    return self.disk.listdir(self._local(path))

  def glob(self, path):
    return ['gs://' + os.path.relpath(p, self.root) for p in self.disk.glob(self._local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    raise NotImplementedError

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return self.disk.makedirs(self._local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return self.disk.mkdir(self._local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    return self.disk.rmtree(self._local(path))

  def remove(self, path):
    return self.disk.remove(self._local(path))

  def rename(self, path, dst):
    return self.disk.rename(self._local(path), self._local(dst))

  def replace(self, path, dst):
    return self.disk.replace(self._local(path), self._local(dst))

  def copy(self, path, dst, *, overwrite):
    return self.disk.copy(self._local(path), self._local(dst), overwrite=overwrite)

  def stat(self, path):
    return self.disk.stat(self._local(path))


class EventFilesThroughEpath:
  """A TensorBoard writer factory for the fake bucket (the real gs:// one needs GCS credentials):
  like tensorboardX's own, it rewrites the whole event file at each flush."""

  class File:
    def __init__(self, path):
      self.path, self.data, self.closed = epath.Path(path), b'', False

    def write(self, data):
      self.data += data

    def flush(self):
      if not self.closed:  # tensorboardX flushes again at exit, after the test's bucket is gone
        self.path.write_bytes(self.data)

    def close(self):
      self.flush()
      self.closed = True

  def directory_check(self, path):
    pass

  def open(self, path):
    return self.File(path)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """The local root of a fake gs://bucket; the test's working directory is an empty sibling."""
  root = tmp_path / 'store'
  root.mkdir()
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, 'gs', FakeBucketBackend(str(root)))
  monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, 'gs', EventFilesThroughEpath())
  yield root / 'bucket'
  assert not os.listdir(cwd), 'a gs:// path was written to the local disk'


def test_as_path_keeps_uris_and_makes_local_paths_absolute(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  assert os.fspath(files.as_path('gs://bucket/run')) == 'gs://bucket/run'
  assert os.fspath(files.as_path('run')) == str(tmp_path / 'run')
  assert os.fspath(files.as_path('~/run')) == str(tmp_path / 'home' / 'run')
  assert files.is_local(files.as_path('run')) and not files.is_local(epath.Path('gs://b/r'))


def test_metrics_and_plots_in_a_bucket_resume_like_local_ones(bucket):
  run = files.as_path('gs://bucket/run')
  writer = metrics.MetricWriter(run)
  for step, loss in ((10, 1.5), (20, 1.25), (30, 1.0)):
    writer.write(step, {'loss': loss})
  writer.close()
  # A resume from step 20 drops the row a dead run logged after its checkpoint.
  writer = metrics.MetricWriter(run, after_step=20)
  writer.write(30, {'loss': 0.75})
  writer.close()
  rows = [json.loads(line) for line in (bucket / 'run' / 'metrics.jsonl').read_text().splitlines()]
  assert rows == [{'step': 10, 'loss': 1.5}, {'step': 20, 'loss': 1.25}, {'step': 30, 'loss': 0.75}]
  assert list((bucket / 'run' / 'tensorboard').iterdir())

  metrics.plot_loss_curves(run / 'metrics.jsonl', run / 'loss_curves.png')
  assert (bucket / 'run' / 'loss_curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_the_lock_and_config_record_work_in_a_bucket(bucket, monkeypatch):
  monkeypatch.setattr(workdir.time, 'sleep', lambda seconds: None)  # the object-store race wait
  run = files.as_path('gs://bucket/run')
  config = ConfigDict({'model': {'width': 8}, 'lr': 1e-3})
  with workdir.exclusive(run):
    assert json.loads((bucket / 'run' / 'lock.json').read_text())['pid'] == os.getpid()
    workdir.record_config(config, run, workdir.check_config(config, run, None, False), False)
  assert not (bucket / 'run' / 'lock.json').exists()
  config.lr = 2e-3
  workdir.record_config(config, run, workdir.check_config(config, run, None, True), True)
  history = (bucket / 'run' / 'config_history.jsonl').read_text().splitlines()
  assert [json.loads(row)['changes'] for row in history] == [{}, {'lr': [1e-3, 2e-3]}]
  assert json.loads((bucket / 'run' / 'config.json').read_text())['lr'] == 2e-3


def test_figures_tables_and_wavs_are_written_through_epath(bucket):
  run = files.as_path('gs://bucket/run')
  figure = plt.figure()
  files.save_figure(figure, run / 'figure.png', dpi=50)
  plt.close(figure)
  files.write_csv(run / 'table.csv', ('a', 'b'), [{'a': 1, 'b': 2, 'c': 3}, (4, 5)])
  evaluate.plot_mels(run / 'mels.png', np.zeros((40, 100)), np.ones((40, 100)), 8, 30, 'clip')
  wave = np.sin(np.linspace(0, 100, 2400)).astype(np.float32) * 0.5
  (run / 'clip.wav').write_bytes(audio.wav_bytes(wave))

  assert (bucket / 'run' / 'table.csv').read_text().splitlines() == ['a,b', '1,2', '4,5']
  for name in ('figure.png', 'mels.png'):
    assert (bucket / 'run' / name).read_bytes()[:4] == b'\x89PNG'
  decoded, rate = sf.read(bucket / 'run' / 'clip.wav', dtype='float32')
  assert rate == audio.SAMPLE_RATE
  np.testing.assert_allclose(decoded, wave, atol=1 / 32768)


def test_logs_of_a_bucket_workdir_go_to_a_local_directory_named_after_it():
  local = console.log_directory('/runs/a')
  remote = console.log_directory('gs://bucket/runs/a')
  assert str(local) == '/runs/a/logs'
  assert remote.name == 'gs_bucket_runs_a' and '://' not in str(remote)


def test_the_checkpoint_directory_stays_in_the_bucket(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  assert (
    os.fspath(checkpoint.checkpoint_directory('gs://bucket/run')) == 'gs://bucket/run/checkpoints'
  )
  assert os.fspath(checkpoint.checkpoint_directory('run')) == str(tmp_path / 'run' / 'checkpoints')


def test_json_text_writes_undefined_scores_as_null_for_strict_readers():
  value = {'spearman': float('nan'), 'scores': (1.5, float('inf'), np.float64('-inf')), 'n': 3}
  text = files.json_text(value)
  reject = lambda constant: pytest.fail(f'{constant} is not JSON')
  assert json.loads(text, parse_constant=reject) == {
    'spearman': None,
    'scores': [1.5, None, None],
    'n': 3,
  }
