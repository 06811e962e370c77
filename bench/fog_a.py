"""FoG-A cost: one prefix-shared probe (all L+1 gate settings, one t) against one forward pass and
the naive loop of L+1 forward calls, on the default model and on a 24-layer narrow model.

python bench/fog_a.py [--batch 16] [--repeats 5] [--chunk-sizes 1,2,4]

Every measured function runs once per round, round after round, so that a shared machine's load
falls alike on all of them; each time is the fastest round's. The probe runs at every chunk size
given (lanes side by side; which is fastest depends on the device and the model) and the fastest
counts. The probe sees clips with valid-length masks, as in training. Prints a line per model and,
last, a JSON object for both: forward_equivalents (probe time / forward time; the prefix-sharing
floor is (L + 1) / 2 block-stack passes, targets 3.0 at the default and 13.5 at L = 24), its spread
over the rounds (the per-round ratios' min, median and max), the same ratio of CPU seconds
(cpu_time: steadier than wall time on a shared machine), the figure recorded in
docs/figures.md and the ratio of the two (regression > 1: slower than recorded), speedup_vs_naive
(naive loop time / probe time) and chunk_size.
"""

import argparse
import importlib.util
import json
import pathlib
import re
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from agrepa_jax import audio
from agrepa_jax.model import DiT, ModelConfig
from agrepa_jax.probe import batch as probe_batch
from agrepa_jax.probe import fog_a

T_PROBE = 0.5
ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / 'configs' / 'default.py'
FIGURES = ROOT / 'docs' / 'figures.md'
TARGETS = {'default': 3.0, 'deep_narrow': 13.5}  # forward-equivalents (issue: FoG-A at its floor)


def default_config():
  spec = importlib.util.spec_from_file_location('default_config', DEFAULT_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def model_configs() -> dict[str, ModelConfig]:
  base = ModelConfig.from_config(default_config().model)
  narrow = dict(num_layers=24, width=64, num_heads=4, token_dim=64)
  return {'default': base, 'deep_narrow': ModelConfig(**{**base.__dict__, **narrow})}


def probe_batch_for(cfg: ModelConfig, size: int, seed: int = 0) -> dict:
  data = default_config().data
  num_samples = round(data.clip_seconds * audio.SAMPLE_RATE)
  num_tokens = max(1, round(data.clip_seconds * data.token_rate))
  k = jax.random.split(jax.random.key(seed), 2)
  return {
    'mel': jax.random.normal(k[0], (size, audio.num_frames(num_samples), cfg.n_mels)),
    'tokens': jax.random.randint(k[1], (size, cfg.num_codebooks, num_tokens), 0, cfg.vocab_size),
    'domain': jnp.arange(size) % 2,
    'num_samples': jnp.full((size,), num_samples),
  }


def recorded_forward_equivalents(figures: pathlib.Path = FIGURES) -> dict[str, float]:
  """The forward-equivalents docs/figures.md records for the default and the 24-layer model."""
  row = next(line for line in figures.read_text().splitlines() if 'python bench/fog_a.py' in line)
  default = re.search(r'default model[^:]*: ([0-9.]+) forward-equivalents', row)
  deep = re.search(r'24 layers[^:]*: ([0-9.]+) forward-equivalents', row)
  return {'default': float(default.group(1)), 'deep_narrow': float(deep.group(1))}


def interleaved_seconds(runs: dict, repeats: int) -> tuple[dict, dict]:
  """Wall and CPU seconds (all threads of the process) of every run in each of `repeats` rounds;
  each round runs every function once. On a shared machine the CPU seconds vary far less."""
  for run in runs.values():
    jax.block_until_ready(run())  # compile and warm up
  wall, cpu = {name: [] for name in runs}, {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      start, start_cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(run())
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(time.process_time() - start_cpu)
  return wall, cpu


def measure(cfg: ModelConfig, batch_size: int, repeats: int, chunk_sizes: list[int]) -> dict:
  dit = DiT(cfg, nnx.Rngs(0))
  batch = probe_batch_for(cfg, batch_size)
  noise = probe_batch.clip_noise(jax.random.key(1), batch_size, batch['mel'].shape[1:])
  graphdef, state = nnx.split(dit)
  inputs = probe_batch.model_inputs(batch, T_PROBE, noise, 0.15)
  forward = jax.jit(lambda state, gates: nnx.merge(graphdef, state)(**inputs, gates=gates)[0])
  masks = [jnp.ones(cfg.num_layers)] + [
    1.0 - jnp.eye(cfg.num_layers)[i] for i in range(cfg.num_layers)
  ]
  runs = {
    'forward': lambda: forward(state, masks[0]),
    'naive_loop': lambda: [forward(state, g) for g in masks],
    'naive_vmapped': lambda: fog_a.naive_clip_scores(dit, batch, T_PROBE, noise),
    **{
      f'fog_a_chunk{c}': lambda c=c: fog_a.clip_scores(dit, batch, T_PROBE, noise, chunk_size=c)
      for c in chunk_sizes
    },
  }
  rounds, cpu_rounds = interleaved_seconds(runs, repeats)
  seconds = {name: min(times) for name, times in rounds.items()}
  chunk_size = min(chunk_sizes, key=lambda c: seconds[f'fog_a_chunk{c}'])
  probe = f'fog_a_chunk{chunk_size}'
  per_round = sorted(p / f for p, f in zip(rounds[probe], rounds['forward']))
  return {
    'layers': cfg.num_layers,
    'width': cfg.width,
    **{f'{k}_ms': 1e3 * v for k, v in seconds.items()},
    'chunk_size': chunk_size,
    'forward_equivalents': seconds[probe] / seconds['forward'],
    'forward_equivalents_spread': [per_round[0], statistics.median(per_round), per_round[-1]],
    'forward_equivalents_cpu': min(cpu_rounds[probe]) / min(cpu_rounds['forward']),
    'floor_forward_equivalents': (cfg.num_layers + 1) / 2,
    'speedup_vs_naive': seconds['naive_loop'] / seconds[probe],
    'speedup_vs_naive_vmapped': seconds['naive_vmapped'] / seconds[probe],
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument(
    '--chunk-sizes', default='1,2,4', help='comma-separated lanes per chunk to try'
  )
  args = parser.parse_args()
  chunk_sizes = [int(c) for c in args.chunk_sizes.split(',')]
  print(
    f'device: {jax.devices()[0].device_kind}, batch {args.batch}, t={T_PROBE}, '
    f'chunk sizes {chunk_sizes}'
  )
  results = {}
  for name, cfg in model_configs().items():
    results[name] = measure(cfg, args.batch, args.repeats, chunk_sizes)
    print(
      name,
      json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in results[name].items()}),
      flush=True,
    )
  recorded = recorded_forward_equivalents()
  summary = {}
  for name, result in results.items():
    summary[name] = {
      'layers': result['layers'],
      'forward_equivalents': round(result['forward_equivalents'], 3),
      'spread': [round(v, 3) for v in result['forward_equivalents_spread']],
      'cpu_time': round(result['forward_equivalents_cpu'], 3),
      'target': TARGETS[name],
      'recorded': recorded[name],
      'regression': round(result['forward_equivalents'] / recorded[name], 3),
      'speedup_vs_naive': round(result['speedup_vs_naive'], 3),
      'chunk_size': result['chunk_size'],
    }
  print(json.dumps(summary))


if __name__ == '__main__':
  main()
