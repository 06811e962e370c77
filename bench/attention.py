"""The official attention (dropout on the probabilities) on an accelerator: the model's XLA form
against cuDNN's fused kernel with and without cuDNN's own dropout. One JSON line.

  python bench/attention.py [--shape 64,938,8,64] [--steps 10] [--rate 0.2]

--shape is batch, frames, heads, head width (default: configs/paper_day.py's, 10 s clips). Each
form runs forward and backward (the gradients of q, k, v) on bf16 inputs whose keys past a random
valid length are masked: `official_threefry` and `official_hash` are
model.attention_with_probability_dropout with the two mask generators (it materializes the
(B, H, T, T) probabilities); `cudnn` is jax.nn.dot_product_attention's cuDNN flash kernel, which
has no dropout (the form model.attention uses); `cudnn_dropout` is the same kernel with dropout
on the probabilities, through jax's private cuDNN entry point, whose seed is a compile-time
constant: `same_output_for_two_keys` says whether two calls with different dropout keys agree (a
mask that ignores the key, drawn alike every step, is no dropout for training). Per form: seconds
per call (median), TFLOP/s of the 12·B·H·T²·D matmul FLOPs, and the compiled scratch bytes; a
form that does not run here has `error`.
"""

import argparse
import json
import math
import pathlib
import statistics
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
  sys.path.insert(0, str(ROOT))


def forms(rate: float) -> dict:
  """name -> attention(q, k, v, lengths, key) on (B, T, H, D) heads."""
  import jax.numpy as jnp

  from agrepa_jax import model

  def official(rng):
    return lambda q, k, v, lengths, key: model.attention_with_probability_dropout(
      q, k, v, rate, key, lengths, rng
    )

  def cudnn_dropout(q, k, v, lengths, key):
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    full = jnp.full_like(lengths, q.shape[1])
    return cudnn.dot_product_attention(
      q,
      k,
      v,
      q_seqlen=full,
      kv_seqlen=lengths,
      scale=1 / math.sqrt(q.shape[-1]),
      mask_type=cudnn.MaskType.PADDING,
      dropout_rate=rate,
      qkv_layout='BTNH',
    )

  return {
    'official_threefry': official('threefry'),
    'official_hash': official('hash'),
    'cudnn': lambda q, k, v, lengths, key: model.attention(q, k, v, lengths, 'cudnn'),
    'cudnn_dropout': cudnn_dropout,
  }


def measure(attention, inputs, steps: int) -> dict:
  import jax
  import jax.numpy as jnp

  q, k, v, lengths, cotangent = inputs

  def loss(q, k, v, key):
    out = attention(q, k, v, lengths, key)
    return (out.astype(jnp.float32) * cotangent).sum(), out

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  compiled = grad.lower(q, k, v, jax.random.key(0)).compile()
  (_, first), _ = compiled(q, k, v, jax.random.key(0))
  (_, again), grads = compiled(q, k, v, jax.random.key(1))
  jax.block_until_ready(grads)
  seconds = []
  for i in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(q, k, v, jax.random.key(i + 1)))
    seconds.append(time.perf_counter() - start)
  b, t, h, d = q.shape
  median = statistics.median(seconds)
  return {
    'seconds': round(median, 6),
    'tflops_per_second': round(12 * b * h * t * t * d / median / 1e12, 1),
    'temp_bytes': int(compiled.memory_analysis().temp_size_in_bytes),
    'same_output_for_two_keys': bool(jnp.array_equal(first, again)),
  }


def main(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--shape', default='64,938,8,64', help='batch,frames,heads,head_width')
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--rate', type=float, default=0.2)
  args = parser.parse_args(argv)
  import jax
  import jax.numpy as jnp

  b, t, h, d = map(int, args.shape.split(','))
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in keys[:3])
  lengths = jax.random.randint(keys[3], (b,), t // 2, t + 1)
  cotangent = jax.random.normal(keys[4], (b, t, h, d), jnp.float32)
  result = {'device': jax.devices()[0].device_kind, 'shape': [b, t, h, d], 'rate': args.rate}
  for name, attention in forms(args.rate).items():
    try:
      result[name] = measure(attention, (q, k, v, lengths, cotangent), args.steps)
    except Exception as e:  # a form this platform or jax release does not run
      result[name] = {'error': f'{type(e).__name__}: {str(e)[:300]}'}
  print(json.dumps(result), flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
