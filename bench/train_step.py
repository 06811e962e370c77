"""Train-step throughput: one JSON line per config, on whatever devices JAX sees (CPU, GPU, TPU).

  python bench/train_step.py [--steps 10] [--configs default,paper_width]

Per config: compile seconds, steps/s, clips/s, the compiled step's FLOPs (XLA cost analysis) and
achieved FLOP/s, per-device memory (the allocator's peak where the device reports it, else the
compiled step's), MFU against the chip's peak where it is known (GPU/TPU), and on CPU the achieved
FLOP/s as a fraction of a large matmul's FLOP/s measured in the same run (the practical peak).
`fog_a_fraction` is the share of training time that online AG-REPA spends re-measuring FoG-A
every repa.probe_every steps. Batches are random arrays of the right shapes: no data is read.
"""

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from agrepa_jax import aot, audio, config_base, selection, sharding, train
from agrepa_jax import state as state_lib

# dense bf16 peak FLOP/s per chip, by the start of jax's device_kind
PEAK_FLOPS = {
  'NVIDIA H100': 989e12,
  'NVIDIA H200': 989e12,
  'NVIDIA A100': 312e12,
  'TPU v4': 275e12,
  'TPU v5 lite': 197e12,
  'TPU v5': 459e12,
  'TPU v6 lite': 918e12,
}
TEACHER_DIMS = {'speech': 384, 'audio': 384}  # Whisper tiny.en, the default config's teacher


def default_config():
  return config_base.config_from_file('configs/default.py')


def paper_width_config():
  """The paper's width, heads and token vocabulary with 4 blocks, 2 s clips, batch 8."""
  config = default_config()
  config.model.update(
    num_layers=4, width=1024, num_heads=16, token_dim=1024, vocab_size=4096, time_freq_dim=256
  )
  config.batch_size = 8
  return config


def paper_day_config():
  """configs/paper_day.py: 12 blocks × 512, batch 64 of 10 s clips, bf16, full remat."""
  return config_base.config_from_file('configs/paper_day.py')


# paper_day is for accelerators: it is not in the default --configs.
CONFIGS = {
  'default': default_config,
  'paper_width': paper_width_config,
  'paper_day': paper_day_config,
}


def with_bench_settings(config):
  for d in config.data.domains:
    config.teachers[d].dim = TEACHER_DIMS[d]
  config.mesh.update(data=-1, fsdp=1, tensor=1)
  return config


def random_batch(config, mesh, seed: int = 0) -> dict:
  """Host arrays of one global batch of random clips with the batch contract's shapes."""
  rng = np.random.default_rng(seed)
  abstract = aot.abstract_batch(config, aot.teacher_dims_from_config(config), mesh)
  full_clip = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  ranges = {
    'domain': (0, len(config.data.domains)),
    'tokens': (0, config.model.vocab_size),
    'num_samples': (full_clip // 2, full_clip + 1),
  }

  def fill(path, spec):
    name = path[0].key
    if name in ranges:
      return rng.integers(*ranges[name], spec.shape).astype(spec.dtype)
    return rng.standard_normal(spec.shape).astype(spec.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


class RandomClips:
  """A held-out split of random clips: what selection.OnlineFogA reads."""

  def __init__(self, config, mesh, num_clips: int):
    batch = random_batch(config, mesh, seed=1)
    self.rows = [
      jax.tree.map(lambda x, i=i: x[i % config.batch_size], batch) for i in range(num_clips)
    ]
    self.arrays = {'domain': np.asarray([r['domain'] for r in self.rows])}

  def __getitem__(self, i):
    return self.rows[i]

  def __len__(self):
    return len(self.rows)


def matmul_flops_per_second(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of an n×n matmul on the first device: the practical peak a step can reach there."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    matmul(a).block_until_ready()
  return 2 * n**3 * repeats / (time.perf_counter() - start)


def peak_memory_bytes(compiled) -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'allocator'
  return aot.memory_report(compiled)['peak_bytes'], 'compiled'


def fog_a_seconds(config, state, graphdef, mesh) -> float:
  """Seconds of one online FoG-A re-measurement (after its compilation) on random probe clips."""
  online = selection.OnlineFogA(config, RandomClips(config, mesh, config.probe.num_clips))
  jax.block_until_ready(online.reselect(state, graphdef, mesh).lambdas)
  start = time.perf_counter()
  jax.block_until_ready(online.reselect(state, graphdef, mesh).lambdas)
  return time.perf_counter() - start


def bench(name: str, config, steps: int, matmul_peak: float) -> dict:
  mesh = sharding.make_mesh(config.mesh)
  teacher_dims = aot.teacher_dims_from_config(config)
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, shardings = state_lib.sharded_init(config, teacher_dims, tx, mesh)
  step_fn = train.jit_train_step(
    graphdef, tx, schedule, train.StepConfig.from_config(config), shardings, mesh
  )
  batch = sharding.global_batch(random_batch(config, mesh), mesh)
  start = time.perf_counter()
  compiled = step_fn.lower(state, batch).compile()
  compile_seconds = time.perf_counter() - start
  flops = float(compiled.cost_analysis().get('flops', 0.0))  # per device

  state, parts = compiled(state, batch)  # one untimed step: buffers allocated, caches warm
  jax.block_until_ready(parts)
  start = time.perf_counter()
  for _ in range(steps):
    state, parts = compiled(state, batch)
  jax.block_until_ready(parts)
  step_seconds = (time.perf_counter() - start) / steps

  device = jax.devices()[0]
  achieved = flops / step_seconds
  peak = next((v for k, v in PEAK_FLOPS.items() if device.device_kind.startswith(k)), None)
  memory, memory_source = peak_memory_bytes(compiled)
  fog_a = fog_a_seconds(config, state, graphdef, mesh)
  every = config.repa.probe_every
  return {
    'config': name,
    'device': device.device_kind,
    'devices': jax.device_count(),
    'num_layers': config.model.num_layers,
    'width': config.model.width,
    'batch_size': config.batch_size,
    'clip_seconds': config.data.clip_seconds,
    'dtype': config.model.dtype,
    'remat': config.model.remat,
    'compile_seconds': round(compile_seconds, 2),
    'step_seconds': round(step_seconds, 4),
    'steps_per_second': round(1 / step_seconds, 3),
    'clips_per_second': round(config.batch_size / step_seconds, 2),
    'flops_per_step_per_device': flops,
    'achieved_flops_per_second': achieved,
    'mfu': None if peak is None else achieved / peak,
    'matmul_flops_per_second': matmul_peak,
    'fraction_of_matmul': achieved / matmul_peak,
    'peak_memory_bytes': memory,
    'peak_memory_source': memory_source,
    'fog_a_seconds': round(fog_a, 3),
    'fog_a_fraction': fog_a / (every * step_seconds + fog_a),
    'probe_every': every,
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--configs', default='default,paper_width')
  args = parser.parse_args(argv)
  matmul_peak = matmul_flops_per_second()
  for name in args.configs.split(','):
    config = with_bench_settings(CONFIGS[name]())
    print(json.dumps(bench(name, config, args.steps, matmul_peak)), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
