"""Ahead-of-time compilation of the train step from abstract shapes: sizes and memory, no arrays."""

import json
import pathlib

import jax
import numpy as np

from agrepa_jax import sharding, train
from agrepa_jax import state as state_lib
from agrepa_jax.data import spec as data_spec


def teacher_dims_from_config(config) -> tuple[int, ...]:
  dims = tuple(int(config.teachers[d].dim) for d in config.data.domains)
  if not all(dims):
    raise ValueError(
      'aot needs every teachers.<domain>.dim set (e.g. 1280 for Whisper large-v3, 768 for BEATs)'
    )
  return dims


def abstract_batch(config, teacher_dims, mesh):
  """ShapeDtypeStructs of one global batch (data.spec), sharded over the batch axes."""
  batch_spec = data_spec.batch_spec(config, dict(zip(config.data.domains, teacher_dims)))
  return data_spec.map_shapes(
    lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding.batch_sharding(mesh)),
    batch_spec.shapes(config.batch_size),
  )


def compile_train_step(config):
  """Lowers and compiles the train step on the configured mesh. Returns (compiled, report)."""
  mesh = sharding.make_mesh(config.mesh)
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
