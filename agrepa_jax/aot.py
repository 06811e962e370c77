"""Ahead-of-time compilation of the train step from abstract shapes: sizes and memory, no arrays."""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax import audio, sharding, train
from agrepa_jax.model import count_params

TEACHER_FRAMES_PER_SECOND = {
  'whisper': 50.0,
  'beats': 100 / 16,
}  # encoder frames / BEATs patch columns


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
      config.data.clip_seconds * TEACHER_FRAMES_PER_SECOND[config.teachers[d].name]
    )
    batch['teacher_frames'] = {
      d: spec((b, frames_of(d), dim), jnp.float32)
      for d, dim in zip(config.data.domains, teacher_dims)
    }
  return batch


def compile_train_step(config):
  """Lowers and compiles the train step on the configured mesh. Returns (compiled, report)."""
  mesh = sharding.make_mesh(config.mesh)
  teacher_dims = teacher_dims_from_config(config)
  tx, schedule = train.make_optimizer(config)
  graphdef, shapes = train.abstract_state(config, teacher_dims, tx)
  shardings = train.state_shardings(shapes, mesh, config.mesh.fsdp_min_size)
  step = train.jit_train_step(
    graphdef, tx, schedule, train.StepConfig.from_config(config), shardings, mesh
  )
  compiled = step.lower(
    train.abstract_with_shardings(shapes, shardings), abstract_batch(config, teacher_dims, mesh)
  ).compile()
  params = nnx.State.merge(shapes.params, shapes.frozen)
  memory = compiled.memory_analysis()
  report = {
    'params_backbone': count_params(params['backbone']),
    'params_heads': count_params(params['repa_heads']) + count_params(params['bitc_heads']),
    'params_repa_heads': count_params(params['repa_heads']),
    'params_bitc_heads': count_params(params['bitc_heads']),
    'params_blocks': count_params(params['backbone']['blocks']),
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
