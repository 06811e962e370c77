"""The store's pieces at their own level: content-defined shards, claims between builders, and a
reader whose open files stay bounded whatever the number of shards."""

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from etils import epath

from agrepa_jax.data import claims, plan, sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def listing(key: str, ids: list[str], roles=None):
  unit = sources.Unit('speech', 'librispeech', '/r', archive=key)
  columns = {c: [] for c in sources.COLUMNS}
  columns['id'] = list(ids)
  columns['split'] = list(roles or ['train'] * len(ids))
  columns['size'] = columns['mtime'] = [0] * len(ids)
  return sources.UnitListing(unit, columns, [])


def shard_ids(shards, listings):
  by_key = {x.unit.key: x for x in listings}
  return [
    [by_key[u].columns['id'][i] for u, a, b in s.segments for i in range(a, b)] for s in shards
  ]


def test_an_inserted_run_of_clips_changes_one_shard_plus_one_per_cut_it_brings():
  ids = [f'speech/{i:05d}' for i in range(2000)]
  before, _ = plan.plan_shards([listing('a.tar', ids)], ('train',), 16, {})
  assert 2000 / 16 * 0.8 < len(before['train']) < 2000 / 16 * 1.2  # shard_clips on average
  inserted = [f'speech/new-{i}' for i in range(10)]
  previous = {'train': {s.key: s.index for s in before['train']}}
  after, counts = plan.plan_shards(
    [listing('a.tar', ids[:700] + inserted + ids[700:])], ('train',), 16, previous
  )
  old = {tuple(x) for x in shard_ids(before['train'], [listing('a.tar', ids)])}
  new = shard_ids(after['train'], [listing('a.tar', ids[:700] + inserted + ids[700:])])
  changed = [x for x in new if tuple(x) not in old]
  cuts = sum(plan.cut_hash(i) % 16 == 0 for i in inserted)
  assert len(changed) == 1 + cuts
  # unchanged shards keep their tfds index; the new ones take the next free indices
  kept = {
    s.key: s.index
    for s in after['train']
    if tuple(shard_ids([s], [listing('a.tar', ids[:700] + inserted + ids[700:])])[0]) in old
  }
  assert all(previous['train'][k] == i for k, i in kept.items())
  assert counts['train'] == len(before['train']) + cuts


def test_removed_shards_free_their_indices_for_new_ones():
  assert plan.assign_indices([('a',), ('c',), ('x',)], {'a': 0, 'b': 1, 'c': 2}) == [0, 2, 1]
  assert plan.assign_indices([('a',), ('x',), ('y',)], {'a': 0}) == [0, 1, 2]


def test_splits_are_cut_separately_and_segments_skip_the_other_split():
  ids = [f'speech/{i}' for i in range(6)]
  roles = ['train', 'heldout', 'train', 'train', 'heldout', 'train']
  shards, _ = plan.plan_shards([listing('u', ids, roles)], ('train', 'heldout'), 1000, {})
  assert [s.num_clips for s in shards['train']] == [4]
  assert [s.num_clips for s in shards['heldout']] == [2]


def test_task_slices_are_contiguous_balanced_and_cover_every_shard():
  shards = [plan.Shard('train', i, str(i), [], n) for i, n in enumerate([5, 1, 9, 3, 3, 7, 2, 2])]
  slices = [plan.task_slice(shards, t, 3) for t in range(3)]
  assert [s.index for part in slices for s in part] == list(range(8))
  assert all(abs(sum(s.num_clips for s in part) - 32 / 3) <= 9 for part in slices)
  assert plan.task_slice(shards, 0, 1) == shards


def test_a_claim_is_exclusive_until_released_or_stale(tmp_path):
  directory = epath.Path(tmp_path)
  first = claims.Claims(directory, stale_after=60.0, owner='a')
  second = claims.Claims(directory, stale_after=60.0, owner='b')
  assert first.try_claim('shard-1') and not second.try_claim('shard-1')
  assert second.holder('shard-1')['owner'] == 'a'
  first.release('shard-1')
  assert second.try_claim('shard-1')
  old = time.time() - 120  # b died: its heartbeat stopped two minutes ago
  os.utime(second.path('shard-1'), (old, old))
  assert first.holder('shard-1') is None and first.try_claim('shard-1')
  assert oct(os.stat(first.path('shard-1')).st_mode & 0o777) == '0o644'
  # a builder of this host killed with -9: its claim is free at once, not after stale_after
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  gone = claims.Claims(
    directory, stale_after=600.0, owner=f'{claims.socket.gethostname()}:{dead.pid}'
  )
  assert (
    gone.try_claim('shard-2') and first.holder('shard-2') is None and first.try_claim('shard-2')
  )


