"""LibriSpeech read from its OpenSLR archives (<split>.tar.gz), without extracting them, gives the
same clips, transcripts and bytes as the extracted tree."""

import tarfile

import pytest
from etils import epath

from agrepa_jax.data import datasets, prepare, sources
from tests.test_data import FakeTeacher, corpus_config, write_audioset, write_librispeech

SPLITS = ('train-clean-100', 'dev-clean')


def write_archives(tree, directory):
  """<directory>/<split>.tar.gz of an extracted tree, members named LibriSpeech/<split>/... as in
  the OpenSLR downloads."""
  directory.mkdir(parents=True, exist_ok=True)
  for split in SPLITS:
    with tarfile.open(directory / f'{split}.tar.gz', 'w:gz') as tar:
      tar.add(tree / 'LibriSpeech' / split, arcname=f'LibriSpeech/{split}')


@pytest.fixture
def corpus(tmp_path):
  tree = tmp_path / 'extracted'
  write_librispeech(tree)
  write_archives(tree, tmp_path / 'archives')
  return tmp_path


def clip_fields(listing):
  return {
    split: sorted((e.id, e.fields['text'], e.fields['speaker_id']) for e in entries)
    for split, entries in listing.splits.items()
  }


def test_archives_list_the_same_clips_and_transcripts_as_the_tree(corpus):
  from_tree = sources.librispeech_listing(str(corpus / 'extracted'))
  from_archives = sources.librispeech_listing(
    str(corpus / 'archives'), epath.Path(corpus / 'cache')
  )
  assert clip_fields(from_archives) == clip_fields(from_tree)
  assert sorted(from_archives.splits) == ['dev_clean', 'train_clean_100']
  entry = next(e for e in from_archives.splits['dev_clean'] if e.id == '84-198-0001')
  assert entry.fields['text'] == 'WORDS OF 84-198-0001' and entry.fields['chapter_id'] == 198
  assert entry.member == 'LibriSpeech/dev-clean/84/198/84-198-0001.flac'
  assert entry.path == f'{corpus / "archives" / "dev-clean.tar.gz"}/{entry.member}'


def test_an_archive_is_read_through_once_and_its_listing_kept(corpus, monkeypatch):
  cache = epath.Path(corpus / 'cache')
  first = sources.librispeech_listing(str(corpus / 'archives'), cache)

  def unreadable(archive):
    raise AssertionError(f'{archive} read again')

  monkeypatch.setattr(sources, 'archive_members', unreadable)
  again = sources.librispeech_listing(str(corpus / 'archives'), cache)
  assert again.digest == first.digest
  assert len(list((cache / 'archives').iterdir())) == len(SPLITS)


def test_the_tfds_dataset_of_the_archives_holds_each_files_bytes(corpus):
  listing = sources.librispeech_listing(str(corpus / 'archives'), epath.Path(corpus / 'cache'))
  builder = datasets.build(listing, epath.Path(corpus / 'cache'))
  for split, entries in listing.splits.items():
    source = builder.as_data_source(split)
    assert len(source) == len(entries)
    for i, entry in enumerate(entries):  # example i of a split is entry i of the listing
      example = source[i]
      tree_file = corpus / 'extracted' / entry.member
      assert example['id'] == entry.id.encode()
      assert example['audio'] == tree_file.read_bytes()


def test_a_damaged_archive_fails_with_its_name(corpus):
  archive = corpus / 'archives' / 'dev-clean.tar.gz'
  archive.write_bytes(archive.read_bytes()[:200])
  with pytest.raises(ValueError, match=r'dev-clean\.tar\.gz: cannot read the archive'):
    sources.librispeech_listing(str(corpus / 'archives'))


def test_the_feature_store_of_the_archives_equals_the_one_of_the_tree(corpus, monkeypatch):
  monkeypatch.setattr(
    prepare, 'load_teachers', lambda c: {d: FakeTeacher() for d in c.data.domains}
  )
  write_audioset(corpus / 'audioset')
  reports = {}
  for name in ('extracted', 'archives'):
    config = corpus_config(corpus, **{'data.speech_dir': str(corpus / name)})
    config.data.cache_dir = str(corpus / f'cache-{name}')
    reports[name] = prepare.build(config)
  tree, archives = reports['extracted'], reports['archives']
  assert archives['clips_per_domain'] == tree['clips_per_domain']
  assert archives['clips_per_domain']['train']['speech'] == 8  # 3 bad files skipped, as from files
  reasons = lambda report: sorted(s['reason'].split(': ')[-1] for s in report['skipped'])
  assert reasons(archives) == reasons(tree)
