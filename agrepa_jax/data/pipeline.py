"""grain pipelines over a built cache: domain-balanced training batches and held-out batches."""

import json
import pathlib

import grain
import jax
import numpy as np

from agrepa_jax.data.cache import read_token_files


class CachedSplit:
  """Random-access source over one split of the cache; records are dicts of numpy arrays."""

  def __init__(
    self,
    directory: pathlib.Path,
    domains: tuple[str, ...],
    teacher_frames: bool,
    token_dir: str | None = None,
    vocab_size: int = 0,
  ):
    load = lambda name: np.load(directory / f'{name}.npy', mmap_mode='r')
    self.clips = json.loads((directory / 'clips.json').read_text())
    self.domains = domains
    self.arrays = {
      'mel': load('mel'),
      'num_samples': load('num_samples'),
      'domain': load('domain'),
      'tokens': load('tokens'),
    }
    if token_dir:
      tokens = self.arrays['tokens']
      self.arrays['tokens'] = read_token_files(
        token_dir, [c['id'] for c in self.clips], *tokens.shape[1:], vocab_size
      )
    self.teacher = {d: load(f'teacher_{d}') for d in domains}
    if teacher_frames and any(
      not (directory / f'teacher_frames_{d}.npy').exists() for d in domains
    ):
      raise FileNotFoundError(
        f'{directory}: no teacher frame features; rebuild with data.teacher_frames=True'
      )
    self.teacher_frames = (
      {d: load(f'teacher_frames_{d}') for d in domains} if teacher_frames else None
    )

  def __len__(self):
    return len(self.clips)

  def __getitem__(self, index):
    record = {k: np.asarray(v[index]) for k, v in self.arrays.items()}
    record['mel'] = record['mel'].astype(np.float32)
    record['teacher'] = {d: np.asarray(v[index]) for d, v in self.teacher.items()}
    if self.teacher_frames is not None:
      record['teacher_frames'] = {
        d: np.asarray(v[index], np.float32) for d, v in self.teacher_frames.items()
      }
    return record

  def indices_of_domain(self, d: int) -> np.ndarray:
    return np.flatnonzero(np.asarray(self.arrays['domain']) == d)


def host_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.device_count():
    raise ValueError(
      f'batch_size={global_batch_size} is not divisible by the {jax.device_count()} devices '
      'of the mesh'
    )
  return global_batch_size // jax.process_count()


def training_dataset(
  source: CachedSplit, global_batch_size: int, seed: int, domain_weights=None
) -> grain.IterDataset:
  """Infinite, deterministic, domain-balanced batches for this host.

  Each domain is reshuffled every epoch of its own; domains are mixed by `domain_weights`
  (default equal, the paper's 1:1 LibriSpeech:AudioSet sampler); hosts take interleaved slices of
  the mixed stream. Checkpoint the returned iterator's state to resume at the same position.
  """
  per_domain = []
  present = [d for d in range(len(source.domains)) if len(source.indices_of_domain(d))]
  for d in present:
    indices = source.indices_of_domain(d)
    per_domain.append(
      grain.MapDataset.source(indices).shuffle(seed=seed + d).repeat().map(source.__getitem__)
    )
  weights = None if domain_weights is None else [domain_weights[d] for d in present]
  mixed = per_domain[0] if len(per_domain) == 1 else grain.MapDataset.mix(per_domain, weights)
  mixed = mixed.slice(slice(jax.process_index(), None, jax.process_count()))
  return mixed.batch(host_batch_size(global_batch_size), drop_remainder=True).to_iter_dataset()


def evaluation_batches(
  source: CachedSplit, global_batch_size: int, max_batches: int | None = None
) -> list:
  """Fixed held-out batches for this host: the split in order, wrapped to fill the last batch."""
  per_host = host_batch_size(global_batch_size)
  num_batches = -(-len(source) // global_batch_size)
  if max_batches:
    num_batches = min(num_batches, max_batches)
  dataset = grain.MapDataset.source(np.arange(len(source))).repeat().map(source.__getitem__)
  dataset = dataset.slice(slice(jax.process_index(), None, jax.process_count())).batch(per_host)
  return [dataset[i] for i in range(num_batches)]
