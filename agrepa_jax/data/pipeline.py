"""grain over the feature store: fixed-length crops, domain-balanced training batches, held-out
batches.

The training stream is a function of the global step alone: position p of an infinite,
domain-mixed, per-domain reshuffled sequence of records is the same on every host count, global
batch s holds positions [s·B, (s+1)·B), and host h of P reads its slice of it. The data position
to checkpoint is therefore just the step (or records consumed = step·B), so a run saved on N hosts
resumes on M hosts.
"""

import functools
import json
import sys

import grain
import jax
import ml_dtypes
import numpy as np
from etils import epath

from agrepa_jax import audio
from agrepa_jax.data import DataError, records
from agrepa_jax.data.spec import BatchSpec

SILENCE = float(audio.normalize(np.log(audio.LOG_FLOOR)))  # the normalized mel of silence


class FeatureSplit:
  """Random access to one split of the store; `split[i]` is clip i cropped from its start.

  Opening reads the store's compact index only (records per shard, each record's domain and
  length): nothing per clip or per shard, and shard files are opened as records are read, at
  most records.MAX_OPEN_SHARDS at a time. Also offers what probe, sample and eval read: `clips`
  (id, path, text, labels, domain per record, from the shard sidecars on first use),
  `arrays['domain']` and `indices_of_domain`.
  """

  def __init__(self, directory: epath.Path, split: str, spec: BatchSpec, domains: tuple[str, ...]):
    self.directory, self.split, self.spec, self.domains = directory, split, spec, domains
    manifest = json.loads((directory / 'manifest.json').read_text())
    self.settings = manifest['settings']
    with (directory / 'index.npz').open('rb') as f, np.load(f) as index:
      lengths = index[f'{split}/shard_lengths']
      self.arrays = {
        'domain': index[f'{split}/domain'].astype(np.int32),
        'num_samples': index[f'{split}/num_samples'],
      }
    self.shard_lengths = lengths
    paths = [str(records.shard_path(directory, split, i)) for i in range(len(lengths))]
    self.source = records.ShardedRecords(paths, lengths)
    self._clips = None

  @functools.cached_property
  def codec(self):
    return records.features_dict(self.settings, self.domains)

  def __getstate__(self):  # grain worker processes rebuild the codec
    return {k: v for k, v in self.__dict__.items() if k != 'codec'}

  def __len__(self):
    return len(self.arrays['domain'])

  def record(self, index: int) -> dict:
    """The stored record of clip `index` (native length)."""
    return records.decode(self.codec, self.source[int(index)])

  def __getitem__(self, index) -> dict:
    """Clip `index` as a batch row cropped from its start, mel in float32 (for probe and eval)."""
    row = crop_record(self.record(index), self.spec, self.domains, start_token=0)
    return {**row, 'mel': row['mel'].astype(np.float32)}

  @property
  def clips(self) -> list[dict]:
    """{'id', 'path', 'text', 'labels', 'domain'} of every record, read from the shard sidecars
    on first use."""
    if self._clips is None:
      self._clips = []
      for index, length in enumerate(self.shard_lengths):
        if not length:
          continue
        sidecar = json.loads(
          (self.directory / 'shards' / f'{self.split}-{index:05d}.json').read_text()
        )
        self._clips += [
          {'id': i, 'path': p, 'text': t, 'labels': labels, 'domain': self.domains[d]}
          for i, p, t, labels, d in zip(
            sidecar['ids'],
            sidecar['paths'],
            sidecar['texts'],
            sidecar['labels'],
            sidecar['domain'],
            strict=True,
          )
        ]
    return self._clips

  def indices_of_domain(self, d: int) -> np.ndarray:
    return np.flatnonzero(self.arrays['domain'] == d)


def fit_rows(x: np.ndarray, rows: int, fill: float = 0) -> np.ndarray:
  """Crops or pads the first axis of x to `rows` rows (padding with `fill`)."""
  x = x[:rows]
  if len(x) == rows:
    return x
  return np.concatenate([x, np.full((rows - len(x), *x.shape[1:]), fill, x.dtype)])


def crop_record(record: dict, spec: BatchSpec, domains, start_token: int) -> dict:
  """One batch row of `spec` from a stored record, starting `start_token` tokens in.

  The crop starts on the token grid (time start_token / token_rate), so the mel frames, teacher
  frames, tokens and (online teachers) audio it keeps cover the same audio; past the clip's end
  mel is silence, tokens, teacher frames and audio are zero, and num_samples counts only the audio
  inside the crop.
  """
  start_seconds = start_token / spec.token_rate
  start_frame = round(start_seconds * audio.SAMPLE_RATE / audio.HOP_LENGTH)
  start_sample = round(start_seconds * audio.SAMPLE_RATE)
  own = domains[int(record['domain'])]
  mel = np.asarray(record['mel'], ml_dtypes.bfloat16)[start_frame:]
  tokens = np.asarray(record['tokens'], np.int32)[:, start_token:]
  out = {
    'mel': fit_rows(mel, spec.num_frames, SILENCE),
    'num_samples': np.int32(
      np.clip(int(record['num_samples']) - start_sample, 0, spec.num_samples)
    ),
    'domain': np.int32(record['domain']),
    'tokens': fit_rows(tokens.T, spec.num_tokens).T,
    'teacher': {
      d: np.asarray(record['teacher'], np.float32)
      if d == own
      else np.zeros(spec.teacher_dims[d], np.float32)
      for d in domains
    },
  }
  if spec.teacher_frames is not None:
    if 'teacher_frames' not in record:
      raise DataError(
        'the feature store holds no teacher frames; rebuild with data.teacher_frames=True'
      )
    rows, width = spec.packed_frames
    first = round(start_seconds * spec.teacher_rates[own])
    own_frames = np.asarray(record['teacher_frames'])[first : first + spec.teacher_frames[own]]
    packed = np.zeros((rows, width), ml_dtypes.bfloat16)
    packed[: len(own_frames), : own_frames.shape[-1]] = own_frames
    out['teacher_frames'] = packed
  if spec.audio_rates is not None:
    if 'audio' not in record:
      raise DataError('the feature store holds no audio; rebuild it with teachers.online=True')
    first = round(start_seconds * spec.audio_rates[own])
    wave = np.asarray(record['audio'], np.int16)[first : first + spec.audio_samples(own)]
    out['audio'] = fit_rows(wave, spec.audio_length)
  return out


