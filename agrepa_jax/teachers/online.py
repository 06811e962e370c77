"""Teachers inside the jitted train step (teachers.online=True): targets of each crop's own audio.

With online teachers a batch carries `audio` (data/spec.py): every row's crop at its own domain's
teacher rate, int16. Its rows follow a fixed layout (row i is of domain layout[i % K]), so the rows
of domain d are a static slice of every period of K rows, and the teacher of d runs on those rows
only. `OnlineTeachers.targets` gives what the store would hold for the crop: `teacher`, the mean
over the frames holding audio (base.masked_mean), and `teacher_frames` (F_d frames, zero past the
audio), with zeros in the rows of other domains, as the reader fills them.

The teachers' parameters are an input of the step (replicated on the mesh, never trained, not in
the train state or its checkpoints), so they are not baked into the program as constants.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from agrepa_jax import audio, sharding
from agrepa_jax.data import spec as spec_lib
from agrepa_jax.teachers.base import masked_mean


@dataclasses.dataclass(frozen=True)
class OnlineTeachers:
  """The static side of the teachers in the step; their parameters are passed to `targets`."""

  domains: tuple[str, ...]
  applies: dict  # {domain: apply(params, audio (B, S_d) float32, num_samples (B,)) -> frames, mask}
  params_key: dict  # {domain: key of its teacher's parameters}; domains sharing a teacher share it
  spec: spec_lib.BatchSpec  # audio rates, layout and C_d
  num_frames: dict | None  # {domain: F_d}: also give teacher_frames (repa.granularity='frame')

  def rows(self, x: jax.Array, d: int) -> jax.Array:
    """The rows of domain index d of a (B, ...) batch array: a static slice of each period."""
    layout = self.spec.layout
    first, count = layout.index(d), layout.count(d)
    periods = x.reshape(x.shape[0] // len(layout), len(layout), *x.shape[1:])
    return periods[:, first : first + count].reshape(-1, *x.shape[1:])

  def scatter(self, values: jax.Array, d: int, batch_size: int) -> jax.Array:
    """(B_d, ...) values of domain index d's rows -> (B, ...) with zeros in the other rows."""
    layout = self.spec.layout
    first, count = layout.index(d), layout.count(d)
    periods = values.reshape(batch_size // len(layout), count, *values.shape[1:])
    zeros = lambda n: jnp.zeros((periods.shape[0], n, *values.shape[1:]), values.dtype)
    full = jnp.concatenate([zeros(first), periods, zeros(len(layout) - first - count)], axis=1)
    return full.reshape(batch_size, *values.shape[1:])

  def domain_targets(self, params, name: str, wave: jax.Array, num_samples: jax.Array):
    """(utterance (N, C_d), frames (N, F_d, C_d) or None) of N crops of domain `name`.

    wave: (N, S) int16 at the teacher's rate; num_samples: (N,) 24 kHz samples of audio.
    """
    rate = self.spec.audio_rates[name]
    wave = sharding.constrain_batch(wave[:, : self.spec.audio_samples(name)])
    g = math.gcd(rate, audio.SAMPLE_RATE)  # ceil(n · rate / 24 kHz) in int32 without overflow
    teacher_samples = -(-num_samples.astype(jnp.int32) * (rate // g) // (audio.SAMPLE_RATE // g))
    apply = self.applies[name]
    frames, mask = apply(
      params[self.params_key[name]], wave.astype(jnp.float32) / spec_lib.PCM_SCALE, teacher_samples
    )
    frames = jax.lax.stop_gradient(frames.astype(jnp.float32))  # frozen: no gradient flows back
    utterance = masked_mean(frames, mask)
    if self.num_frames is None:
      return utterance, None
    frames = jnp.where(mask[..., None], frames, 0.0)
    wanted = self.num_frames[name]
    frames = frames[:, :wanted]
    frames = jnp.pad(frames, [(0, 0), (0, wanted - frames.shape[1]), (0, 0)])
    return utterance, frames

  def targets(self, params, batch: dict, by_layout: bool = True) -> dict:
    """{'teacher': {d: (B, C_d)}, 'teacher_frames': {d: (B, F_d, C_d)} (frame targets)}.

    by_layout: the batch follows spec.layout and each teacher runs on its own domain's rows (the
    train step); otherwise every teacher runs on every row and keeps its domain's (held-out
    batches, which are in store order).
    """
    batch_size = batch['audio'].shape[0]
    out = {'teacher': {}, 'teacher_frames': {}}
    for d, name in enumerate(self.domains):
      if by_layout:
        if d not in self.spec.layout:
          utterance = jnp.zeros((batch_size, self.spec.teacher_dims[name]), jnp.float32)
          frames = None
          if self.num_frames is not None:
            frames = utterance[:, None].repeat(self.num_frames[name], 1)
        else:
          utterance, frames = self.domain_targets(
            params, name, self.rows(batch['audio'], d), self.rows(batch['num_samples'], d)
          )
          utterance = self.scatter(utterance, d, batch_size)
          frames = None if frames is None else self.scatter(frames, d, batch_size)
      else:
        utterance, frames = self.domain_targets(params, name, batch['audio'], batch['num_samples'])
        own = batch['domain'] == d
        utterance = jnp.where(own[:, None], utterance, 0.0)
        frames = None if frames is None else jnp.where(own[:, None, None], frames, 0.0)
      out['teacher'][name] = utterance
      if frames is not None:
        out['teacher_frames'][name] = frames
    if self.num_frames is None:
      del out['teacher_frames']
    return out

  def check_batch(self, batch_size: int, mesh) -> None:
    """Every device's rows must hold whole periods of the layout (static per-domain slices)."""
    shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
    period = len(self.spec.layout)
    if batch_size % shards or (batch_size // shards) % period:
      raise ValueError(
        f'teachers.online=True: batch_size={batch_size} over the {shards} batch shards of the '
        f'mesh must give each device whole periods of {period} clips ({self.spec.layout} by '
        f'data.domains, from data.domain_weights): make batch_size a multiple of {shards * period}'
      )


def online_teachers(
  config, spec: spec_lib.BatchSpec, teachers: dict
) -> tuple[OnlineTeachers, dict]:
  """(OnlineTeachers, params {key: pytree}) for `teachers` {domain: loaded teacher}.

  Raises a ValueError naming the config field when a teacher cannot run inside jit, reads audio at
  another rate than the store keeps, or gives another width than the store's targets.
  """
  if spec.audio_rates is None or spec.layout is None:
    raise ValueError('online teachers need a batch spec with audio: set teachers.online=True')
  applies, params_key, params, first_domain = {}, {}, {}, {}
  for name in spec.domains:
    teacher = teachers[name]
    field = f'teachers.{name}.name={config.teachers[name].name!r}'
    if not callable(getattr(teacher, 'online', None)):
      raise ValueError(
        f'teachers.online=True: {field} cannot run inside the jitted train step (its teacher '
        f'{type(teacher).__name__} has no online() method); set teachers.online=False'
      )
    if teacher.spec.sample_rate != spec.audio_rates[name]:
      raise ValueError(
        f'teachers.online=True: {field} reads {teacher.spec.sample_rate} Hz audio but the store '
        f'keeps {spec.audio_rates[name]} Hz (the module SAMPLE_RATE)'
      )
    if teacher.spec.dim != spec.teacher_dims[name]:
      raise ValueError(
        f'teachers.online=True: {field} gives {teacher.spec.dim}-d features, the store '
        f'{spec.teacher_dims[name]}-d (teachers.{name}.dim)'
      )
    key = first_domain.setdefault(id(teacher), name)  # domains sharing a teacher share params
    if key == name:
      applies[name], params[name] = teacher.online()
    applies[name], params_key[name] = applies[key], key
  frames = config.repa.selection != 'none' and config.repa.granularity == 'frame'
  online = OnlineTeachers(
    domains=spec.domains,
    applies=applies,
    params_key=params_key,
    spec=spec,
    num_frames=frame_counts(config) if frames else None,
  )
  return online, params


def frame_counts(config) -> dict:
  """{domain: F_d}: teacher frames of a crop (what data/spec.py gives with teacher frames)."""
  from agrepa_jax import teachers

  return {
    d: round(config.data.clip_seconds * teachers.frames_per_second(config.teachers[d].name))
    for d in config.data.domains
  }


def replicate(params, mesh) -> dict:
  """The teachers' parameters replicated on every device of `mesh` (also across hosts: every
  process holds the same values, read from the same checkpoint)."""
  replicated = sharding.replicated(mesh)

  def place(x):
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, replicated, lambda index: host[index])

  return jax.tree.map(place, params)


def abstract_params(params, placement=None) -> dict:
  """ShapeDtypeStructs of the teachers' parameters (for aot)."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=placement), params
  )
