"""Ahead-of-time compilation of the train step from abstract shapes: sizes and memory, no arrays."""

import json
import os
import pathlib
import pickle
import subprocess
import sys
import tempfile

import jax
import numpy as np
from etils import epath

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


def online_teachers(config, teacher_dims, mesh):
  """With teachers.online: (OnlineTeachers, (abstract replicated teacher parameters,)); the
  teachers are loaded (their checkpoints must be readable), only their shapes are kept."""
  if not config.teachers.online:
    return None, ()
  from agrepa_jax.data import prepare
  from agrepa_jax.teachers import online as online_lib

  spec = data_spec.batch_spec(config, dict(zip(config.data.domains, teacher_dims)))
  online, params = online_lib.online_teachers(config, spec, prepare.load_teachers(config))
  online.check_batch(config.batch_size, mesh)
  return online, (online_lib.abstract_params(params, sharding.replicated(mesh)),)


def compile_train_step(config, devices=None):
  """Lowers and compiles the train step on the configured mesh over `devices` (default: all).

  Returns (compiled, report)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  teacher_dims = teacher_dims_from_config(config)
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, shapes, shardings = state_lib.sharded_shapes(config, teacher_dims, tx, mesh)
  online, teacher_params = online_teachers(config, teacher_dims, mesh)
  batch_spec = data_spec.batch_spec(config, dict(zip(config.data.domains, teacher_dims)))
  step_cfg = train.StepConfig.from_config(config, batch_spec)
  step = train.jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh, online)
  compiled = step.lower(
    state_lib.abstract_with_shardings(shapes, shardings),
    abstract_batch(config, teacher_dims, mesh),
    *teacher_params,
  ).compile()
  counts = state_lib.param_counts(shapes)
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
    'clip_seconds': config.data.clip_seconds,
    'remat': config.model.remat,
    'params_online_teachers': sum(x.size for x in jax.tree.leaves(teacher_params)),
    **memory_report(compiled),
  }
  return compiled, report


def memory_report(compiled) -> dict[str, int]:
  """Per-device bytes of the compiled step; peak = arguments + outputs − donated aliases + temps."""
  memory = compiled.memory_analysis()
  report = {
    'argument_bytes': int(memory.argument_size_in_bytes),
    'output_bytes': int(memory.output_size_in_bytes),
    'temp_bytes': int(memory.temp_size_in_bytes),
    'alias_bytes': int(memory.alias_size_in_bytes),
  }
  report['peak_bytes'] = (
    report['argument_bytes'] + report['output_bytes'] - report['alias_bytes'] + report['temp_bytes']
  )
  return report


def preset_config(config, name: str):
  """`config` on the mesh of preset `name` (config.mesh.presets), and the preset."""
  if name not in config.mesh.presets:
    raise ValueError(
      f'mesh.aot_presets: {name!r} is not one of mesh.presets {sorted(config.mesh.presets)}'
    )
  preset = config.mesh.presets[name]
  config = config.copy_and_resolve_references()
  config.mesh.update(data=preset.data, fsdp=preset.fsdp, tensor=preset.tensor)
  return config, preset


def preset_report(config, name: str) -> dict:
  """Compiles the step for preset `name` in a subprocess with that many CPU devices.

  The sizes are XLA's CPU buffer assignment for the preset's mesh and per-device batch: an
  estimate of the accelerator's (fusion differs, layouts and padding of the real chip are not
  modelled), good to tell a config that fits from one that does not by a margin.
  """
  config, preset = preset_config(config, name)
  with tempfile.TemporaryDirectory() as scratch:
    config_path, report_path = (
      pathlib.Path(scratch, 'config.pkl'),
      pathlib.Path(scratch, 'out.json'),
    )
    config_path.write_bytes(pickle.dumps(config))
    env = {
      **os.environ,
      'JAX_PLATFORMS': 'cpu',
      'XLA_FLAGS': f'--xla_force_host_platform_device_count={preset.devices}',
    }
    subprocess.run(
      [sys.executable, '-m', 'agrepa_jax.aot', str(config_path), str(report_path)],
      env=env,
      check=True,
    )
    report = json.loads(report_path.read_text())
  hbm = int(preset.hbm_gb * 1e9)
  return {**report, 'preset': name, 'hbm_bytes': hbm, 'fits': report['peak_bytes'] <= hbm}


def run(config, workdir: epath.Path) -> dict:
  """aot.json: the step compiled on this machine's devices, and on each of mesh.aot_presets."""
  _, report = compile_train_step(config)
  report['presets'] = {name: preset_report(config, name) for name in config.mesh.aot_presets}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'aot.json').write_text(json.dumps(report, indent=2))
  return report


if __name__ == '__main__':  # preset_report's subprocess: CONFIG_PICKLE REPORT_JSON
  _config = pickle.loads(pathlib.Path(sys.argv[1]).read_bytes())
  pathlib.Path(sys.argv[2]).write_text(json.dumps(compile_train_step(_config)[1]))
