"""Turns clips into the arrays training reads: target mels, teacher targets and tokens.

A cache lives in `data.cache_dir/cache-<key>/`, where the key hashes everything that shapes its
contents, so runs with the same data settings share it. It is built in two stages:

1. Chunks (`chunks/NNNNNN.npz`): each chunk of `chunk_size` clips is decoded, turned into mels and
   passed through the teachers, then written atomically. Hosts take chunks round-robin and each
   host's batches are sharded over its devices. Finished chunks are never recomputed, so an
   interrupted build resumes where it stopped.
2. Assembly (process 0): the built-in tokenizer is fitted on the training split's teacher frames,
   and every split directory gets memory-mappable .npy arrays (one row per clip) and `clips.json`.
   `meta.json` records the settings, teacher widths and the clips skipped because they could not be
   decoded; `COMPLETE` is written last.
"""

import hashlib
import json
import logging
import os
import pathlib
import time
import zlib

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import tqdm

from agrepa_jax import audio, sharding
from agrepa_jax.data import tokenizer
from agrepa_jax.data.sources import Clip
from agrepa_jax.teachers.base import Teacher, masked_mean

SPLITS = ('train', 'heldout')
CACHE_VERSION = 2


def cache_key(settings: dict) -> str:
  blob = json.dumps({'version': CACHE_VERSION, **settings}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def split_of(clip_id: str, heldout_fraction: float) -> str:
  """Deterministic split by a hash of the clip id, stable when clips are added."""
  return 'heldout' if zlib.crc32(clip_id.encode()) % 10_000 < heldout_fraction * 10_000 else 'train'


def decode_clips(clips: list[Clip], seconds: float):
  """Loads every clip at 24 kHz, fitted to `seconds`. Undecodable clips are skipped and listed."""
  length = round(seconds * audio.SAMPLE_RATE)
  kept, waves, num_samples, skipped = [], [], [], []
  for clip in clips:
    try:
      wave = audio.load_audio(clip.path)
    except audio.AudioDecodeError as e:
      logging.warning('skipping clip %s: %s', clip.id, e)
      skipped.append({'id': clip.id, 'path': clip.path, 'error': str(e)})
      continue
    kept.append(clip)
    num_samples.append(min(len(wave), length))
    waves.append(audio.fit_length(wave, length))
  waves = np.stack(waves) if waves else np.zeros((0, length), np.float32)
  return kept, waves, np.array(num_samples, np.int64), skipped


def feature_mesh():
  """This host's devices along the batch axes: teacher batches are sharded over them."""
  return sharding.make_mesh({'data': -1, 'fsdp': 1}, jax.local_devices())


def pad_batch(batch: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended up to `rows`."""
  extra = rows - len(batch)
  return (
    np.concatenate([batch, np.zeros((extra, *batch.shape[1:]), batch.dtype)]) if extra else batch
  )


def teacher_features(
  teacher: Teacher, waves: np.ndarray, num_samples: np.ndarray, mesh, batch_rows: int = 0
):
  """Utterance means (N, C) over frames holding audio, frame features (N, F, C) and their mask.

  waves are 24 kHz; they are resampled to the teacher's rate on the host, then the batch is padded
  to `batch_rows` rows (so every batch has one shape and the teacher compiles once) rounded up to a
  multiple of the mesh size, and sharded over the mesh.
  """
  rate = teacher.spec.sample_rate
  resampled = librosa.resample(
    waves, orig_sr=audio.SAMPLE_RATE, target_sr=rate, res_type='soxr_hq', axis=-1
  )
  teacher_samples = np.ceil(num_samples * rate / audio.SAMPLE_RATE).astype(np.int64)
  rows = -(-max(batch_rows, len(waves)) // mesh.devices.size) * mesh.devices.size
  batch = jax.device_put(
    pad_batch(resampled.astype(np.float32), rows), sharding.batch_sharding(mesh)
  )
  frames, mask = teacher.features(batch, pad_batch(teacher_samples, rows))
  frames, mask = np.asarray(frames, np.float32)[: len(waves)], np.asarray(mask)[: len(waves)]
  return masked_mean(frames, mask), frames, mask


def build_chunk(
  clips: list[Clip], settings: dict, domains: tuple[str, ...], teachers: dict, mesh
) -> dict:
  """Everything the cache needs of one chunk of clips, as a dict of arrays."""
  clips, waves, num_samples, skipped = decode_clips(clips, settings['clip_seconds'])
  domain = np.array([domains.index(c.domain) for c in clips], np.int32)
  mel = (
    np.asarray(audio.log_mel(jnp.asarray(waves))) if len(waves) else np.zeros((0, 0, audio.N_MELS))
  )
  out = {
    'ids': np.array([c.id for c in clips]),
    'paths': np.array([c.path for c in clips]),
    'texts': np.array([c.text for c in clips]),
    'domain': domain,
    'num_samples': num_samples,
    'mel': mel.astype(np.float16),
    'skipped': np.array(json.dumps(skipped)),
  }
  num_tokens = max(1, round(settings['clip_seconds'] * settings['token_rate']))
  for d, name in enumerate(domains):
    rows = np.flatnonzero(domain == d)
    if len(rows) == 0:
      continue
    utterance, frames, _ = teacher_features(
      teachers[name], waves[rows], num_samples[rows], mesh, settings['chunk_size']
    )
    out[f'rows_{name}'] = rows
    out[f'teacher_{name}'] = utterance
    out[f'token_features_{name}'] = np.stack(
      [tokenizer.pool_to_rate(f, num_tokens) for f in frames]
    )
    if settings['teacher_frames']:
      out[f'teacher_frames_{name}'] = frames.astype(np.float16)
  return out


def chunk_path(directory: pathlib.Path, index: int) -> pathlib.Path:
  return directory / 'chunks' / f'{index:06d}.npz'


def write_atomically(path: pathlib.Path, arrays: dict):
  path.parent.mkdir(parents=True, exist_ok=True)
  temporary = path.with_name(f'.{path.stem}.{os.getpid()}.tmp.npz')
  np.savez(temporary, **arrays)
  os.replace(temporary, path)


def build_chunks(clips, directory, settings, domains, load_teachers) -> dict:
  """Stage 1 on this host: builds its missing chunks. Returns counts and clips/s for the log."""
  chunk_size = settings['chunk_size']
  indices = range(jax.process_index(), -(-len(clips) // chunk_size), jax.process_count())
  missing = [i for i in indices if not chunk_path(directory, i).exists()]
  stats = {'chunks': len(indices), 'computed': len(missing), 'clips': 0, 'seconds': 0.0}
  if not missing:
    return stats
  teachers, mesh = load_teachers(), feature_mesh()
  start = time.perf_counter()
  for i in tqdm.tqdm(
    missing,
    desc='data chunks (decode, mel, teachers)',
    unit='chunk',
    disable=jax.process_index() != 0,
  ):
    chunk = clips[i * chunk_size : (i + 1) * chunk_size]
    write_atomically(
      chunk_path(directory, i), build_chunk(chunk, settings, domains, teachers, mesh)
    )
    stats['clips'] += len(chunk)
  stats['seconds'] = time.perf_counter() - start
  return stats


def load_chunks(directory: pathlib.Path, num_chunks: int):
  for i in range(num_chunks):
    with np.load(chunk_path(directory, i)) as chunk:
      yield {k: chunk[k] for k in chunk.files}


def fit_tokenizers(directory, num_chunks, settings, domains) -> dict:
  """Per-domain codebooks fitted on the training split's teacher frames pooled to the token rate."""
  features = {name: [] for name in domains}
  for chunk in load_chunks(directory, num_chunks):
    train_rows = np.array(
      [split_of(i, settings['heldout_fraction']) == 'train' for i in chunk['ids']], bool
    )
    for name in domains:
      if f'rows_{name}' in chunk:
        keep = train_rows[chunk[f'rows_{name}']]
        pooled = chunk[f'token_features_{name}'][keep]
        features[name].append(pooled.reshape(-1, pooled.shape[-1]))
  return {
    name: tokenizer.fit_codebooks(
      np.concatenate(f), settings['codebook_size'], settings['num_codebooks'], settings['seed'] + d
    )
    for d, (name, f) in enumerate(features.items())
    if f
  }


def assemble(directory, num_chunks, settings, domains, teacher_dims) -> dict:
  """Stage 2: writes the split arrays from the chunks, streaming rows into memory-mapped .npy files."""
  codebooks = fit_tokenizers(directory, num_chunks, settings, domains)
  num_tokens = max(1, round(settings['clip_seconds'] * settings['token_rate']))
  index, skipped, frame_shapes = [], [], {}
  for chunk in load_chunks(directory, num_chunks):
    index += [split_of(i, settings['heldout_fraction']) for i in chunk['ids']]
    skipped += json.loads(str(chunk['skipped']))
    frame_shapes.update(
      {n: chunk[f'teacher_frames_{n}'].shape[1] for n in domains if f'teacher_frames_{n}' in chunk}
    )
  index = np.array(index)
  num_frames = audio.num_frames(round(settings['clip_seconds'] * audio.SAMPLE_RATE))
  outputs = {}
  for split in SPLITS:
    n = int((index == split).sum())
    out = directory / split
    out.mkdir(exist_ok=True)
    arrays = {
      'mel': ((n, num_frames, audio.N_MELS), np.float16),
      'num_samples': ((n,), np.int64),
      'domain': ((n,), np.int32),
      'tokens': ((n, settings['num_codebooks'], num_tokens), np.int32),
    }
    arrays.update({f'teacher_{d}': ((n, teacher_dims[d]), np.float32) for d in domains})
    arrays.update(
      {
        f'teacher_frames_{d}': ((n, frame_shapes[d], teacher_dims[d]), np.float16)
        for d in frame_shapes
      }
    )
    outputs[split] = {
      k: np.lib.format.open_memmap(out / f'{k}.npy', 'w+', dtype, shape)
      for k, (shape, dtype) in arrays.items()
    }
    outputs[split]['clips'] = []
  cursor = {split: 0 for split in SPLITS}
  for chunk in tqdm.tqdm(
    load_chunks(directory, num_chunks), total=num_chunks, desc='assemble cache', unit='chunk'
  ):
    split = np.array([split_of(i, settings['heldout_fraction']) for i in chunk['ids']])
    tokens = np.zeros((len(split), settings['num_codebooks'], num_tokens), np.int32)
    for name in domains:
      if f'rows_{name}' in chunk:
        tokens[chunk[f'rows_{name}']] = np.moveaxis(
          tokenizer.assign_tokens(chunk[f'token_features_{name}'], codebooks[name]), 0, 1
        )
    for name in SPLITS:
      rows = np.flatnonzero(split == name)
      target, start = outputs[name], cursor[name]
      span = slice(start, start + len(rows))
      target['mel'][span] = chunk['mel'][rows]
      target['num_samples'][span] = chunk['num_samples'][rows]
      target['domain'][span] = chunk['domain'][rows]
      target['tokens'][span] = tokens[rows]
      for d in domains:
        for kind in ('teacher', 'teacher_frames'):
          if f'{kind}_{d}' in target:
            full = np.zeros(
              (len(split), *target[f'{kind}_{d}'].shape[1:]), target[f'{kind}_{d}'].dtype
            )
            if f'rows_{d}' in chunk:
              full[chunk[f'rows_{d}']] = chunk[f'{kind}_{d}']
            target[f'{kind}_{d}'][span] = full[rows]
      target['clips'] += [
        {
          'id': str(chunk['ids'][r]),
          'path': str(chunk['paths'][r]),
          'text': str(chunk['texts'][r]),
          'domain': domains[chunk['domain'][r]],
        }
        for r in rows
      ]
      cursor[name] += len(rows)
  for name in SPLITS:
    clips = outputs[name].pop('clips')
    for array in outputs[name].values():
      array.flush()
    (directory / name / 'clips.json').write_text(json.dumps(clips, indent=0))
  return {
    'num_clips': cursor,
    'num_tokens': num_tokens,
    'num_frames': num_frames,
    'skipped': skipped,
  }


def teacher_widths(directory: pathlib.Path, num_chunks: int, domains) -> dict | None:
  """{domain: C_d} read off the chunks' utterance features, or None if some domain has no clip yet."""
  widths = {}
  for chunk in load_chunks(directory, num_chunks):
    widths.update(
      {d: int(chunk[f'teacher_{d}'].shape[1]) for d in domains if f'teacher_{d}' in chunk}
    )
    if len(widths) == len(domains):
      return widths
  return None


def build_cache(
  clips: list[Clip],
  directory: pathlib.Path,
  settings: dict,
  domains: tuple[str, ...],
  load_teachers,
) -> dict:
  """Builds (or finishes) the cache in `directory`; every process calls it. Returns the meta dict.

  settings: clip_seconds, heldout_fraction, token_rate, codebook_size, num_codebooks, seed,
  chunk_size, teacher_frames (bool: also store frame features for frame-level alignment).
  load_teachers: () -> {domain: Teacher}, called only if some chunk still needs computing.
  """
  if (directory / 'COMPLETE').exists():
    return json.loads((directory / 'meta.json').read_text())
  unknown = sorted({c.domain for c in clips} - set(domains))
  if unknown:
    raise ValueError(f'clips of domains {unknown} are not in data.domains={list(domains)}')
  if not clips:
    raise ValueError(f'no clips to build the cache in {directory}')
  directory.mkdir(parents=True, exist_ok=True)
  stats = build_chunks(clips, directory, settings, domains, load_teachers)
  if stats['computed']:
    logging.info(
      'data chunks: %d computed (%d clips in %.1f s, %.2f clips/s)',
      stats['computed'],
      stats['clips'],
      stats['seconds'],
      stats['clips'] / max(stats['seconds'], 1e-9),
    )
  sync_processes('data-chunks')
  num_chunks = -(-len(clips) // settings['chunk_size'])
  if jax.process_index() == 0:
    teacher_dims = teacher_widths(directory, num_chunks, domains) or {
      n: t.spec.dim for n, t in load_teachers().items()
    }
    assembled = assemble(directory, num_chunks, settings, domains, teacher_dims)
    if not sum(assembled['num_clips'].values()):
      raise ValueError(
        f'no decodable clips for the cache in {directory} ({len(assembled["skipped"])} skipped)'
      )
    meta = {
      'settings': settings,
      'domains': list(domains),
      'teacher_dims': teacher_dims,
      'feature_stats': stats,
      **assembled,
    }
    (directory / 'meta.json').write_text(json.dumps(meta, indent=2, default=str))
    (directory / 'COMPLETE').write_text('')
    logging.info(
      'data cache ready in %s: %s clips, %d skipped',
      directory,
      meta['num_clips'],
      len(meta['skipped']),
    )
  sync_processes('data-cache')
  return json.loads((directory / 'meta.json').read_text())


def read_token_files(
  token_dir: str, clip_ids: list[str], num_codebooks: int, num_tokens: int, vocab_size: int
) -> np.ndarray:
  """External tokens (e.g. S3 or an AudioSet tokenizer): `<token_dir>/<clip id>.npy`, (N,) or (K, N).

  Each file is resampled by nearest neighbor to `num_tokens` per clip; ids must lie in 0..vocab_size-1.
  """
  out = np.zeros((len(clip_ids), num_codebooks, num_tokens), np.int32)
  for i, clip_id in enumerate(clip_ids):
    path = pathlib.Path(token_dir) / f'{clip_id}.npy'
    if not path.exists():
      raise FileNotFoundError(f'token file for clip {clip_id!r} not found: {path}')
    tokens = np.atleast_2d(np.load(path))
    if tokens.shape[0] != num_codebooks:
      raise ValueError(
        f'{path}: holds {tokens.shape[0]} codebooks, model.num_codebooks={num_codebooks}'
      )
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
      raise ValueError(
        f'{path}: token ids in [{tokens.min()}, {tokens.max()}] are outside 0..{vocab_size - 1} '
        '(model.vocab_size)'
      )
    index = np.minimum((np.arange(num_tokens) * tokens.shape[1]) // num_tokens, tokens.shape[1] - 1)
    out[i] = tokens[:, index]
  return out


def sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
