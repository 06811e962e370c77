"""The one specification of a batch: every key's shape and dtype, derived from the config.

aot compiles against it, the reader crops and pads records into it, and the test fakes write
records that fit it, so the layout is written down once:

  mel (B, T, n_mels) bf16 (the loss casts it to float32 on the device), T = frames of clip_seconds
  at 24 kHz; num_samples (B,) int32 (24 kHz samples of real audio in the crop); domain (B,) int32;
  tokens (B, K, N) int32, N = round(clip_seconds · token_rate); teacher {domain: (B, C_d)
  float32}; with teacher frames, teacher_frames (B, F, C) bf16: each row its own domain's
  (F_d, C_d) frames, F_d = round(clip_seconds · fps_d), zero-padded to the largest F_d and C_d
  (unpack_frames gives the per-domain views on the device); with online teachers
  (teachers.online), audio (B, S) int16: each row's crop at its own domain's teacher rate r_d
  (PCM, 1.0 = 2**15), S the longest crop S_d = round(clip_seconds · r_d) over the domains, zero
  past the row's audio and past S_d.

With online teachers the rows also follow a fixed layout: row i holds a clip of domain
layout[i % K] (`domain_layout`), so each domain's rows are a static slice of the batch.
"""

import dataclasses
import math

import ml_dtypes
import numpy as np

from agrepa_jax import audio
from agrepa_jax.data import DataError


@dataclasses.dataclass(frozen=True)
class BatchSpec:
  """Shapes (without the batch axis) of one clip of a batch."""

  num_frames: int  # T: mel frames of a crop
  n_mels: int
  num_samples: int  # 24 kHz samples of a crop
  num_codebooks: int  # K
  num_tokens: int  # N: tokens of a crop
  token_rate: float  # tokens per second
  teacher_dims: dict  # {domain: C_d}
  teacher_frames: dict | None  # {domain: F_d} frames per crop, or None (utterance targets only)
  teacher_rates: dict  # {domain: teacher frames per second}
  audio_rates: dict | None = None  # online teachers: {domain: audio rate of its teacher}, or None
  layout: tuple[int, ...] | None = None  # online teachers: domain index of row i % len(layout)

  @property
  def domains(self) -> tuple[str, ...]:
    return tuple(self.teacher_dims)

  def audio_samples(self, domain: str) -> int:
    """S_d: samples of a crop at the rate of `domain`'s teacher."""
    return round(self.num_samples * self.audio_rates[domain] / audio.SAMPLE_RATE)

  @property
  def frame_shapes(self) -> tuple[tuple[str, int, int], ...]:
    """(domain, F_d, C_d) of each domain's teacher frames in a crop; () without frames."""
    if self.teacher_frames is None:
      return ()
    return tuple((d, self.teacher_frames[d], c) for d, c in self.teacher_dims.items())

  @property
  def packed_frames(self) -> tuple[int, int]:
    """(F, C) of a row's packed teacher frames: the largest F_d and C_d over the domains."""
    return max(f for _, f, _ in self.frame_shapes), max(c for _, _, c in self.frame_shapes)

  @property
  def audio_length(self) -> int:
    """S: the audio columns of a batch, the longest S_d."""
    return max(self.audio_samples(d) for d in self.domains)

  def shapes(self, batch_size: int) -> dict:
    """{key: (shape, dtype)} of a batch of `batch_size` clips, nested like the batch."""
    b = batch_size
    out = {
      'mel': ((b, self.num_frames, self.n_mels), ml_dtypes.bfloat16),  # cast on the device
      'num_samples': ((b,), np.int32),
      'domain': ((b,), np.int32),
      'tokens': ((b, self.num_codebooks, self.num_tokens), np.int32),
      'teacher': {d: ((b, c), np.float32) for d, c in self.teacher_dims.items()},
    }
    if self.teacher_frames is not None:  # each row its own domain's frames, packed
      out['teacher_frames'] = ((b, *self.packed_frames), ml_dtypes.bfloat16)
    if self.audio_rates is not None:
      out['audio'] = ((b, self.audio_length), np.int16)
    return out