def random_start_token(num_samples: int, spec: BatchSpec, rng: np.random.Generator) -> int:
  """A uniform crop start on the token grid that keeps the crop inside the clip where possible."""
  extra_seconds = (num_samples - spec.num_samples) / audio.SAMPLE_RATE
  last = int(np.floor(max(extra_seconds, 0.0) * spec.token_rate))
  return int(rng.integers(0, last + 1))


def to_row(record: dict, source: FeatureSplit, crop: str, rng: np.random.Generator) -> dict:
  if crop == 'random':
    start = random_start_token(int(record['num_samples']), source.spec, rng)
  elif crop == 'start':
    start = 0
  else:
    raise DataError(f"data.crop={crop!r}: expected 'random' or 'start'")
  return crop_record(record, source.spec, source.domains, start)


def host_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.device_count():
    raise DataError(
      f'batch_size={global_batch_size} is not divisible by the {jax.device_count()} devices '
      'of the mesh'
    )
  return global_batch_size // jax.process_count()


class PeriodicMix:
  """Position p of the stream -> a record index of domain layout[p % K]: that domain's
  (p // K · k_d + j)-th, where the slot is its j-th of k_d in the period."""

  def __init__(self, per_domain: dict, layout: tuple[int, ...]):
    self.per_domain, self.layout = per_domain, layout
    self.counts = {d: layout.count(d) for d in set(layout)}
    self.slot = [layout[:i].count(d) for i, d in enumerate(layout)]

  def __call__(self, position: int) -> int:
    period, i = divmod(int(position), len(self.layout))
    d = self.layout[i]
    return self.per_domain[d][period * self.counts[d] + self.slot[i]]


def mixed_records(source, seed: int, domain_weights=None, layout=None) -> grain.MapDataset:
  """The infinite global record stream: each domain reshuffled every epoch of its own, domains
  mixed by `domain_weights` (default equal: the paper's 1:1 LibriSpeech:AudioSet sampler), or, given
  a `layout` (online teachers, spec.domain_layout), position p from domain layout[p % K]."""
  present = [d for d in range(len(source.domains)) if len(source.indices_of_domain(d))]
  shuffled = {
    d: grain.MapDataset.source(source.indices_of_domain(d)).shuffle(seed=seed + d).repeat()
    for d in present
  }
  if layout:
    missing = sorted({source.domains[d] for d in layout} - {source.domains[d] for d in present})
    if missing:
      raise DataError(
        f'no training clips of domain(s) {missing}, which data.domain_weights asks for'
      )
    return grain.MapDataset.range(0, sys.maxsize).map(PeriodicMix(shuffled, tuple(layout)))
  per_domain = list(shuffled.values())
  weights = None if domain_weights is None else [domain_weights[d] for d in present]
  return per_domain[0] if len(per_domain) == 1 else grain.MapDataset.mix(per_domain, weights)


def training_dataset(
  source,
  global_batch_size: int,
  seed: int,
  domain_weights=None,
  start_step: int = 0,
  crop: str = 'random',
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.IterDataset:
  """This host's training batches from global step `start_step` on.

  crop: random (a uniform crop start per clip and epoch, drawn from the record's global position)
  or start (every crop from the clip's start). num_workers > 0 reads in that many worker processes
  with small bounded buffers. process_index/count default to jax's (tests simulate hosts).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  per_host = global_batch_size // count
  layout = getattr(source.spec, 'layout', None)  # online teachers: a fixed domain per row
  records = mixed_records(source, seed, domain_weights, layout).map(source.record)
  if source.spec is not None:  # stored records -> batch rows of the spec
    records = records.random_map(lambda r, rng: to_row(r, source, crop, rng), seed=seed)
  batches = records.batch(per_host, drop_remainder=True)
  batches = batches.slice(slice(start_step * count + index, None, count))
  dataset = batches.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
  if num_workers:
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=1)
    )
  return dataset


def evaluation_batches(
  source: FeatureSplit, global_batch_size: int, max_batches: int | None = None
) -> list:
  """Fixed held-out batches for this host: the split in order, wrapped to fill the last batch.

  Global batch b is records [b·B, (b+1)·B) in order, and host h reads the h-th contiguous part of
  it, so every row of a global batch holds the same record (and the eval step's per-row draws the
  same values) on any number of hosts.
  """
  if not len(source):
    return []
  per_host = host_batch_size(global_batch_size)
  num_batches = -(-len(source) // global_batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  batch_starts = np.arange(num_batches)[:, None] * global_batch_size
  rows = batch_starts + jax.process_index() * per_host + np.arange(per_host)[None, :]
  dataset = grain.MapDataset.source(rows.reshape(-1) % len(source)).map(source.__getitem__)
  batches = dataset.batch(per_host)
  return [batches[i] for i in range(num_batches)]
