"""LASP, the storage probe (docs/method.md, FoG-A and LASP): how much teacher information each layer's hidden state holds.

Features: every layer's hidden state pooled over all T frames, as the REPA loss pools it
(`DiT(..., hidden='utterance')`, clean model, dropout off), at one t (`lasp_t`, default 0.5,
mid-trajectory) from the same fixed noise and prompt as FoG-A. Two probes map a layer's features to
teacher space; a layer's score for domain d is the mean cosine between the prediction and the
utterance target y_d over that domain's clips:
- 'bitc': the trained BiT-C head of domain d (LayerNorm → linear map to C_d), the paper's LASP probe.
  It was trained on the time-mean of the token embedding e, so it reads hidden states only when
  model.width == model.token_dim (as in the paper's and the default configs); otherwise it is left out.
- 'repa': the trained REPA head (ℓ, d) of `model.repa_heads`, the hidden-side head. Only the pairs
  trained with λ_ℓ,d > 0 have learnt anything; for the others it is an untrained head.
- 'ridge': ridge regression on the L2-normalized features, fitted per layer and domain on the first
  `fit_fraction` of the domain's clips and scored on the rest. Its intercept alone already predicts
  the teacher mean, so scores sit high; the differences between layers carry the information.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.linear_model import Ridge

from agrepa_jax.model import AgRepaModel, DiT
from agrepa_jax.probe.batch import MODEL_KEYS, NOISE_STD, clip_noise, model_inputs, valid_frames


@functools.partial(jax.jit, static_argnames=('graphdef', 'prompt_fraction'))
def _pooled_hidden(state, batch, t, noise, *, graphdef, prompt_fraction):
  lengths = valid_frames(batch['num_samples'], noise.shape[1]).sum(1)
  _, extras = nnx.merge(graphdef, state)(
    **model_inputs(batch, t, noise, prompt_fraction), hidden='utterance', lengths=lengths
  )
  return extras['hidden']


def pooled_hidden(
  dit: DiT,
  batch: dict,
  t: float,
  key: jax.Array,
  *,
  prompt_fraction: float = 0.15,
  batch_size: int = 16,
  noise_std: float = NOISE_STD,
) -> np.ndarray:
  """(L, N, width) time-pooled hidden states of the probe set at one t (noise of the probe key `key`)."""
  graphdef, state = nnx.split(dit)
  num_clips = len(batch['domain'])
  noise = clip_noise(key, num_clips, batch['mel'].shape[1:], noise_std)
  parts = []
  for start in range(0, num_clips, batch_size):
    rows = slice(start, start + batch_size)
    inputs = {k: batch[k][rows] for k in MODEL_KEYS}
    parts.append(
      np.asarray(
        _pooled_hidden(
          state,
          inputs,
          jnp.float32(t),
          noise[rows],
          graphdef=graphdef,
          prompt_fraction=prompt_fraction,
        )
      )
    )
  return np.concatenate(parts, axis=1)


def mean_cosine(prediction: np.ndarray, target: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """Mean over the clip axis (−2) of cos(prediction, target) along the last axis."""
  dot = (prediction * target).sum(-1)
  norms = np.linalg.norm(prediction, axis=-1) * np.linalg.norm(target, axis=-1)
  return (dot / np.maximum(norms, eps)).mean(-1)


def head_scores(apply_head, pooled: np.ndarray, targets, clip_domains: np.ndarray) -> np.ndarray:
  """(L, D) mean cosine of `apply_head(d, (L, N_d, width)) -> (L, N_d, C_d)` with y_d; NaN for a domain
  without clips.

  targets: per domain (N, C_d) utterance targets, in domain-index order.
  """
  scores = np.full((pooled.shape[0], len(targets)), np.nan)
  for d, target in enumerate(targets):
    rows = np.flatnonzero(clip_domains == d)
    if len(rows):
      scores[:, d] = mean_cosine(
        np.asarray(apply_head(d, jnp.asarray(pooled[:, rows]))), target[rows][None]
      )
  return scores


def repa_head_scores(
  repa_heads, pooled: np.ndarray, targets, clip_domains: np.ndarray
) -> np.ndarray:
  """Scores of REPA head (ℓ, d) applied to layer ℓ; NaN where layer ℓ has no head for d."""

  def apply_head(d, z):
    layers = np.asarray(repa_heads.layers[d], np.int64)
    prediction = np.full((*z.shape[:2], targets[d].shape[-1]), np.nan, np.float32)
    if len(layers):
      prediction[layers] = np.asarray(repa_heads(d, z[layers]))
    return prediction

  return head_scores(apply_head, pooled, targets, clip_domains)


def bitc_head_scores(
  bitc_heads, pooled: np.ndarray, targets, clip_domains: np.ndarray
) -> np.ndarray:
  """Scores of the BiT-C head of domain d applied to every layer's normalized pooled state."""
  unit = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)
  return head_scores(bitc_heads, unit, targets, clip_domains)


def ridge_scores(
  pooled: np.ndarray,
  targets,
  clip_domains: np.ndarray,
  *,
  fit_fraction: float = 0.5,
  alpha: float = 1.0,
) -> np.ndarray:
  """(L, D) held-out mean cosine of a per-layer ridge probe; NaN where a domain cannot give both a fit
  and a test clip."""
  features = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-6)
  scores = np.full((pooled.shape[0], len(targets)), np.nan)
  for d, target in enumerate(targets):
    rows = np.flatnonzero(clip_domains == d)
    num_fit = int(round(fit_fraction * len(rows)))
    if num_fit < 1 or num_fit == len(rows):
      continue
    fit, test = rows[:num_fit], rows[num_fit:]
    for layer, x in enumerate(features):
      probe = Ridge(alpha=alpha).fit(x[fit], target[fit])
      scores[layer, d] = mean_cosine(probe.predict(x[test]), target[test])
  return scores


def storage_scores(
  model: AgRepaModel,
  batch: dict,
  domains: tuple[str, ...],
  key: jax.Array,
  *,
  t: float = 0.5,
  prompt_fraction: float = 0.15,
  batch_size: int = 16,
  fit_fraction: float = 0.5,
  ridge_alpha: float = 1.0,
  noise_std: float = NOISE_STD,
) -> dict[str, np.ndarray]:
  """{'bitc': (L, D) when width == token_dim, 'repa': (L, D), 'ridge': (L, D)} storage scores of the
  stacked probe set `batch`."""
  pooled = pooled_hidden(
    model.backbone,
    batch,
    t,
    key,
    prompt_fraction=prompt_fraction,
    batch_size=batch_size,
    noise_std=noise_std,
  )
  targets = [np.asarray(batch['teacher'][d], np.float32) for d in domains]
  clip_domains = np.asarray(batch['domain'])
  scores = {
    'repa': repa_head_scores(model.repa_heads, pooled, targets, clip_domains),
    'ridge': ridge_scores(
      pooled, targets, clip_domains, fit_fraction=fit_fraction, alpha=ridge_alpha
    ),
  }
  if model.backbone.cfg.width == model.backbone.cfg.token_dim:
    scores = {'bitc': bitc_head_scores(model.bitc_heads, pooled, targets, clip_domains), **scores}
  return scores
