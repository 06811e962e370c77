"""LibriSpeech read from its OpenSLR archives (<split>.tar.gz), without extracting them, gives the
same clips, transcripts and records as the extracted tree; members are read through a gzip seek
index, and a changed archive recomputes only the shards of its changed members."""

import tarfile

import numpy as np
import pytest
from etils import epath

from agrepa_jax.data import plan, prepare, sources, store
from tests.test_data import (
  FakeTeacher,
  corpus_config,
  rescan,
  write_audioset,
  write_librispeech,
  write_wave,
)

SPLITS = ('train-clean-100', 'dev-clean')


def write_archives(tree, directory):
  """<directory>/<split>.tar.gz of an extracted tree, members named LibriSpeech/<split>/... as in
  the OpenSLR downloads."""
  directory.mkdir(parents=True, exist_ok=True)
  for split in SPLITS:
    with tarfile.open(directory / f'{split}.tar.gz', 'w:gz') as tar:
      tar.add(tree / 'LibriSpeech' / split, arcname=f'LibriSpeech/{split}')


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  tree = tmp_path / 'extracted'
  write_librispeech(tree)
  write_archives(tree, tmp_path / 'archives')
  write_audioset(tmp_path / 'audioset')
  monkeypatch.setattr(
    prepare, 'load_teachers', lambda c: {d: FakeTeacher() for d in c.data.domains}
  )
  return tmp_path


def speech_listing(directory):
  splits = sources.Splits(('train_clean_100',), 'dev_clean', 0.0)
  units = sources.corpus_units('speech', 'librispeech', str(directory), splits)
  listings = [sources.list_unit(u, splits)[0] for u in units]
  return units, listings


def clip_fields(listings):
  return sorted(
    (clip_id, split, text)
    for listing in listings
    for clip_id, split, text in zip(
      listing.columns['id'], listing.columns['split'], listing.columns['text'], strict=True
    )
  )


def test_archives_list_the_same_clips_and_transcripts_as_the_tree(corpus):
  _, from_tree = speech_listing(corpus / 'extracted')
  units, from_archives = speech_listing(corpus / 'archives')
  assert [u.archive for u in units] == ['dev-clean.tar.gz', 'train-clean-100.tar.gz']
  assert clip_fields(from_archives) == clip_fields(from_tree)
  dev = from_archives[0].columns
  i = dev['id'].index('speech/84-198-0001')
  assert dev['path'][i] == 'LibriSpeech/dev-clean/84/198/84-198-0001.flac'
  assert dev['text'][i] == 'WORDS OF 84-198-0001'


def test_a_member_is_read_from_its_offset_through_the_seek_index(corpus):
  archive = epath.Path(corpus / 'archives' / 'train-clean-100.tar.gz')
  members, _, gzip_index = sources.scan_archive(archive)
  assert gzip_index  # an indexed_gzip export
  wanted = [m for m in members if m.name.endswith('26-198-0002.flac')][0]
  (data,) = sources.read_members(archive, gzip_index, [(wanted.offset_data, wanted.size)])
  assert data == (corpus / 'extracted' / wanted.name).read_bytes()


def test_an_archive_is_listed_once_while_its_size_and_mtime_hold(corpus, monkeypatch):
  config = corpus_config(corpus, **{'data.speech_dir': str(corpus / 'archives')})
  rescan(config)

  def unreadable(archive):
    raise AssertionError(f'{archive} read again')

  monkeypatch.setattr(sources, 'scan_archive', unreadable)
  assert rescan(config)['this_run']['computed'] == 0  # the folder buckets are listed again only


def test_a_damaged_archive_fails_with_its_name(corpus):
  archive = corpus / 'archives' / 'dev-clean.tar.gz'
  archive.write_bytes(archive.read_bytes()[:200])
  with pytest.raises(ValueError, match=r'dev-clean\.tar\.gz: cannot read the archive'):
    speech_listing(corpus / 'archives')


