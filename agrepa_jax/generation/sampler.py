"""Sampling mels from the flow-matching DiT: Euler ODE integration with sway sampling and CFG
(docs/method.md, sampling).

The ODE dx/dt = v_θ(x, t, c) runs from noise x0 ~ N(0, σ²I) at t = 0 to a mel at t = 1 over a
time grid bent by sway sampling. Classifier-free guidance extrapolates away from the unconditional
velocity, whose pass drops the tokens but keeps the reference prompt: the official form
v_u + w·(v_c − v_u), or the F5-TTS form v_c + w·(v_c − v_u) (the official form at weight w + 1).
The integration loop is one jitted `lax.scan`; the frames of the reference prompt are copied into
the output.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax import audio, sharding
from agrepa_jax.model import DiT


def sway_time_grid(num_points: int, sway: float) -> jax.Array:
  """`num_points` times from 0 to 1: t' = t + s·(cos(πt/2) − 1 + t) of the uniform grid t.

  s = 0 is the uniform grid; s < 0 crowds the points near t = 0 (s = −1 gives 1 − cos(πt/2)).
  """
  t = jnp.linspace(0.0, 1.0, num_points)
  return t + sway * (jnp.cos(jnp.pi / 2 * t) - 1 + t)


def euler_integrate(
  velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], x0: jax.Array, time_grid: jax.Array
) -> jax.Array:
  """x(t_last) by explicit Euler steps x ← x + (t_{k+1} − t_k)·v(x, t_k) over `time_grid`."""

  def step(x, times):
    t, t_next = times
    return x + (t_next - t) * velocity_fn(x, t), None

  x1, _ = jax.lax.scan(step, x0, (time_grid[:-1], time_grid[1:]))
  return x1


CFG_FORMS = ('official', 'f5')


def guide(conditional: jax.Array, unconditional: jax.Array, weight, form: str) -> jax.Array:
  """Guided velocity: official v_u + w·(v_c − v_u), or f5 v_c + w·(v_c − v_u)."""
  if form not in CFG_FORMS:
    raise ValueError(f'sample.cfg_form {form!r}: expected one of {CFG_FORMS}')
  anchor = unconditional if form == 'official' else conditional
  return anchor + weight * (conditional - unconditional)


def cfg_velocity(
  backbone: DiT, x_t, t, tokens, ref_mel, domain, weight, form: str = 'official', lengths=None
) -> jax.Array:
  """Guided velocity (see `guide`) from one forward pass over the conditional and unconditional
  inputs.

  t: (B,) times; lengths: (B,) frames holding audio (default all). The unconditional pass drops
  the tokens and keeps `ref_mel`. Each clip's two
  copies sit next to each other along the batch (not one half after the other), so a batch
  sharded over devices stays where it is.
  """
  twice = lambda x: jnp.repeat(x, 2, axis=0)
  batch = x_t.shape[0]
  token_keep = jnp.tile(jnp.array([1.0, 0.0], x_t.dtype), batch)
  velocity, _ = backbone(
    twice(x_t),
    twice(t),
    twice(tokens),
    twice(ref_mel),
    twice(domain),
    token_keep=token_keep,
    lengths=None if lengths is None else twice(lengths),
  )
  velocity = velocity.reshape(batch, 2, *velocity.shape[1:])
  conditional, unconditional = velocity[:, 0], velocity[:, 1]
  return guide(conditional, unconditional, weight, form)


def leading_frames_mask(lengths, num_frames: int) -> np.ndarray:
  """(B,) lengths -> (B, T) bool, true on each clip's first `lengths` frames (its prompt)."""
  return np.arange(num_frames)[None, :] < np.asarray(lengths)[:, None]


def prompt_lengths(
  num_samples: np.ndarray, prompt_seconds: float, prompt_fraction: float = 0.0
) -> np.ndarray:
  """Reference-prompt length in frames of each clip: its first `prompt_seconds` of audio, or its
  first `prompt_fraction` of the frames holding audio when that is > 0.

  At most the clip's audio frames minus one, so every clip keeps at least one frame to generate.
  """
  valid = -(
    -np.atleast_1d(np.asarray(num_samples, np.int64)) // audio.HOP_LENGTH
  )  # frames whose center holds audio
  if prompt_fraction > 0:
    wanted = np.floor(prompt_fraction * valid)
  else:
    wanted = np.full(valid.shape, round(prompt_seconds * audio.SAMPLE_RATE / audio.HOP_LENGTH))
  return np.clip(wanted, 0, valid - 1).astype(np.int32)


@functools.partial(jax.jit, static_argnames=('graphdef', 'num_points', 'cfg_form', 'mesh'))
def _integrate(
  state,
  tokens,
  ref_mel,
  domain,
  prompt_mask,
  lengths,
  key,
  sway,
  cfg_weight,
  noise_std,
  *,
  graphdef,
  num_points,
  cfg_form,
  mesh,
):
  backbone = nnx.merge(graphdef, state)
  reference = jnp.where(prompt_mask[..., None], ref_mel, 0.0)
  x0 = noise_std * jax.random.normal(key, reference.shape, reference.dtype)
  if mesh is not None:
    x0 = jax.lax.with_sharding_constraint(x0, sharding.batch_sharding(mesh))
  batch = x0.shape[0]

  def velocity(x, t):
    t = jnp.full((batch,), t)
    return cfg_velocity(backbone, x, t, tokens, reference, domain, cfg_weight, cfg_form, lengths)

  x1 = euler_integrate(velocity, x0, sway_time_grid(num_points, sway))
  out = jnp.where(prompt_mask[..., None], reference, x1)
  # Replicated, so that every process can read the whole batch back.
  return out if mesh is None else jax.lax.with_sharding_constraint(out, sharding.replicated(mesh))


def sample(
  backbone: DiT,
  tokens,
  ref_mel,
  domain,
  key,
  prompt_mask,
  *,
  num_points: int = 32,
  sway: float = -1.0,
  cfg_weight: float = 3.0,
  cfg_form: str = 'official',
  noise_std: float = 0.5,
  mesh: jax.sharding.Mesh | None = None,
  lengths=None,
) -> jax.Array:
  """Generated normalized mels (B, T, n_mels), prompt frames equal to the reference.

  tokens: (B, K, N); ref_mel: (B, T, n_mels) reference mel (frames outside the prompt are ignored);
  domain: (B,); prompt_mask: (B, T) bool, the reference-prompt frames (see `leading_frames_mask`);
  lengths: (B,) frames holding audio, the only ones attention reads (default all T).
  cfg_form: 'official' or 'f5' (see `guide`). sway, cfg_weight and noise_std are traced, so
  changing them does not recompile; num_points and cfg_form do.
  With a mesh, the batch (a multiple of the mesh size) is sharded over its ('data', 'fsdp') axes.
  """
  graphdef, state = nnx.split(backbone)
  inputs = tuple(jnp.asarray(x) for x in (tokens, ref_mel, domain, prompt_mask))
  inputs += (None if lengths is None else jnp.asarray(lengths, jnp.int32),)
  if mesh is not None:
    inputs = jax.device_put(inputs, sharding.batch_sharding(mesh))
  scalars = tuple(jnp.float32(x) for x in (sway, cfg_weight, noise_std))
  return _integrate(
    state,
    *inputs,
    key,
    *scalars,
    graphdef=graphdef,
    num_points=num_points,
    cfg_form=cfg_form,
    mesh=mesh,
  )
