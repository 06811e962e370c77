"""Tiny configs and synthetic feature stores, so train-level tests need no audio or teacher."""

import pathlib

import ml_dtypes
import numpy as np
from etils import epath

from agrepa_jax import config_base
from agrepa_jax.data import index, prepare, spec
from agrepa_jax.model import ModelConfig

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


def write_fake_store(config, splits: dict, teacher_dims: dict | None = None) -> epath.Path:
  """Writes a finished feature store where prepare.prepare(config) looks for it.

  splits: {split: [record]} with records as the store holds them (features.py).
  """
  directory = prepare.store_directory(config)
  domains = tuple(config.data.domains)
  manifest = index.import_records(directory, prepare.store_settings(config), domains, splits, 16)
  if teacher_dims is not None:
    assert manifest['teacher_dims'] == teacher_dims
  return directory


def fake_record(batch_spec, clip_id: str, domain: int, mel, tokens, num_samples, rng, text=''):
  """A stored record of the batch spec's crop length: the own domain's teacher target, and teacher
  frames when the spec has them."""
  name = batch_spec.domains[domain]
  dim = batch_spec.teacher_dims[name]
  record = {
    'id': clip_id,
    'path': '',
    'text': text,
    'domain': np.int32(domain),
    'num_samples': np.int64(num_samples),
    'mel': np.asarray(mel, ml_dtypes.bfloat16),
    'teacher': rng.standard_normal(dim).astype(np.float32),
    'tokens': np.asarray(tokens, np.int32),
  }
  if batch_spec.teacher_frames is not None:
    frames = rng.standard_normal((batch_spec.teacher_frames[name], dim))
    record['teacher_frames'] = frames.astype(ml_dtypes.bfloat16)
  if batch_spec.audio_rates is not None:  # online teachers: the clip at its teacher's rate
    length = -(-int(num_samples) * batch_spec.audio_rates[name] // 24000)
    record['audio'] = spec.to_pcm16(0.1 * rng.standard_normal(length))
  return record


def write_fake_cache(config, num_clips: int = 40, seed: int = 0) -> epath.Path:
  """A finished feature store whose mels depend on the tokens, laid out by the batch spec."""
  rng = np.random.default_rng(seed)
  batch_spec = spec.batch_spec(config, TEACHER_DIMS)
  frames, num_tokens = batch_spec.num_frames, batch_spec.num_tokens
  domains = tuple(config.data.domains)
  pattern = rng.standard_normal((config.model.vocab_size, config.model.n_mels)).astype(np.float32)
  index = np.minimum(np.arange(frames) * num_tokens // frames, num_tokens - 1)
  splits = {}
  for split, n in (('train', num_clips), ('heldout', max(num_clips // 4, config.batch_size))):
    tokens = rng.integers(0, config.model.vocab_size, (n, config.model.num_codebooks, num_tokens))
    mel = pattern[tokens[:, 0, index]] + 0.1 * rng.standard_normal((n, frames, config.model.n_mels))
    lengths = rng.integers(batch_spec.num_samples // 2, batch_spec.num_samples + 1, n)
    splits[split] = [
      fake_record(
        batch_spec,
        f'{split}-{i:03d}',
        i % len(domains),
        mel[i],
        tokens[i],
        lengths[i],
        rng,
        'a test clip',
      )
      for i in range(n)
    ]
  return write_fake_store(config, splits, {d: TEACHER_DIMS[d] for d in domains})


def tiny_model_config(**overrides) -> ModelConfig:
  """A DiT small enough for unit tests: width 32, 4 heads, 8 mel bands, vocab 11."""
  fields = dict(
    num_layers=3,
    width=32,
    num_heads=4,
    token_dim=16,
    vocab_size=11,
    n_mels=8,
    time_freq_dim=16,
    dropout=0.2,
  )
  return ModelConfig(**{**fields, **overrides})
