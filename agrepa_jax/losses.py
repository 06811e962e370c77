"""Flow-matching, BiT-C and REPA/AG-REPA losses (docs/method.md) as pure functions of arrays."""

import dataclasses

import jax
import jax.numpy as jnp

from agrepa_jax import audio, selection
from agrepa_jax.model import interpolate_linear, masked_mean

GRANULARITIES = ('utterance', 'frame')


@dataclasses.dataclass(frozen=True)
class FlowMatchingConfig:
  noise_std: float = 0.5
  max_prompt_fraction: float = 0.3
  token_drop_prob: float = 0.1
  reference_drop_prob: float = 0.1
  loss_on_prompt: bool = False  # reference quirk: the prompt frames count in L_FM


def cosine_distance(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
  """1 − cos(a, b) along the last axis."""
  dot = (a * b).sum(-1)
  return 1.0 - dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


def frame_mask(num_samples: jax.Array, num_frames: int, hop_length: int) -> jax.Array:
  """(B,) sample counts -> (B, T) bool: frames whose center lies inside the clip's audio."""
  return jnp.arange(num_frames)[None, :] * hop_length < num_samples[:, None]


def flow_matching_inputs(key, x1, valid_frames, cfg: FlowMatchingConfig):
  """Samples t, x0, the reference prompt and the CFG drops for one batch.

  x1: (B, T, M) target mel; valid_frames: (B,) frames that hold audio (the prompt is drawn in them).
  Returns x_t, t, target velocity u, the reference mel m_ref, token_keep (B,) and the (B, T)
  frame weights of L_FM.
  """
  batch, frames, _ = x1.shape
  k_t, k_noise, k_prompt, k_tok, k_ref = jax.random.split(key, 5)
  t = jax.random.uniform(k_t, (batch,))
  x0 = cfg.noise_std * jax.random.normal(k_noise, x1.shape, x1.dtype)
  x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * x1

  max_prompt = jnp.maximum(jnp.floor(cfg.max_prompt_fraction * valid_frames), 1).astype(jnp.int32)
  prompt_len = jax.random.randint(k_prompt, (batch,), 1, max_prompt + 1)
  keep_ref = jax.random.bernoulli(k_ref, 1 - cfg.reference_drop_prob, (batch,))
  in_prompt = (jnp.arange(frames)[None, :] < prompt_len[:, None]) & keep_ref[:, None]
  ref_mel = jnp.where(in_prompt[..., None], x1, 0.0)
  token_keep = jax.random.bernoulli(k_tok, 1 - cfg.token_drop_prob, (batch,)).astype(x1.dtype)
  loss_weights = (
    jnp.ones((batch, frames), x1.dtype) if cfg.loss_on_prompt else (~in_prompt).astype(x1.dtype)
  )
  return dict(
    x_t=x_t, t=t, u=x1 - x0, ref_mel=ref_mel, token_keep=token_keep, loss_weights=loss_weights
  )


def flow_matching_loss(velocity, target, frame_weights):
  """Mean squared velocity error over the weighted frames and all mel bins."""
  per_frame = jnp.square(velocity - target).mean(-1)
  return (per_frame * frame_weights).sum() / jnp.maximum(frame_weights.sum(), 1.0)


def bitc_loss(
  bitc_heads, token_embedding, teacher, domain, domain_weights, token_keep=None, valid_frames=None
):
  """Σ_d w_d · mean over the batch of [clip in d] · (1 − cos(head_d(mean_t e), y_d)).

  teacher: per-domain utterance targets, a sequence of (B, C_d); domain: (B,) indices.
  token_keep: (B,) 0/1; when given, clips whose tokens were dropped count as zero (the official
  form; they still count in the batch size).
  valid_frames: (B, T) bool, the frames mean_t averages (default all).
  """
  pooled = masked_mean(token_embedding, valid_frames)
  kept = 1.0 if token_keep is None else token_keep.astype(pooled.dtype)
  total = 0.0
  for d, (target, weight) in enumerate(zip(teacher, domain_weights)):
    in_domain = (domain == d).astype(pooled.dtype) * kept
    total += weight * (in_domain * cosine_distance(bitc_heads(d, pooled), target)).mean()
  return total


def repa_loss(
  repa_heads, hidden, teacher, domain, lambdas, valid_frames=None, max_layers: int | None = None
):
  """Σ_ℓ λ_ℓ,d · (1 − cos(head_ℓ,d(h_ℓ), y_d)), averaged over the batch.

  hidden: (L, B, W) time-pooled block outputs (utterance granularity), or (L, B, T, W) per frame
    (frame granularity: teacher frames (B, F, C_d) are interpolated to T and the distance is
    averaged over the (B, T) `valid_frames`, or all frames if None).
  lambdas: dense (L, num_domains) weights; a zero entry switches that pair off, and changing the
    values never recompiles. Only the heads of the `max_layers` (default L; at most as many as a
    domain has heads) largest λ per domain run (selection.active_layers): the cost does not
    grow with L.
  """
  most_heads = max(map(len, repa_heads.layers), default=0)
  layers, weights = selection.active_layers(
    lambdas, repa_heads.has_head(), min(max_layers or lambdas.shape[0], most_heads)
  )
  total = jnp.zeros(())
  for d, target in enumerate(teacher):
    if not repa_heads.layers[d]:
      continue
    prediction = repa_heads(d, hidden[layers[d]], layers[d])
    if hidden.ndim == 4:
      target = interpolate_linear(target, hidden.shape[2])
      distance = masked_mean(
        jnp.moveaxis(cosine_distance(prediction, target[None]), 0, -1), valid_frames
      ).T  # (K, B)
    else:
      distance = cosine_distance(prediction, target[None])
    in_domain = (domain == d).astype(distance.dtype)
    total += (weights[d, :, None] * in_domain[None] * distance).sum(0).mean()  # (K, B) -> ()
  return total


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """The static settings of the total loss."""

  flow: FlowMatchingConfig
  bitc_weights: tuple[float, ...] | None  # None: no BiT-C loss
  granularity: str  # REPA: 'none' (off), 'utterance' (time-pooled, the paper's) or 'frame'
  domains: tuple[str, ...]  # order of the λ columns and heads; batches key teacher targets by name
  bitc_skips_dropped: bool = False  # bitc.form='official': clips whose tokens were dropped skip it
  max_layers: int = 3  # static K: REPA heads run for at most this many layers per domain
  mask_padding: bool = True  # False (official): padding frames are attended, pooled and in L_FM

  @classmethod
  def from_config(cls, config) -> 'LossConfig':
    flow_fields = {f.name for f in dataclasses.fields(FlowMatchingConfig)}
    flow = FlowMatchingConfig(**{k: v for k, v in config.flow.items() if k in flow_fields})
    domains = tuple(config.data.domains)
    bitc = tuple(config.bitc.weights[d] for d in domains) if config.bitc.enabled else None
    granularity = config.repa.granularity
    if granularity not in GRANULARITIES:
      raise ValueError(f'repa.granularity={granularity!r}: expected one of {GRANULARITIES}')
    frames = config.data.teacher_frames or config.teachers.online
    if config.repa.selection != 'none' and granularity == 'frame' and not frames:
      raise ValueError(
        "repa.granularity='frame' needs teacher frame features: set data.teacher_frames=True "
        '(stored) or teachers.online=True'
      )
    return cls(
      flow,
      bitc,
      'none' if config.repa.selection == 'none' else granularity,
      domains,
      bitc_skips_dropped=config.bitc.form == 'official',
      max_layers=config.repa.max_layers,
      mask_padding=config.model.mask_padding,
    )


def compute_losses(model, batch, lambdas, key, cfg: LossConfig, train: bool) -> dict:
  """L = L_FM + L_BiT-C + L_REPA of one batch, and each part.

  `key` draws t, noise, prompts, CFG drops (and dropout if training); `lambdas` (L, domains).
  """
  mel = batch['mel'].astype(jnp.float32)  # the host may send bf16
  valid = frame_mask(batch['num_samples'], mel.shape[1], audio.HOP_LENGTH)
  sample_key, dropout_key = jax.random.split(key)
  inputs = flow_matching_inputs(sample_key, mel, valid.sum(1), cfg.flow)
  return losses_given_draws(
    model, batch, inputs, valid, lambdas, cfg, dropout_key if train else None
  )


def losses_given_draws(model, batch, inputs, valid, lambdas, cfg: LossConfig, dropout_key=None):
  """`compute_losses` for given draws `inputs` (flow_matching_inputs) and (B, T) valid frames.

  Padding frames (valid False) reach no loss: attention, L_FM and every time mean skip them. With
  `cfg.mask_padding` off (the official code, which zero-pads every clip to the crop length) they
  count as audio everywhere.
  """
  counted = valid if cfg.mask_padding else None  # the frames every loss and time mean reads
  velocity, extras = model.backbone(
    inputs['x_t'],
    inputs['t'],
    batch['tokens'],
    inputs['ref_mel'],
    batch['domain'],
    token_keep=inputs['token_keep'],
    dropout_key=dropout_key,
    hidden=cfg.granularity,
    lengths=None if counted is None else counted.sum(1),
  )
  fm_weights = inputs['loss_weights'] if counted is None else inputs['loss_weights'] * counted
  out = {'loss_fm': flow_matching_loss(velocity, inputs['u'], fm_weights)}
  teacher = tuple(batch['teacher'][d] for d in cfg.domains)
  out['loss_bitc'] = jnp.zeros(())
  if cfg.bitc_weights:
    out['loss_bitc'] = bitc_loss(
      model.bitc_heads,
      extras['token_embedding'],
      teacher,
      batch['domain'],
      cfg.bitc_weights,
      inputs['token_keep'] if cfg.bitc_skips_dropped else None,
      valid_frames=counted,
    )
  out['loss_repa'] = jnp.zeros(())
  if cfg.granularity != 'none':
    if cfg.granularity == 'frame':
      teacher = tuple(batch['teacher_frames'][d] for d in cfg.domains)
    out['loss_repa'] = repa_loss(
      model.repa_heads,
      extras['hidden'],
      teacher,
      batch['domain'],
      lambdas,
      counted,
      cfg.max_layers,
    )
  out['loss'] = out['loss_fm'] + out['loss_bitc'] + out['loss_repa']
  return out
