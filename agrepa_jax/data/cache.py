"""Turns clips into the arrays training reads: target mels, teacher targets and tokens.

A cache lives in `data.cache_dir/<key>/`, where the key hashes everything that shapes its contents,
so runs with the same data settings share it. Each split directory holds memory-mappable .npy
arrays (one row per clip) and `clips.json`; `meta.json` records the settings, the teacher widths,
and the clips skipped because they could not be decoded. `COMPLETE` is written last.
"""
import hashlib
import json
import logging
import pathlib
import zlib

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import tqdm

from agrepa_jax import audio
from agrepa_jax.data import tokenizer
from agrepa_jax.data.sources import Clip
from agrepa_jax.teachers.base import Teacher, masked_mean

SPLITS = ('train', 'heldout')
CACHE_VERSION = 1


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
  for clip in tqdm.tqdm(clips, desc='decode audio', unit='clip'):
    try:
      wave = audio.load_audio(clip.path)
    except audio.AudioDecodeError as e:
      logging.warning('skipping clip %s: %s', clip.id, e)
      skipped.append({'id': clip.id, 'path': clip.path, 'error': str(e)})
      continue
    kept.append(clip)
    num_samples.append(min(len(wave), length))
    waves.append(audio.fit_length(wave, length))
  return kept, np.stack(waves) if waves else np.zeros((0, length), np.float32), np.array(num_samples), skipped


def batched(n: int, batch_size: int):
  return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def compute_mels(waves: np.ndarray, batch_size: int) -> np.ndarray:
  out = [np.asarray(audio.log_mel(jnp.asarray(waves[s]))) for s in batched(len(waves), batch_size)]
  return np.concatenate(out).astype(np.float32)


def teacher_features(teacher: Teacher, waves: np.ndarray, num_samples: np.ndarray, batch_size: int):
  """Utterance means (N, C) over frames holding audio, and the frame features (N, F, C)."""
  rate = teacher.spec.sample_rate
  resampled = librosa.resample(waves, orig_sr=audio.SAMPLE_RATE, target_sr=rate, res_type='soxr_hq', axis=-1)
  teacher_samples = np.ceil(num_samples * rate / audio.SAMPLE_RATE).astype(np.int64)
  frames, masks = [], []
  for s in tqdm.tqdm(batched(len(waves), batch_size), desc=f'teacher {teacher.spec.name}', unit='batch'):
    f, m = teacher.features(resampled[s].astype(np.float32), teacher_samples[s])
    frames.append(np.asarray(f, np.float32))
    masks.append(np.asarray(m))
  frames, masks = np.concatenate(frames), np.concatenate(masks)
  return masked_mean(frames, masks), frames, masks


