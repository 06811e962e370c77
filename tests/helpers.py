"""Tiny configs and synthetic data caches, so train-level tests need no audio or teacher."""

import json
import pathlib

import numpy as np

from agrepa_jax import audio, config_base
from agrepa_jax.data import cache, prepare

TEACHER_DIMS = {'speech': 6, 'audio': 5}


def tiny_config(cache_dir: pathlib.Path, **overrides):
  config = config_base.base_config()
  config.num_steps = 6
  config.batch_size = 8
  config.log_every = 2
  config.eval_every = 3
  config.eval_batches = 2
  config.checkpoint_every = 3
  config.async_checkpointing = False
  config.model.update(
    num_layers=3, width=32, num_heads=4, token_dim=16, vocab_size=16, time_freq_dim=16
  )
  config.optim.update(learning_rate=1e-3)
  config.data.update(cache_dir=str(cache_dir), clip_seconds=0.5, token_rate=10.0)
  config.repa.update(
    selection='fixed',
    layers={'speech': [1, 3], 'audio': [2]},
    lambdas={'speech': [0.5, 0.2], 'audio': [0.4]},
  )
  config.mesh.update(data=-1, fsdp=1, fsdp_min_size=256)
  for key, value in overrides.items():
    target = config
    *path, leaf = key.split('.')
    for name in path:
      target = target[name]
    target[leaf] = value
  return config


def write_fake_cache(config, num_clips: int = 40, seed: int = 0) -> pathlib.Path:
  """Writes a complete cache where prepare.prepare(config) looks for it; mels depend on tokens."""
  settings = prepare.cache_settings(config)
  directory = pathlib.Path(config.data.cache_dir) / f'cache-{cache.cache_key(settings)}'
  rng = np.random.default_rng(seed)
  samples = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  frames = audio.num_frames(samples)
  num_tokens = max(1, round(config.data.clip_seconds * config.data.token_rate))
  domains = tuple(config.data.domains)
  for split, n in (('train', num_clips), ('heldout', max(num_clips // 4, config.batch_size))):
    out = directory / split
    out.mkdir(parents=True, exist_ok=True)
    domain = np.arange(n) % len(domains)
    tokens = rng.integers(0, config.model.vocab_size, (n, config.model.num_codebooks, num_tokens))
    pattern = rng.standard_normal((config.model.vocab_size, config.model.n_mels)).astype(np.float32)
    index = np.minimum(np.arange(frames) * num_tokens // frames, num_tokens - 1)
    mel = pattern[tokens[:, 0, index]] + 0.1 * rng.standard_normal((n, frames, config.model.n_mels))
    np.save(out / 'mel.npy', mel.astype(np.float16))
    np.save(out / 'num_samples.npy', rng.integers(samples // 2, samples + 1, n))
    np.save(out / 'domain.npy', domain.astype(np.int32))
    np.save(out / 'tokens.npy', tokens.astype(np.int32))
    for d, name in enumerate(domains):
      utt = rng.standard_normal((n, TEACHER_DIMS[name])).astype(np.float32) * (domain == d)[:, None]
      np.save(out / f'teacher_{name}.npy', utt)
      frames_feat = rng.standard_normal((n, 7, TEACHER_DIMS[name])).astype(np.float16)
      np.save(out / f'teacher_frames_{name}.npy', frames_feat)
    clips = [
      {'id': f'{split}-{i}', 'path': '', 'domain': domains[domain[i]], 'text': 'a test clip'}
      for i in range(n)
    ]
    (out / 'clips.json').write_text(json.dumps(clips))
  meta = {
    'settings': settings,
    'domains': list(domains),
    'teacher_dims': TEACHER_DIMS,
    'teachers': {d: 'fake' for d in domains},
    'num_clips': {'train': num_clips},
    'num_tokens': num_tokens,
    'num_frames': frames,
    'skipped': [],
  }
  (directory / 'meta.json').write_text(json.dumps(meta))
  (directory / 'COMPLETE').write_text('')
  return directory
