"""The interface every frozen teacher (Whisper, BEATs, ...) offers to training, probes, features."""

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
  name: str  # e.g. 'whisper-tiny.en', 'whisper-large-v3', 'beats-iter3-as2m'
  dim: int  # feature width C_d
  sample_rate: int  # rate the teacher's audio input must have
  frames_per_second: float
  max_seconds: float = 0.0  # the longest input it takes at once (Whisper: 30 s); 0 = any


class Teacher(Protocol):
  spec: TeacherSpec

  def features(self, audio: np.ndarray, num_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Frame features of a batch.

    audio: (B, N) float32 at spec.sample_rate, zero-padded past each clip's num_samples (B,); a
      numpy array or a jax.Array (possibly sharded over the batch, which must then stay sharded).
    Returns (B, F, dim) float32 features and a (B, F) bool mask of the frames that hold audio
    (not padding), so that utterance means pool only real frames.
    """
    ...


class OnlineTeacher(Teacher, Protocol):
  """A teacher that can also run inside a jitted step (teachers.online=True)."""

  def online(self) -> tuple[Callable, Any]:
    """(apply, params): apply(params, audio, num_samples) -> (frames, mask) as `features` gives
    them, a pure function of jax arrays that traces (audio (B, N) float32 with N static,
    num_samples (B,) int32); params the teacher's arrays (a pytree), passed in by the caller."""
    ...


def masked_mean(frames, mask):
  """(B, F, C), (B, F) -> (B, C): mean over the frames that hold audio (numpy or jax arrays)."""
  weights = mask.astype(frames.dtype)[..., None]
  return (frames * weights).sum(1) / weights.sum(1).clip(1.0)
