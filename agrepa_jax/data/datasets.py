"""tfds datasets (ArrayRecord files) of the corpora: LibriSpeech, AudioSet and the embedded corpus.

Each builder turns a local listing (`sources.Listing`: per split, the clips in a fixed order) into a
tfds dataset whose examples hold the clip's encoded file bytes (`audio`, decoded later by the
feature store, so a bad file is caught and reported per clip there), its `id`, `path`, `text` and
the corpus's own fields. Building needs no TensorFlow; reading uses `tfds.data_source`-style
random access (`builder.as_data_source`). Example order is the listing's order (no shuffling), so
example i of a split is `listing.splits[split][i]`.

The data directory is keyed by a digest of the listing (paths, sizes, modification times), so an
added, removed or changed file gives a new dataset; the feature store then recomputes only the
shards whose clips changed.
"""

import itertools
import logging

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from agrepa_jax.data import sources

VERSION = '1.0.0'
BASE_FEATURES = {
  'id': tfds.features.Text(),
  'audio': tfds.features.Tensor(shape=(), dtype=np.object_),  # the encoded file's bytes
  'path': tfds.features.Text(),
  'text': tfds.features.Text(),
}
EXTRA_FEATURES = {
  'librispeech': {'speaker_id': np.int64, 'chapter_id': np.int64},
  'audioset': {
    'labels': tfds.features.Sequence(tfds.features.Text()),
    'label_ids': tfds.features.Sequence(tfds.features.Text()),
    'youtube_id': tfds.features.Text(),
    'start_seconds': np.float32,
  },
  'embedded': {'domain': tfds.features.Text()},
}


def read_bytes(path: str) -> bytes:
  """The file's bytes; b'' (reported later as an empty file) if it cannot be read."""
  try:
    return epath.Path(path).read_bytes()
  except OSError as e:
    logging.warning('cannot read %s: %s', path, e)
    return b''


class LocalAudio(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A tfds dataset of one listing; the subclass's name is the corpus (EXTRA_FEATURES)."""

  VERSION = tfds.core.Version(VERSION)
  url_infos = None  # nothing is downloaded (and no checksum file is looked for)

  def __init__(self, *, listing: sources.Listing, **kwargs):
    self.listing = listing
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    features = {**BASE_FEATURES, **EXTRA_FEATURES[self.listing.corpus]}
    return tfds.core.DatasetInfo(
      builder=self,
      description=f'{self.listing.corpus} clips read from {self.listing.root}',
      features=tfds.features.FeaturesDict(features),
      metadata=tfds.core.MetadataDict(missing=self.listing.missing, root=str(self.listing.root)),
      disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager
    return {
      split: self._generate_examples(entries) for split, entries in self.listing.splits.items()
    }

  def _generate_examples(self, entries):
    for archive, group in itertools.groupby(entries, key=lambda e: e.archive):
      if archive:
        yield from archive_examples(epath.Path(archive), list(group))
      else:
        for entry in group:
          yield entry.id, {**entry.fields, 'audio': read_bytes(entry.path)}


def archive_examples(archive: epath.Path, entries: list):
  """The examples of `entries`, members of `archive` in archive order, from one pass over it."""
  pending = iter(entries)
  entry = next(pending, None)
  for name, read in sources.archive_members(archive):
    if entry is not None and name == entry.member:
      yield entry.id, {**entry.fields, 'audio': read()}
      entry = next(pending, None)
  unread = [entry, *pending] if entry is not None else []
  for missing in unread:  # the archive changed since it was listed; the store reports them empty
    logging.warning('%s no longer holds %s', archive, missing.member)
    yield missing.id, {**missing.fields, 'audio': b''}


class Librispeech(LocalAudio, skip_registration=True):
  """LibriSpeech: splits train_clean_100, train_clean_360, train_other_500, dev_*, test_*."""


class Audioset(LocalAudio, skip_registration=True):
  """AudioSet: splits balanced_train, unbalanced_train, eval; clips missing on disk are counted."""


class Embedded(LocalAudio, skip_registration=True):
  """The generated corpus (eSpeak NG speech and procedural sound events): split train."""


BUILDERS = {'librispeech': Librispeech, 'audioset': Audioset, 'embedded': Embedded}


def data_dir(cache_root: epath.Path, listing: sources.Listing) -> epath.Path:
  return cache_root / 'tfds' / listing.name


def build(listing: sources.Listing, cache_root: epath.Path) -> LocalAudio:
  """The tfds dataset of `listing` under `cache_root`, built if it is not there yet.

  Call it on one process and open the result elsewhere with `open_built`.
  """
  builder = open_built(listing, cache_root)
  builder.download_and_prepare(
    download_config=tfds.download.DownloadConfig(verify_ssl=False, try_download_gcs=False)
  )
  return builder


def open_built(listing: sources.Listing, cache_root: epath.Path) -> LocalAudio:
  return BUILDERS[listing.corpus](
    listing=listing, data_dir=str(data_dir(cache_root, listing)), file_format='array_record'
  )
