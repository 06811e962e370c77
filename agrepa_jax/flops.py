"""Model FLOPs of the train step, counted by hand and read off a jaxpr; the chips' peaks.

XLA's cost analysis counts the body of a `while` loop once, so on the depth-scanned model it
reports about 1/L of the step's FLOPs. `train_step_flops` is the hand count that the bench and
`--mode aot` use: every matrix product of the forward pass (2 FLOPs per multiply-add) and of its
backward pass (a weight gradient for every trained weight, an input gradient wherever the input
depends on a trained parameter). Elementwise work (softmax, norms, GELU, dropout, the optimizer) is
not counted, nor the forward recomputation of `model.remat`: the usual convention of model FLOPs
for MFU. `jaxpr_matmul_flops` counts the `dot_general`s of a jaxpr, each scan body times its
length; tests/test_bench.py checks the hand count against it.
"""

import dataclasses
import math

from agrepa_jax import losses, selection
from agrepa_jax.data import spec as data_spec
from agrepa_jax.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class Chip:
  """An accelerator's datasheet figures."""

  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float  # memory per chip
  hbm_bytes_per_second: float


# By the start of jax's device_kind (the longest matching name wins: 'TPU v5' is v5p).
CHIPS = {
  'NVIDIA H100': Chip(989e12, 80e9, 3.35e12),  # SXM
  'NVIDIA H200': Chip(989e12, 141e9, 4.8e12),
  'NVIDIA A100': Chip(312e12, 80e9, 2.04e12),  # SXM 80 GB
  'TPU v4': Chip(275e12, 32e9, 1.2e12),
  'TPU v5 lite': Chip(197e12, 16e9, 819e9),  # v5e
  'TPU v5': Chip(459e12, 95e9, 2.765e12),  # v5p
  'TPU v6 lite': Chip(918e12, 32e9, 1.64e12),  # v6e (Trillium)
}


def chip(device_kind: str) -> Chip | None:
  """The CHIPS entry of a jax `device_kind` ('TPU v5 lite', 'NVIDIA H200'), None if unknown."""
  names = [name for name in CHIPS if device_kind.startswith(name)]
  return CHIPS[max(names, key=len)] if names else None


def train_step_flops(
  cfg: ModelConfig,
  batch: int,
  frames: int,
  num_tokens: int,
  teacher_dims: tuple[int, ...],
  repa_heads: int,
  bitc: bool,
) -> int:
  """Matmul FLOPs of one train step (forward + backward) on a global batch.

  num_tokens: tokens per clip and codebook; repa_heads: the active REPA heads per domain (the
  static K of losses.repa_loss, 0 without REPA); bitc: whether the BiT-C loss is on.
  """
  b, t, n, d, dt = batch, frames, num_tokens, cfg.width, cfg.token_dim
  domains, codebooks, frozen = cfg.num_domains, cfg.num_codebooks, cfg.frozen_token_conditioning
  conditioning_grads = 0 if frozen else 2  # trained tables: the projections' inputs need grads
  macs = 0

  def product(count, grads=2):
    """A product of `count` multiply-adds whose `grads` operands need gradients (one backward
    product each)."""
    nonlocal macs
    macs += count * (1 + grads)

  # Token conditioning: every clip's stream through every domain's projection, then its own.
  if cfg.codebook_fusion == 'concat':
    product(b * n * domains * codebooks * dt * dt, conditioning_grads)
    product(b * n * dt * domains, conditioning_grads // 2)  # · one-hot domain
  else:
    for _ in range(codebooks):
      product(b * n * domains * dt * dt, conditioning_grads)
      product(b * n * dt * domains, conditioning_grads // 2)
    if codebooks > 1:
      product(b * t * codebooks * dt * dt, conditioning_grads)
  product(b * t * (2 * cfg.n_mels + dt) * d, 1 if frozen else 2)  # input projection
  if cfg.time_embedding == 'official':
    product(b * d * 4 * d, 1)  # the sinusoidal features need no gradient
    product(b * 4 * d * d)
  else:
    product(b * cfg.time_freq_dim * d, 1)
    product(b * d * d)
  for _ in range(cfg.num_layers):
    product(b * d * 6 * d)  # adaLN modulation
    product(b * t * d * 3 * d)  # q, k, v
    product(b * t * t * d)  # logits q·k
    product(b * t * t * d)  # probabilities · v
    product(b * t * d * d)  # attention output
    product(b * t * d * cfg.mlp_ratio * d)
    product(b * t * cfg.mlp_ratio * d * d)
  product(b * t * d * cfg.n_mels)  # output projection
  for dim in teacher_dims:
    for _ in range(repa_heads):
      product(b * d * d)
      product(b * d * dim)
    if bitc:
      product(b * dt * dim, 1 if frozen else 2)
  return 2 * macs


def jaxpr_matmul_flops(jaxpr) -> int:
  """2 × multiply-adds of every dot_general in a (closed) jaxpr; scan bodies count `length` times,
  cond the costliest branch. Raises on a while loop, whose trip count a jaxpr does not state."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      (lhs_contracting, _), _ = eqn.params['dimension_numbers']
      lhs = eqn.invars[0].aval.shape
      contracted = math.prod(lhs[i] for i in lhs_contracting)
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * contracted
    elif name == 'while':
      raise ValueError('a while loop: its trip count is unknown')
    elif name == 'cond':
      total += max(jaxpr_matmul_flops(branch) for branch in eqn.params['branches'])
    else:
      times = eqn.params['length'] if name == 'scan' else 1
      total += times * sum(jaxpr_matmul_flops(sub) for sub in _sub_jaxprs(eqn.params))
  return total


def _sub_jaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, 'eqns') or hasattr(getattr(item, 'jaxpr', None), 'eqns'):
        yield item


def model_config(config) -> ModelConfig:
  """The ModelConfig that state.make_model builds from `config`."""
  return ModelConfig.from_config(
    {**config.model, 'num_domains': len(config.data.domains), 'bitc_form': config.bitc.form}
  )


def config_train_step_flops(config, teacher_dims: tuple[int, ...]) -> int:
  """`train_step_flops` of the global batch of `config` (what state.make_model builds, the batch
  of data.spec, the REPA heads the loss runs)."""
  cfg = model_config(config)
  batch = data_spec.batch_spec(config, dict(zip(config.data.domains, teacher_dims)))
  loss = losses.LossConfig.from_config(config)
  heads = max(map(len, selection.repa_head_layers(config)), default=0)
  return train_step_flops(
    cfg,
    config.batch_size,
    batch.num_frames,
    batch.num_tokens,
    teacher_dims,
    min(loss.max_layers, heads) if loss.granularity != 'none' else 0,
    bool(loss.bitc_weights),
  )


def roofline_seconds(flops: float, hbm_bytes: float, chip: Chip) -> dict[str, float]:
  """Lower bounds of a step's time on `chip`: its FLOPs at the dense bf16 peak, its memory
  traffic at the HBM bandwidth, and the larger of the two (the roofline)."""
  compute, memory = flops / chip.peak_flops, hbm_bytes / chip.hbm_bytes_per_second
  return {'compute_seconds': compute, 'memory_seconds': memory, 'seconds': max(compute, memory)}
