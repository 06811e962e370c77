"""Ahead-of-time compilation of the train step from abstract shapes: sizes and memory, no arrays.

The step compiles for this machine's devices, for a real TPU topology through libtpu's compiler
(`--topology v5p:4x4x4`, any name `jax.experimental.topologies.get_topology_desc` takes), or for
a GPU preset on as many fake CPU devices (an estimate).
"""

import collections
import importlib.util
import json
import os
import pathlib
import pickle
import re
import subprocess
import sys
import tempfile

import jax
import numpy as np
from etils import epath

from agrepa_jax import console, flops, sharding, train
from agrepa_jax import state as state_lib
from agrepa_jax.data import spec as data_spec


def teacher_dims_from_config(config) -> tuple[int, ...]:
  dims = tuple(int(config.teachers[d].dim) for d in config.data.domains)
  if not all(dims):
    raise console.UsageError(
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
  device = mesh.devices.flat[0]
  report = {
    'params_backbone': counts['backbone'],
    'params_heads': counts['repa_heads'] + counts['bitc_heads'],
    'params_repa_heads': counts['repa_heads'],
    'params_bitc_heads': counts['bitc_heads'],
    'params_blocks': counts['blocks'],
    'devices': int(np.prod(list(mesh.shape.values()))),
    'platform': device.platform,
    'device_kind': device.device_kind,
    'mesh': dict(mesh.shape),
    'batch_size': config.batch_size,
    'clip_seconds': config.data.clip_seconds,
    'remat': config.model.remat,
    'params_online_teachers': sum(x.size for x in jax.tree.leaves(teacher_params)),
    **memory_report(compiled),
    'flops_per_step': flops.config_train_step_flops(config, teacher_dims),
    'collectives': collective_report(
      compiled.as_text(), activation_dims(config, teacher_dims, mesh, shapes, shardings)
    ),
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


def chip_report(report: dict, device_kind: str) -> dict:
  """What the chip of `device_kind` makes of a compiled step's `report`: its memory (`hbm_bytes`,
  `fits`) and the roofline: the hand-counted FLOPs per chip at the dense bf16 peak, a lower bound
  of the step time (`roofline_step_seconds`; remat's recomputation and elementwise work are not
  in it). Empty for a chip not in flops.CHIPS."""
  chip = flops.chip(device_kind)
  if chip is None:
    return {}
  return {
    'hbm_bytes': int(chip.hbm_bytes),
    'fits': report['peak_bytes'] <= chip.hbm_bytes,
    'peak_flops_per_chip': chip.peak_flops,
    'roofline_step_seconds': report['flops_per_step'] / report['devices'] / chip.peak_flops,
  }


# An HLO instruction that is a collective: `%name = TYPE kind(` or `kind-start(` (async).
COLLECTIVE = re.compile(
  r'= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\('
)
SHAPE = re.compile(r'\b([a-z]+[0-9]*)\[([0-9,]*)\]')
DTYPE_BYTES = dict(pred=1, bool=1, s8=1, u8=1, bf16=2, f16=2, s16=2, u16=2, f32=4, s32=4, u32=4)
DTYPE_BYTES |= dict(f64=8, s64=8, u64=8)


def collectives(hlo: str) -> list[tuple[str, str, list[tuple[str, tuple[int, ...]]]]]:
  """(computation, kind, [(dtype, shape)] of the result) of every collective of an optimized
  HLO module; computation is 'entry' or 'loop' (any other computation: loop bodies, wrapped
  async work)."""
  found, computation = [], None
  for line in hlo.splitlines():
    if line.endswith('{') and not line.startswith(' '):
      computation = 'entry' if line.startswith('ENTRY') else 'loop'
    match = COLLECTIVE.search(line)
    if match:
      shapes = [
        (dtype, tuple(int(d) for d in dims.split(',') if d))
        for dtype, dims in SHAPE.findall(match.group(1))
      ]
      found.append((computation, match.group(2), shapes))
  return found


def activation_dims(config, teacher_dims, mesh, shapes, shardings) -> list[int]:
  """Sizes that mark an activation: the global and per-device batch, the frames and tokens of a
  clip; less any size that a parameter's shape or its per-device shard has, and 1 (they would
  mark weights too)."""
  spec = data_spec.batch_spec(config, dict(zip(config.data.domains, teacher_dims)))
  shards = mesh.shape['data'] * mesh.shape['fsdp']
  sizes = {config.batch_size, config.batch_size // shards, spec.num_frames, spec.num_tokens}
  weights = set()
  for x, placement in zip(jax.tree.leaves(shapes.params), jax.tree.leaves(shardings.params)):
    weights.update(x.shape, placement.shard_shape(x.shape))
  return sorted(sizes - weights - {0, 1})


def collective_report(hlo: str, activation_sizes: list[int]) -> dict:
  """Collectives of the optimized step: per kind the count (`in_loops`: inside the depth scans,
  run once per layer) and the largest result; `moving_activations` lists those whose shape has an
  activation size (none where the sharding moves weights only)."""
  kinds = collections.defaultdict(
    lambda: {'count': 0, 'in_loops': 0, 'largest': '', 'largest_bytes': 0}
  )
  moving = []
  for computation, kind, shapes in collectives(hlo):
    entry = kinds[kind]
    entry['count'] += 1
    entry['in_loops'] += computation == 'loop'
    for dtype, shape in shapes:
      size = DTYPE_BYTES.get(dtype, 4) * int(np.prod(shape))
      if size > entry['largest_bytes']:
        entry.update(largest_bytes=size, largest=f'{dtype}[{",".join(map(str, shape))}]')
    if any(set(activation_sizes) & set(shape) for _, shape in shapes):
      moving.append(f'{kind} {" ".join(f"{d}{list(s)}" for d, s in shapes)}')
  return {
    'by_kind': dict(kinds),
    'activation_sizes': activation_sizes,
    'moving_activations': moving,
  }


def topology_devices(name: str) -> list:
  """The compile-only TPU devices of topology `name` (e.g. 'v5p:4x4x4', 'v5e:8x8', 'v6e:4x4');
  libtpu's compiler runs on this host, no TPU needed. libtpu holds /tmp/libtpu_lockfile while
  its process lives: a second one on the host fails unless ALLOW_MULTIPLE_LIBTPU_LOAD=1 (safe
  where the host has no TPU)."""
  if importlib.util.find_spec('libtpu') is None:
    raise console.UsageError(
      f'--topology={name}: compiling for a TPU topology needs libtpu (pip install -e ".[tpu]")'
    )
  from jax.experimental import topologies

  try:
    return topologies.get_topology_desc(name, 'tpu').devices
  except Exception as e:  # libtpu's errors are XlaRuntimeErrors of any kind
    raise console.UsageError(
      f'--topology={name!r}: libtpu made no topology of it (names: v5p:2x2x4, v5e:8x8, ...): {e}'
    ) from e


def preset_config(config, name: str):
  """`config` on the mesh of preset `name` (config.mesh.presets), and the preset."""
  if name not in config.mesh.presets:
    raise console.UsageError(
      f'mesh.aot_presets: {name!r} is not one of mesh.presets {sorted(config.mesh.presets)}'
    )
  preset = config.mesh.presets[name]
  config = config.copy_and_resolve_references()
  config.mesh.update(data=preset.data, fsdp=preset.fsdp, tensor=preset.tensor)
  return config, preset


def preset_report(config, name: str) -> dict:
  """Compiles the step for GPU preset `name` in a subprocess with that many CPU devices.

  The sizes are XLA's CPU buffer assignment for the preset's mesh and per-device batch: an
  estimate of the GPU's (fusion differs, layouts and padding of the real chip are not modelled),
  good to tell a config that fits from one that does not by a margin. TPUs compile for real
  (`run` with a topology).
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
  return {
    **report,
    'preset': name,
    'estimate': f'XLA CPU buffer assignment on {preset.devices} fake devices',
    **chip_report(report, preset.device_kind),
  }


def run(config, workdir: epath.Path, topology: str = '') -> dict:
  """aot.json: the step compiled for TPU `topology` (libtpu's compiler: per-chip memory, whether
  it fits the chip, the collectives, the roofline) or else this machine's devices, and for each
  of mesh.aot_presets."""
  _, report = compile_train_step(config, topology_devices(topology) if topology else None)
  report.update(chip_report(report, report['device_kind']))
  if topology:
    report['topology'] = topology
  report['presets'] = {name: preset_report(config, name) for name in config.mesh.aot_presets}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / 'aot.json').write_text(json.dumps(report, indent=2))
  return report


if __name__ == '__main__':  # preset_report's subprocess: CONFIG_PICKLE REPORT_JSON
  _config = pickle.loads(pathlib.Path(sys.argv[1]).read_bytes())
  pathlib.Path(sys.argv[2]).write_text(json.dumps(compile_train_step(_config)[1]))
