"""Ahead-of-time compilation of the train step from abstract shapes: sizes and memory, no arrays."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from agrepa_jax import audio, sharding, teachers, train
from agrepa_jax import state as state_lib


def teacher_dims_from_config(config) -> tuple[int, ...]:
  dims = tuple(int(config.teachers[d].dim) for d in config.data.domains)
  if not all(dims):
    raise ValueError(
      'aot needs every teachers.<domain>.dim set (e.g. 1280 for Whisper large-v3, 768 for BEATs)'
    )
  return dims


def abstract_batch(config, teacher_dims, mesh):
  """ShapeDtypeStructs of one global batch, sharded over the batch axes."""
  b = config.batch_size
  num_samples = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  frames = audio.num_frames(num_samples)
  num_tokens = max(1, round(config.data.clip_seconds * config.data.token_rate))
  spec = lambda shape, dtype: jax.ShapeDtypeStruct(
    shape, dtype, sharding=sharding.batch_sharding(mesh)
  )
  batch = {
    'mel': spec((b, frames, config.model.n_mels), jnp.float32),
    'num_samples': spec((b,), jnp.int32),
    'domain': spec((b,), jnp.int32),
    'tokens': spec((b, config.model.num_codebooks, num_tokens), jnp.int32),
    'teacher': {
      d: spec((b, dim), jnp.float32) for d, dim in zip(config.data.domains, teacher_dims)
    },
  }
  if config.repa.granularity == 'frame':
    frames_of = lambda d: round(
      config.data.clip_seconds * teachers.frames_per_second(config.teachers[d].name)
    )
    batch['teacher_frames'] = {
      d: spec((b, frames_of(d), dim), jnp.float32)
      for d, dim in zip(config.data.domains, teacher_dims)
    }
  return batch


def compile_train_step(config, devices=None):
  """Lowers and compiles the train step on the configured mesh over `devices` (default: all).

  Returns (compiled, report)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  teacher_dims = teacher_dims_from_config(config)
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, shapes, shardings = state_lib.sharded_shapes(config, teacher_dims, tx, mesh)
  step = train.jit_train_step(
    graphdef, tx, schedule, train.StepConfig.from_config(config), shardings, mesh
  )
  compiled = step.lower(
    state_lib.abstract_with_shardings(shapes, shardings),
    abstract_batch(config, teacher_dims, mesh),
  ).compile()
  counts = state_lib.param_counts(shapes)
  memory = compiled.memory_analysis()
  report = {
    'params_backbone': counts['backbone'],
    'params_heads': counts['repa_heads'] + counts['bitc_heads'],
    'params_repa_heads': counts['repa_heads'],
    'params_bitc_heads': counts['bitc_heads'],
    'params_blocks': counts['blocks'],
    'devices': int(np.prod(list(mesh.shape.values()))),
    'platform': jax.devices()[0].platform,
    'mesh': dict(mesh.shape),
    'batch_size': config.batch_size,
    'argument_bytes': int(memory.argument_size_in_bytes),
    'output_bytes': int(memory.output_size_in_bytes),
    'temp_bytes': int(memory.temp_size_in_bytes),
    'alias_bytes': int(memory.alias_size_in_bytes),
  }
  return compiled, report


def run(config, workdir: pathlib.Path) -> dict:
  _, report = compile_train_step(config)
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'aot.json').write_text(json.dumps(report, indent=2))
  return report