def build_cache(clips: list[Clip], directory: pathlib.Path, settings: dict, domains: tuple[str, ...],
                teachers: dict[str, Teacher]) -> pathlib.Path:
  """Builds the cache in `directory` unless it is already complete. Returns `directory`.

  settings: clip_seconds, heldout_fraction, token_rate, codebook_size, num_codebooks, seed,
  batch_size, teacher_frames (bool: also store frame features for frame-level alignment).
  """
  if (directory / 'COMPLETE').exists():
    return directory
  directory.mkdir(parents=True, exist_ok=True)
  unknown = sorted({c.domain for c in clips} - set(domains))
  if unknown:
    raise ValueError(f'clips of domains {unknown} are not in data.domains={list(domains)}')
  clips, waves, num_samples, skipped = decode_clips(clips, settings['clip_seconds'])
  if not clips:
    raise ValueError(f'no decodable clips for the cache in {directory} ({len(skipped)} skipped)')
  domain = np.array([domains.index(c.domain) for c in clips], np.int32)
  mel = compute_mels(waves, settings['batch_size'])
  split = np.array([split_of(c.id, settings['heldout_fraction']) for c in clips])

  per_domain, token_features = {}, {}
  num_tokens = max(1, round(settings['clip_seconds'] * settings['token_rate']))
  for d, name in enumerate(domains):
    rows = np.flatnonzero(domain == d)
    if len(rows) == 0:
      continue
    utterance, frames, masks = teacher_features(teachers[name], waves[rows], num_samples[rows],
                                                 settings['batch_size'])
    per_domain[name] = (rows, utterance, frames, masks)
    token_features[name] = np.stack([tokenizer.pool_to_rate(f, num_tokens) for f in frames])

  tokens = np.zeros((len(clips), settings['num_codebooks'], num_tokens), np.int32)
  for d, name in enumerate(domains):
    if name not in per_domain:
      continue
    rows = per_domain[name][0]
    fit_on = token_features[name][split[rows] == 'train'].reshape(-1, token_features[name].shape[-1])
    codebooks = tokenizer.fit_codebooks(fit_on, settings['codebook_size'], settings['num_codebooks'],
                                        settings['seed'] + d)
    tokens[rows] = np.moveaxis(tokenizer.assign_tokens(token_features[name], codebooks), 0, 1)

  teacher_dims = {name: t.spec.dim for name, t in teachers.items()}
  for split_name in SPLITS:
    keep = split == split_name
    out = directory / split_name
    out.mkdir(exist_ok=True)
    np.save(out / 'mel.npy', mel[keep].astype(np.float16))
    np.save(out / 'num_samples.npy', num_samples[keep])
    np.save(out / 'domain.npy', domain[keep])
    np.save(out / 'tokens.npy', tokens[keep])
    for name in domains:
      utt = np.zeros((len(clips), teacher_dims[name]), np.float32)
      if name in per_domain:
        rows, utterance, frames, _ = per_domain[name]
        utt[rows] = utterance
      np.save(out / f'teacher_{name}.npy', utt[keep])
      if settings['teacher_frames'] and name in per_domain:
        all_frames = np.zeros((len(clips), *frames.shape[1:]), np.float16)
        all_frames[rows] = frames
        np.save(out / f'teacher_frames_{name}.npy', all_frames[keep])
    kept_clips = [c for c, k in zip(clips, keep) if k]
    (out / 'clips.json').write_text(json.dumps([c.__dict__ for c in kept_clips], indent=0))
  meta = {'settings': settings, 'domains': list(domains), 'teacher_dims': teacher_dims,
          'teachers': {n: t.spec.name for n, t in teachers.items()},
          'num_clips': {s: int((split == s).sum()) for s in SPLITS}, 'num_tokens': num_tokens,
          'num_frames': int(mel.shape[1]), 'skipped': skipped}
  (directory / 'meta.json').write_text(json.dumps(meta, indent=2))
  (directory / 'COMPLETE').write_text('')
  logging.info('data cache ready in %s: %s clips, %d skipped', directory, meta['num_clips'], len(skipped))
  return directory


def read_token_files(token_dir: str, clip_ids: list[str], num_codebooks: int, num_tokens: int) -> np.ndarray:
  """External tokens (e.g. S3 or an AudioSet tokenizer): `<token_dir>/<clip id>.npy`, (N,) or (K, N).

  Each file is resampled by nearest neighbour to `num_tokens` per clip.
  """
  out = np.zeros((len(clip_ids), num_codebooks, num_tokens), np.int32)
  for i, clip_id in enumerate(clip_ids):
    path = pathlib.Path(token_dir) / f'{clip_id}.npy'
    if not path.exists():
      raise FileNotFoundError(f'token file for clip {clip_id!r} not found: {path}')
    tokens = np.atleast_2d(np.load(path))
    if tokens.shape[0] != num_codebooks:
      raise ValueError(f'{path}: holds {tokens.shape[0]} codebooks, model.num_codebooks={num_codebooks}')
    index = np.minimum((np.arange(num_tokens) * tokens.shape[1]) // num_tokens, tokens.shape[1] - 1)
    out[i] = tokens[:, index]
  return out


def sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)