def test_a_held_claim_keeps_its_heartbeat_and_others_wait_for_the_work(tmp_path, monkeypatch):
  monkeypatch.setattr(claims, 'HEARTBEAT_SECONDS', 0.05)
  directory = epath.Path(tmp_path)
  done = threading.Event()
  holder = claims.Claims(directory, stale_after=0.4, owner='a')
  assert holder.try_claim('tokenizer')

  def work():
    with holder.held('tokenizer'):
      time.sleep(1.0)  # longer than stale_after: only the heartbeat keeps the claim
      done.set()

  thread = threading.Thread(target=work)
  thread.start()
  ran = []
  waiter = claims.Claims(directory, stale_after=0.4, owner='b')
  claims.run_once(waiter, 'tokenizer', done.is_set, lambda: ran.append(1), poll_seconds=0.05)
  thread.join()
  assert done.is_set() and not ran and not holder.path('tokenizer').exists()


READER = """
import resource, sys, os, numpy as np
sys.path.insert(0, {repo!r})
from agrepa_jax.data import records
print('limit', resource.getrlimit(resource.RLIMIT_NOFILE)[0], flush=True)
paths = sys.argv[1:]
source = records.ShardedRecords(paths, [2] * len(paths), max_open=64)
rng = np.random.default_rng(0)
most = 0
for i in rng.integers(0, len(source), 2000):
  assert source[i] == b'%d-%d' % divmod(int(i), 2)
  most = max(most, len(os.listdir('/proc/self/fd')))
print('most open', most)
"""


@pytest.mark.skipif(not os.path.isdir('/proc/self/fd'), reason='counts open files in /proc')
def test_the_reader_keeps_few_files_open_under_ulimit_128(tmp_path):
  from agrepa_jax.data import records

  paths = []
  for shard in range(300):  # more shards than the process may open
    path = str(tmp_path / f'shard-{shard:05d}')
    records.write_shard_file(path, [b'%d-%d' % (shard, r) for r in range(2)])
    paths.append(path)
  script = READER.format(repo=REPO)
  out = subprocess.run(
    ['bash', '-c', 'ulimit -n 128 && exec "$0" -c "$1" "${@:2}"', sys.executable, script, *paths],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr
  lines = dict(line.rsplit(' ', 1) for line in out.stdout.splitlines())
  assert lines['limit'] == '128' and int(lines['most open']) <= 100


def test_shard_files_named_as_tfds_names_them():
  from agrepa_jax.data import records

  path = records.shard_path(epath.Path('/s'), 'train', 7)
  assert str(path) == '/s/agrepa_features/4.0.0/agrepa_features-train.array_record-00007'
  assert np.isclose(plan.cut_hash('speech/x') % 1, 0)


def test_a_store_without_held_out_clips_opens_and_reads(tmp_path):
  from agrepa_jax.data import index, pipeline, records

  settings = {'num_codebooks': 1}
  rows = [
    {
      'id': f'speech/{i}',
      'path': '',
      'text': 'x',
      'labels': [],
      'domain': np.int32(0),
      'num_samples': np.int64(2400),
      'mel': np.full((10, 100), i, np.float32),
      'teacher': np.ones(3, np.float32),
      'tokens': np.zeros((1, 2), np.int32),
    }
    for i in range(5)
  ]
  directory = epath.Path(tmp_path)
  manifest = index.import_records(directory, settings, ('speech',), {'train': rows}, 2)
  assert (
    manifest['num_clips'] == {'train': 5, 'heldout': 0} and manifest['num_shards']['train'] == 3
  )
  heldout = pipeline.FeatureSplit(directory, 'heldout', None, ('speech',))
  train = pipeline.FeatureSplit(directory, 'train', None, ('speech',))
  assert len(heldout) == 0 and [float(train.record(i)['mel'][0, 0]) for i in range(5)] == [
    0,
    1,
    2,
    3,
    4,
  ]
  assert train.record(4)['mel'].dtype == records.ml_dtypes.bfloat16