def test_the_store_of_the_archives_equals_the_one_of_the_tree(corpus):
  stores = {}
  for name in ('extracted', 'archives'):
    config = corpus_config(corpus, **{'data.speech_dir': str(corpus / name)})
    config.data.cache_dir = str(corpus / f'cache-{name}')
    report = prepare.build(config)
    stores[name] = report, prepare.prepare(config)[0]
  (tree, tree_split), (archives, archive_split) = stores['extracted'], stores['archives']
  assert archives['clips_per_domain'] == tree['clips_per_domain']
  assert archives['clips_per_domain']['train']['speech'] == 8  # 3 bad files skipped, as from files
  reasons = lambda report: sorted(s['reason'].split(': ')[-1] for s in report['skipped'])
  assert reasons(archives) == reasons(tree)
  records = lambda split: {split.clips[i]['id']: split.record(i) for i in range(len(split))}
  ours, theirs = records(archive_split), records(tree_split)
  assert sorted(ours) == sorted(theirs)
  for clip_id, record in ours.items():
    np.testing.assert_array_equal(record['mel'], theirs[clip_id]['mel'])
    assert record['text'] == theirs[clip_id]['text']
  # the originals that sample and eval play are read from the archive, member by member
  paths = [ours[i]['path'] for i in ('speech/26-198-0003', 'speech/19-198-0001')]
  first, second, missing = prepare.source_bytes(config, paths + [paths[0] + '.missing'])
  assert isinstance(missing, FileNotFoundError)  # it costs that clip only
  assert first == (corpus / 'extracted' / paths[0].split('.tar.gz/')[1]).read_bytes()
  assert second == (corpus / 'extracted' / paths[1].split('.tar.gz/')[1]).read_bytes()
  assert ours['speech/26-198-0003']['path'].endswith(
    'train-clean-100.tar.gz/LibriSpeech/train-clean-100/26/198/26-198-0003.flac'
  )


def test_utterances_added_to_an_archive_recompute_only_their_shards(corpus):
  config = corpus_config(corpus, **{'data.speech_dir': str(corpus / 'archives')})
  config.data.shard_clips = 2  # several shards per archive
  first = rescan(config)
  chapter = corpus / 'extracted' / 'LibriSpeech' / 'train-clean-100' / '19' / '777'
  chapter.mkdir()
  for u in range(3):  # a new chapter, as a new LibriSpeech release would add one
    write_wave(chapter / f'19-777-{u:04d}.flac', seconds=0.5, freq=210 + 30 * u)
  write_archives(corpus / 'extracted', corpus / 'archives')
  again = rescan(config)
  assert again['clips_per_domain']['train']['speech'] == 11
  # the new members are one run of the archive: they change the shard they fall in, plus one
  # shard for each that starts a shard itself (1 in shard_clips do: 1 in 256 by default)
  cuts = sum(plan.cut_hash(f'speech/19-777-{u:04d}') % 2 == 0 for u in range(3))
  assert again['this_run']['computed'] == 1 + cuts < first['this_run']['computed']
  assert not (prepare.store_directory(config) / 'claims').exists() or not list(
    (prepare.store_directory(config) / 'claims').iterdir()
  )


def test_two_builders_share_one_store(corpus, monkeypatch):
  """A task of two builds its slice; the second task finds the first's work, builds the rest and
  writes the index; nothing is computed twice and one tokenizer is fitted."""
  config = corpus_config(corpus, **{'data.speech_dir': str(corpus / 'archives')})
  fits = []
  fit = store.features.fit_tokenizer
  monkeypatch.setattr(
    store.features, 'fit_tokenizer', lambda *a, **k: fits.append(1) or fit(*a, **k)
  )
  first = prepare.build(config, store.BuildOptions(task=0, num_tasks=2))
  assert not first['complete']
  second = prepare.build(config, store.BuildOptions(task=1, num_tasks=2))
  assert second['complete'] and len(fits) == 2  # one per domain, fitted by the first task
  total = first['this_run']['computed'] + second['this_run']['computed']
  assert total == sum(second['num_shards'].values())
  assert prepare.build(config, store.BuildOptions())['this_run']['computed'] == 0