def unpack_frames(packed, frame_shapes) -> dict:
  """(B, F, C) packed bf16 teacher frames -> {domain: (B, F_d, C_d) float32} views; a row's values
  mean something only for its own domain (the losses weigh rows by domain)."""
  return {d: packed[:, :f, :c].astype(np.float32) for d, f, c in frame_shapes}


def crop_samples(seconds: float) -> int:
  return round(seconds * audio.SAMPLE_RATE)


def token_count(seconds: float, token_rate: float) -> int:
  """Tokens of `seconds` of audio at `token_rate` per second (at least one)."""
  return max(1, round(seconds * token_rate))


def batch_spec(config, teacher_dims: dict) -> BatchSpec:
  """The batch layout of `config` with teacher widths {domain: C_d}."""
  from agrepa_jax import teachers

  data = config.data
  samples = crop_samples(data.clip_seconds)
  rates = {d: teachers.frames_per_second(config.teachers[d].name) for d in data.domains}
  frames = data.teacher_frames
  online = bool(config.teachers.online)
  return BatchSpec(
    num_frames=audio.num_frames(samples),
    n_mels=config.model.n_mels,
    num_samples=samples,
    num_codebooks=config.model.num_codebooks,
    num_tokens=token_count(data.clip_seconds, data.token_rate),
    token_rate=float(data.token_rate),
    teacher_dims={d: int(teacher_dims[d]) for d in data.domains},
    teacher_frames={d: round(data.clip_seconds * r) for d, r in rates.items()} if frames else None,
    teacher_rates=rates,
    audio_rates={d: teachers.sample_rate(config.teachers[d].name) for d in data.domains}
    if online
    else None,
    layout=domain_layout(data.domain_weights) if online else None,
  )


PCM_SCALE = 2.0**15  # int16 audio: sample / PCM_SCALE is the waveform in [-1, 1]


def to_pcm16(wave: np.ndarray) -> np.ndarray:
  """float waveform in [-1, 1] -> int16 PCM (rounded, clipped)."""
  return np.clip(np.round(np.asarray(wave, np.float32) * PCM_SCALE), -(2**15), 2**15 - 1).astype(
    np.int16
  )


MAX_PERIOD = 64


def domain_layout(domain_weights) -> tuple[int, ...]:
  """The fixed row layout of online-teacher batches: data.domain_weights as whole counts per
  domain, domain-major, e.g. (1, 1) -> (0, 1), (3, 1) -> (0, 0, 0, 1); zero weights get no row."""
  weights = [float(w) for w in domain_weights]
  smallest = min((w for w in weights if w > 0), default=0.0)
  counts = [w / smallest if smallest else 0.0 for w in weights]
  if not smallest or any(abs(c - round(c)) > 1e-6 for c in counts) or sum(counts) > MAX_PERIOD:
    raise DataError(
      f'teachers.online=True gives every batch fixed per-domain counts, so data.domain_weights='
      f'{tuple(weights)} must be a whole-number ratio, e.g. (1, 1) or (3, 1), of at most '
      f'{MAX_PERIOD} clips in all'
    )
  counts = [round(c) for c in counts]
  divisor = math.gcd(*counts)
  return tuple(d for d, c in enumerate(counts) for _ in range(c // divisor))


def zeros(spec: BatchSpec, batch_size: int) -> dict:
  """An all-zero batch of the spec (numpy)."""
  return map_shapes(lambda shape, dtype: np.zeros(shape, dtype), spec.shapes(batch_size))


def map_shapes(fn, shapes: dict) -> dict:
  """Applies fn(shape, dtype) to every leaf of a `BatchSpec.shapes` tree."""
  return {k: map_shapes(fn, v) if isinstance(v, dict) else fn(*v) for k, v in shapes.items()}
