"""What the train step keeps for its backward pass, per layer, and its roofline on an accelerator.

  python bench/step_bytes.py [--configs paper_day] [--chip 'NVIDIA H200'] [--set KEY=VALUE ...]

Compiles on this machine (no step runs, no arrays are allocated), so a CPU host answers for a GPU
config; the step is the bench's (bench/train_step.py, official forms). One JSON object per config:

- `kept_per_layer`: what one block keeps for the backward pass, from jax's own account of the
  block's residuals (`jax.ad_checkpoint.print_saved_residuals` on one DiTBlock at the config's
  shapes): each array's shape, bytes and where it comes from, largest first. That is remat 'none';
  under 'full' a block keeps its input alone, (B, T, width).
- `compiled_temp_bytes`: the compiled step's scratch (XLA's buffer assignment on this machine's
  backend) with 2 and 3 blocks, per `model.remat`, and their difference: what one more block
  costs there (`compiled_peak_bytes`: the config's own step).
- `roofline`, per `model.remat`: lower bounds of the step's time on `--chip` (flops.CHIPS): the
  hand-counted model FLOPs at the dense bf16 peak, and the HBM traffic of the official attention's
  materialized (B, H, T, T) arrays alone (`probability_bytes`) at the memory bandwidth. XLA's own
  byte count is no help here: on CPU its fusions are finer than a GPU's, and it counts a loop body
  once.
"""

import argparse
import contextlib
import io
import json
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))

RESIDUAL = re.compile(r'^(\w+)\[([\d,]*)\]\s+(.*)$')


def block_residuals(config) -> list[dict]:
  """The arrays one DiT block keeps for its backward pass (remat 'none'), largest first."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from jax import ad_checkpoint

  from agrepa_jax import aot, audio, flops, model
  from agrepa_jax.data import spec as data_spec

  cfg = flops.model_config(config)
  block = nnx.eval_shape(lambda: model.DiTBlock(cfg, nnx.Rngs(0)))
  graphdef, params = nnx.split(block)
  b, t = config.batch_size, audio.num_frames(data_spec.crop_samples(config.data.clip_seconds))
  h = jax.ShapeDtypeStruct((b, t, cfg.width), jnp.dtype(cfg.dtype))

  def run(params, h, time_emb):
    lengths = jnp.full((b,), t)
    return nnx.merge(graphdef, params)(h, time_emb, 1.0, jax.random.key(0), lengths)

  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    ad_checkpoint.print_saved_residuals(
      run, params, h, jax.ShapeDtypeStruct((b, cfg.width), h.dtype)
    )
  kept = []
  for line in printed.getvalue().splitlines():
    match = RESIDUAL.match(line.strip())
    if match and 'from the argument' not in match.group(3):
      dtype, dims, source = match.groups()
      shape = tuple(int(d) for d in dims.split(',') if d)
      size = int(np.prod(shape)) * aot.DTYPE_BYTES[dtype]
      source = re.sub(r'\S*/site-packages/|' + re.escape(f'{ROOT}/'), '', source)
      kept.append({'array': f'{dtype}[{dims}]', 'bytes': size, 'from': source})
  return sorted(kept, key=lambda r: -r['bytes'])


def compiled(config):
  """The train step compiled on this machine's first device, and its aot report."""
  import jax

  from agrepa_jax import aot

  config.mesh.update(data=1, fsdp=1, tensor=1)
  return aot.compile_train_step(config, jax.devices()[:1])


def with_model(config, **model):
  config = config.copy_and_resolve_references()
  config.model.update(model)
  return config


def with_blocks(config, num_layers: int, remat: str):
  """`config` with `num_layers` blocks, REPA on the first (the selection must exist)."""
  config = with_model(config, num_layers=num_layers, remat=remat)
  domains = config.data.domains
  config.repa.update(
    selection='fixed',
    preset='',
    layers={d: [1] for d in domains},
    lambdas={d: [0.5] for d in domains},
  )
  return config


# Passes over a (B, H, T, T) array of the official attention (model.py's written-out backward),
# each array written once and read once by each consumer, as XLA's GPU fusions run it:
PROBABILITY_PASSES = {
  # write the logits (matmul), read them (softmax), write the probabilities, read them (dropout),
  # write the dropped probabilities, read them (· v)
  'forward': 6,
  # dropout of P again (read P, write, read by dV), dP (write, read by dropout, write), the softmax
  # gradient (read P and dropped dP, write dS), dS read by dQ and by dK
  'backward': 11,
}


def probability_bytes(config) -> dict:
  """HBM bytes per step of the official attention's (B, H, T, T) arrays (PROBABILITY_PASSES; the
  forward pass runs twice under remat). Zero where the probabilities are not materialized."""
  from agrepa_jax import audio, flops
  from agrepa_jax.data import spec as data_spec

  cfg = flops.model_config(config)
  if cfg.dropout_positions != 'official' or not cfg.dropout:
    return {'passes_per_layer': 0, 'bytes_per_layer': 0, 'bytes': 0}
  t = audio.num_frames(data_spec.crop_samples(config.data.clip_seconds))
  itemsize = 2 if cfg.dtype in ('bfloat16', 'float16') else 4
  size = config.batch_size * cfg.num_heads * t * t * itemsize
  forwards = 1 if cfg.remat == 'none' else 2
  passes = forwards * PROBABILITY_PASSES['forward'] + PROBABILITY_PASSES['backward']
  return {
    'passes_per_layer': passes,
    'bytes_per_layer': passes * size,
    'bytes': passes * size * cfg.num_layers,
  }


def analyse(config, chip_name: str, remats: list[str]) -> dict:
  from agrepa_jax import flops

  chip = flops.chip(chip_name)
  if chip is None:
    raise ValueError(f'--chip={chip_name!r}: not one of {sorted(flops.CHIPS)}')
  temp = {}
  for remat in remats:
    # two and three blocks: XLA removes a depth loop of one trip
    two, three = (compiled(with_blocks(config, n, remat))[1]['temp_bytes'] for n in (2, 3))
    temp[remat] = {'two_blocks': two, 'three_blocks': three, 'per_block': three - two}
  _, report = compiled(config)
  kept = block_residuals(config)
  rooflines = {}
  for remat in remats:
    moved = probability_bytes(with_model(config, remat=remat))
    rooflines[remat] = {
      **moved,
      **flops.roofline_seconds(report['flops_per_step'], moved['bytes'], chip),
    }
  return {
    'num_layers': config.model.num_layers,
    'width': config.model.width,
    'batch_size': config.batch_size,
    'clip_seconds': config.data.clip_seconds,
    'dtype': config.model.dtype,
    'remat': config.model.remat,
    'kept_per_layer': kept,
    'kept_per_layer_bytes': sum(r['bytes'] for r in kept),
    'compiled_temp_bytes': temp,
    'compiled_peak_bytes': report['peak_bytes'],
    'flops_per_step': report['flops_per_step'],
    'chip': chip_name,
    'roofline': rooflines,
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default='paper_day')
  parser.add_argument('--chip', default='NVIDIA H200')
  parser.add_argument('--remats', default='none,full', help='model.remat values to compile')
  parser.add_argument('--set', action='append', default=[], help='config override KEY=VALUE')
  args = parser.parse_args(argv)
  from bench import train_step

  for name in args.configs.split(','):
    config = train_step.bench_config(name, 'official', args.set)
    result = analyse(config, args.chip, args.remats.split(','))
    print(json.dumps({'config': name, 'overrides': args.set, **result}), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
