"""The probe set (held-out clips stacked into arrays) and the fixed inputs every probe feeds the
model.

Every probe draws the same quantities the same way, so FoG-A and LASP see identical x_t:
- noise: x0 of clip i is `noise_std`·N(0, I) from fold_in(noise key, i), so it depends on the
  clip's position in the probe set and not on how the set is split into batches; the noise key and
  the dropout key are two fixed streams of the probe key;
- prompt: deterministic, the first ⌊prompt_fraction · valid frames⌋ frames of x1 (at least one when
  the fraction is positive). The default 0.15 is the mean prompt length of training, whose prompt
  is drawn uniformly from 1..⌊0.3 · valid frames⌋; 0 gives no prompt;
- tokens are always kept (no classifier-free-guidance drop);
- `clean=True` (the official probes' quirk) feeds the clean mel x1 itself, labelled with t.
"""

import jax
import jax.numpy as jnp
import numpy as np

from agrepa_jax import audio, losses

NOISE_STD = losses.FlowMatchingConfig.noise_std
NOISE_STREAM, DROPOUT_STREAM = 0, 1
MODEL_KEYS = (
  'mel',
  'tokens',
  'domain',
  'num_samples',
)  # what `model_inputs` reads of a probe batch


def balanced_indices(
  clip_domains: np.ndarray, num_domains: int, num_clips: int, seed: int
) -> np.ndarray:
  """Up to `num_clips` clip indices, an equal share per domain (the remainder to the first domains).

  A domain with fewer clips than its share gives all it has. Indices are sorted, and the choice is a
  deterministic function of `seed`.
  """
  rng = np.random.default_rng(seed)
  chosen = []
  for d in range(num_domains):
    share = num_clips // num_domains + (d < num_clips % num_domains)
    candidates = np.flatnonzero(clip_domains == d)
    chosen.append(rng.permutation(candidates)[:share])
  return np.sort(np.concatenate(chosen)).astype(np.int64)


def stack_records(records: list[dict], domains: tuple[str, ...]) -> dict:
  """Records of a CachedSplit -> one batch.

  mel (N, T, M), tokens, domain, num_samples, teacher {d: (N, C_d)}.
  """
  stack = lambda key, dtype: np.stack([np.asarray(r[key], dtype) for r in records])
  return {
    'mel': stack('mel', np.float32),
    'tokens': stack('tokens', np.int32),
    'domain': stack('domain', np.int32),
    'num_samples': stack('num_samples', np.int64),
    'teacher': {
      d: np.stack([np.asarray(r['teacher'][d], np.float32) for r in records]) for d in domains
    },
  }


def clip_noise(
  key: jax.Array, num_clips: int, clip_shape: tuple[int, ...], std: float = NOISE_STD
) -> jax.Array:
  """(num_clips, *clip_shape) fixed noise x0 of the probe key `key`."""
  noise_key = jax.random.fold_in(key, NOISE_STREAM)
  keys = jax.vmap(lambda i: jax.random.fold_in(noise_key, i))(jnp.arange(num_clips))
  return std * jax.vmap(lambda k: jax.random.normal(k, clip_shape))(keys)


def dropout_key(key: jax.Array, batch_index: int, t_index: int) -> jax.Array:
  """The training-mode dropout key of the probe key `key` for one batch at one t."""
  return jax.random.fold_in(
    jax.random.fold_in(jax.random.fold_in(key, DROPOUT_STREAM), batch_index), t_index
  )


def valid_frames(num_samples: jax.Array, num_frames: int) -> jax.Array:
  """(B, T) bool: the frames that hold audio."""
  return losses.frame_mask(num_samples, num_frames, audio.HOP_LENGTH)


def scored_frames(num_samples: jax.Array, num_frames: int, mask_padding: bool = True):
  """(B, T) bool frames a probe scores, and the (B,) lengths the model masks attention keys with.

  mask_padding False (model.mask_padding, the official code): every frame, and no key mask (None).
  """
  if not mask_padding:
    return jnp.ones((num_samples.shape[0], num_frames), bool), None
  valid = valid_frames(num_samples, num_frames)
  return valid, valid.sum(1)


def model_inputs(
  batch: dict, t: jax.Array, noise: jax.Array, prompt_fraction: float, clean: bool = False
) -> dict:
  """Keyword inputs of `DiT.__call__` for one batch at one scalar t (x_t = x1 when `clean`)."""
  x1 = batch['mel']
  size, frames, _ = x1.shape
  valid = valid_frames(batch['num_samples'], frames).sum(1)
  prompt = jnp.floor(prompt_fraction * valid).astype(jnp.int32)
  prompt = jnp.where(prompt_fraction > 0, jnp.maximum(prompt, 1), 0)
  in_prompt = jnp.arange(frames)[None, :] < prompt[:, None]
  t = jnp.full((size,), t, x1.dtype)
  return dict(
    x_t=x1 if clean else (1 - t[:, None, None]) * noise + t[:, None, None] * x1,
    t=t,
    tokens=batch['tokens'],
    ref_mel=jnp.where(in_prompt[..., None], x1, 0.0),
    domain=batch['domain'],
  )
