"""FoG-A cost: one prefix-shared probe (all L+1 gate settings, one t) against one forward pass and
the naive loop of L+1 forward calls, on the default model and on a 24-layer narrow model.

python bench/fog_a.py [--batch 16] [--repeats 3] [--chunk-sizes 1,2,4]

The probe runs at every chunk size given (lanes side by side; which is fastest depends on the device
and the model) and the fastest counts. Prints a line per model and, last, a JSON object for the
24-layer model: layers, forward_equivalents (probe time / forward time; the prefix sharing aims at
≈ (L+1)/2, at most 0.6·(L+1)), speedup_vs_naive (naive loop time / probe time) and chunk_size.
"""

import argparse
import importlib.util
import json
import pathlib
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
DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[1] / 'configs' / 'default.py'


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


def median_seconds(run, repeats: int) -> float:
  jax.block_until_ready(run())  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(run())
    times.append(time.perf_counter() - start)
  return statistics.median(times)


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
  seconds = {
    'forward': median_seconds(lambda: forward(state, masks[0]), repeats),
    'naive_loop': median_seconds(lambda: [forward(state, g) for g in masks], repeats),
    'naive_vmapped': median_seconds(
      lambda: fog_a.naive_clip_scores(dit, batch, T_PROBE, noise), repeats
    ),
    **{
      f'fog_a_chunk{c}': median_seconds(
        lambda c=c: fog_a.clip_scores(dit, batch, T_PROBE, noise, chunk_size=c), repeats
      )
      for c in chunk_sizes
    },
  }
  chunk_size = min(chunk_sizes, key=lambda c: seconds[f'fog_a_chunk{c}'])
  probe = seconds[f'fog_a_chunk{chunk_size}']
  return {
    'layers': cfg.num_layers,
    'width': cfg.width,
    **{f'{k}_ms': 1e3 * v for k, v in seconds.items()},
    'chunk_size': chunk_size,
    'forward_equivalents': probe / seconds['forward'],
    'target_forward_equivalents': 0.6 * (cfg.num_layers + 1),
    'speedup_vs_naive': seconds['naive_loop'] / probe,
    'speedup_vs_naive_vmapped': seconds['naive_vmapped'] / probe,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--batch', type=int, default=16)
  parser.add_argument('--repeats', type=int, default=3)
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
  deep = results['deep_narrow']
  print(
    json.dumps(
      {
        'layers': deep['layers'],
        'forward_equivalents': round(deep['forward_equivalents'], 3),
        'speedup_vs_naive': round(deep['speedup_vs_naive'], 3),
        'chunk_size': deep['chunk_size'],
      }
    )
  )


if __name__ == '__main__':
  main()
