"""The store's records and files in tfds's format, and random access to them with few open files.

A record is a tfds example (`tfds.features.FeaturesDict`, tensors as raw bytes) in ArrayRecord
shard files named as tfds names them, and the store carries tfds metadata (dataset_info.json,
features.json with the split and shard lengths), so `tfds.data_source('agrepa_features',
data_dir=<store>)` or `tfds.builder_from_directory(<store>/agrepa_features/<version>)` opens it
without TensorFlow. bfloat16 arrays (`mel`, `teacher_frames`) are stored as their uint16 bit
patterns (tfds names no bfloat16 without TensorFlow); `decode` views them as bfloat16 again.
"""

import collections
import os
import threading

import ml_dtypes
import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from etils import epath

DATASET = 'agrepa_features'
VERSION = '4.0.0'
TEMPLATE = '{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_INDEX}'
BFLOAT16_KEYS = ('mel', 'teacher_frames')
TEXT_KEYS = ('id', 'path', 'text')
MAX_OPEN_SHARDS = 64  # per process (and per grain worker): far below a 1 024 open-file limit


def features_dict(settings: dict, domains) -> tfds.features.FeaturesDict:
  """The record of a store with these settings (prepare.store_settings)."""
  tensor = lambda shape, dtype: tfds.features.Tensor(shape=shape, dtype=dtype, encoding='bytes')
  features = {
    'id': tfds.features.Text(),
    'path': tfds.features.Text(),
    'text': tfds.features.Text(),
    'labels': tfds.features.Sequence(tfds.features.Text()),
    'domain': tfds.features.ClassLabel(names=list(domains)),
    'num_samples': np.int64,  # 24 kHz samples of the stored audio
    'mel': tensor((None, settings.get('n_mels', 100)), np.uint16),  # bfloat16 bits
    'teacher': tensor((None,), np.float32),  # the own domain's utterance target
    'tokens': tensor((settings['num_codebooks'], None), np.int32),
  }
  if settings.get('teacher_frames'):
    features['teacher_frames'] = tensor((None, None), np.uint16)  # bfloat16 bits
  if settings.get('teacher_audio'):
    features['audio'] = tensor((None,), np.int16)  # PCM at the own teacher's rate
  return tfds.features.FeaturesDict(features)


def encode(features: tfds.features.FeaturesDict, record: dict) -> bytes:
  example = dict(record)
  for key in BFLOAT16_KEYS:
    if key in example:
      example[key] = np.asarray(example[key], ml_dtypes.bfloat16).view(np.uint16)
  example['labels'] = list(example.get('labels', ()))
  return features.serialize_example(example)


def decode(features: tfds.features.FeaturesDict, data: bytes) -> dict:
  record = features.deserialize_example_np(data)
  for key in BFLOAT16_KEYS:
    if key in record:
      record[key] = record[key].view(ml_dtypes.bfloat16)
  for key in TEXT_KEYS:
    record[key] = record[key].decode()
  record['labels'] = [label.decode() for label in record['labels']]
  return record


def dataset_dir(store: epath.Path) -> epath.Path:
  return store / DATASET / VERSION


def shard_path(store: epath.Path, split: str, index: int) -> epath.Path:
  name = TEMPLATE.format(
    DATASET=DATASET, SPLIT=split, FILEFORMAT='array_record', SHARD_INDEX=f'{index:05d}'
  )
  return dataset_dir(store) / name


def write_tfds_metadata(store: epath.Path, features, shard_lengths: dict) -> None:
  """dataset_info.json and features.json of the store: splits {split: [records per shard]}."""
  template = tfds.core.ShardedFileTemplate(
    data_dir=dataset_dir(store),
    template=TEMPLATE,
    dataset_name=DATASET,
    filetype_suffix='array_record',
  )
  split_infos = [
    tfds.core.SplitInfo(
      name=split, shard_lengths=[int(n) for n in lengths], num_bytes=0, filename_template=template
    )
    for split, lengths in shard_lengths.items()
    if len(lengths)  # a split without shards (no held-out clips) is not a tfds split
  ]
  tfds.folder_dataset.write_metadata(
    data_dir=dataset_dir(store),
    features=features,
    split_infos=split_infos,
    filename_template=TEMPLATE,
    description='AG-REPA feature store: per clip log-mel, teacher targets and tokens',
    check_data=False,  # its check reads through tf.data
  )


def write_shard_file(local_path: str, encoded: list[bytes]) -> None:
  writer = array_record_module.ArrayRecordWriter(local_path, 'group_size:1')
  for record in encoded:
    writer.write(record)
  writer.close()


class ShardError(RuntimeError):
  """A store shard that cannot be read; the message names the file and the record."""


class ShardedRecords:
  """A grain random-access source of the encoded records of shard files with `lengths` records
  each: record i of the concatenation. At most `max_open` files are open at once (least recently
  used closed first), whatever the number of shards; picklable for grain worker processes."""

  def __init__(self, paths: list[str], lengths, max_open: int = MAX_OPEN_SHARDS):
    self.paths = list(paths)
    self.starts = np.concatenate([[0], np.cumsum(np.asarray(lengths, np.int64))])
    self.max_open = max_open
    self._readers = collections.OrderedDict()
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return int(self.starts[-1])

  def locate(self, index: int) -> tuple[int, int]:
    """(shard, record within it) of record `index`."""
    if not 0 <= index < len(self):
      raise IndexError(f'record {index} of {len(self)}')
    shard = int(np.searchsorted(self.starts, index, 'right')) - 1
    return shard, int(index - self.starts[shard])

  def reader(self, shard: int):
    with self._lock:
      reader = self._readers.pop(shard, None)
      if reader is None:
        reader = array_record_module.ArrayRecordReader(self.paths[shard], 'readahead_buffer_size:0')
      self._readers[shard] = reader
      while len(self._readers) > self.max_open:
        self._readers.popitem(last=False)  # closed when no reading thread holds it any more
      return reader

  def __getitem__(self, index) -> bytes:
    shard, position = self.locate(int(index))
    try:
      return self.reader(shard).read([position])[0]
    except Exception as e:  # array_record raises RuntimeError or OSError with no file name
      raise ShardError(f'{self.paths[shard]}: record {position}: {e}') from e

  def open_files(self) -> int:
    return len(self._readers)

  def __getstate__(self):
    return {'paths': self.paths, 'starts': self.starts, 'max_open': self.max_open}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._readers, self._lock = collections.OrderedDict(), threading.Lock()


def file_checksum(path: epath.Path) -> str:
  """crc32 of a file's bytes, read in 16 MiB pieces."""
  import zlib

  crc = 0
  with path.open('rb') as f:
    while chunk := f.read(16 * 2**20):
      crc = zlib.crc32(chunk, crc)
  return f'{crc:08x}'


def local_or_none(path: epath.Path) -> str | None:
  text = os.fspath(path)
  return None if '://' in text else text
