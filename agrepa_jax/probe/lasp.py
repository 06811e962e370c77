"""LASP, the storage probe (docs/method.md, FoG-A and LASP): how much teacher information each
layer's hidden state holds.

Features: every layer's hidden state pooled over all T frames, as the REPA loss pools it
(`DiT(..., hidden='utterance')`, clean model, dropout off), at one t (`lasp_t`, default 0.5,
mid-trajectory) from the same fixed noise and prompt as FoG-A. Probes map a layer's features to
teacher space and are scored per domain d over that domain's clips by two measures:
- 'cosine': the paper's mean cosine between the prediction and the utterance target y_d. Teacher
  targets share a large mean vector, so any prediction near it scores high at every layer;
- 'centered': the same cosine after subtracting the training side's teacher mean μ_d from both
  (the training split's mean for the trained heads, the fitting clips' mean for the ridge probe;
  never the scored clips'), so only what a layer tells about the clip beyond the mean counts.
The probes:
- 'bitc': the trained BiT-C head of domain d (LayerNorm → linear map to C_d), the paper's LASP
  probe, on the L2-normalized pooled state. It was trained on the time-mean of the token embedding
  e, so it reads hidden states only when model.width == model.token_dim (as in the paper's and the
  default configs); otherwise it is left out. The reference code's quirk (repa.quirks) skips the
  LayerNorm and flips the sign: −Linear(h); its LASP also reads the clean mel labelled t = 0.8.
- 'repa': the trained REPA head (ℓ, d) of `model.repa_heads`, the hidden-side head. Only the pairs
  trained with λ_ℓ,d > 0 have learnt anything; for the others it is an untrained head.
- 'ridge': ridge regression on the L2-normalized features, fitted per layer and domain on the first
  `fit_fraction` of the domain's clips and scored on the rest.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from sklearn.linear_model import Ridge

from agrepa_jax.model import AgRepaModel, DiT
from agrepa_jax.probe.batch import MODEL_KEYS, NOISE_STD, clip_noise, model_inputs, valid_frames


@functools.partial(jax.jit, static_argnames=('graphdef', 'prompt_fraction', 'clean_input'))
def _pooled_hidden(state, batch, t, noise, *, graphdef, prompt_fraction, clean_input):
  lengths = valid_frames(batch['num_samples'], noise.shape[1]).sum(1)
  _, extras = nnx.merge(graphdef, state)(
    **model_inputs(batch, t, noise, prompt_fraction, clean_input),
    hidden='utterance',
    lengths=lengths,
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
  clean_input: bool = False,
) -> np.ndarray:
  """(L, N, width) time-pooled hidden states of the probe set at one t (noise of the probe key
  `key`; with `clean_input`, the clean mel labelled t, the reference code's quirk)."""
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
          clean_input=clean_input,
        )
      )
    )
  return np.concatenate(parts, axis=1)


MEASURES = ('cosine', 'centered')


def mean_cosine(prediction: np.ndarray, target: np.ndarray, eps: float = 1e-8) -> np.ndarray:
  """Mean over the clip axis (−2) of cos(prediction, target) along the last axis."""
  dot = (prediction * target).sum(-1)
  norms = np.linalg.norm(prediction, axis=-1) * np.linalg.norm(target, axis=-1)
  return (dot / np.maximum(norms, eps)).mean(-1)


def cosine_measures(prediction: np.ndarray, target: np.ndarray, mean: np.ndarray) -> dict:
  """{'cosine', 'centered'}: `mean_cosine` of the prediction and target as they are, and after
  subtracting the training side's teacher mean (C,) from both."""
  return {
    'cosine': mean_cosine(prediction, target),
    'centered': mean_cosine(prediction - mean, target - mean),
  }


def unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def empty_scores(num_layers: int, num_domains: int) -> dict[str, np.ndarray]:
  return {m: np.full((num_layers, num_domains), np.nan) for m in MEASURES}


def head_scores(
  apply_head, pooled: np.ndarray, targets, clip_domains: np.ndarray, teacher_means
) -> dict[str, np.ndarray]:
  """{measure: (L, D)} scores of `apply_head(d, (L, N_d, width)) -> (L, N_d, C_d)` against y_d;
  NaN for a domain without clips.

  targets: per domain (N, C_d) utterance targets; teacher_means: per domain the training split's
  (C_d,) mean target; both in domain-index order.
  """
  scores = empty_scores(pooled.shape[0], len(targets))
  for d, (target, mean) in enumerate(zip(targets, teacher_means)):
    rows = np.flatnonzero(clip_domains == d)
    if len(rows):
      prediction = np.asarray(apply_head(d, jnp.asarray(pooled[:, rows])))
      for measure, value in cosine_measures(prediction, target[rows][None], mean).items():
        scores[measure][:, d] = value
  return scores


def repa_head_scores(repa_heads, pooled, targets, clip_domains, teacher_means) -> dict:
  """Scores of REPA head (ℓ, d) applied to layer ℓ; NaN where layer ℓ has no head for d."""

  def apply_head(d, z):
    layers = np.asarray(repa_heads.layers[d], np.int64)
    prediction = np.full((*z.shape[:2], targets[d].shape[-1]), np.nan, np.float32)
    if len(layers):
      prediction[layers] = np.asarray(repa_heads(d, z[layers]))
    return prediction

  return head_scores(apply_head, pooled, targets, clip_domains, teacher_means)


def bitc_head_scores(
  bitc_heads, pooled, targets, clip_domains, teacher_means, quirk: bool = False
) -> dict:
  """Scores of the BiT-C head of domain d applied to every layer's normalized pooled state; with
  `quirk`, the reference code's probe −Linear(h) without the head's LayerNorm."""
  if quirk:
    apply_head = lambda d, h: -bitc_heads.projections[d](h)
  else:
    apply_head = bitc_heads
  return head_scores(apply_head, unit_rows(pooled), targets, clip_domains, teacher_means)


def ridge_scores(
  pooled: np.ndarray,
  targets,
  clip_domains: np.ndarray,
  *,
  fit_fraction: float = 0.5,
  alpha: float = 1.0,
) -> dict[str, np.ndarray]:
  """{measure: (L, D)} held-out scores of a per-layer ridge probe, centered on the fitting clips'
  mean target; NaN where a domain cannot give both a fit and a test clip."""
  features = unit_rows(pooled)
  scores = empty_scores(pooled.shape[0], len(targets))
  for d, target in enumerate(targets):
    rows = np.flatnonzero(clip_domains == d)
    num_fit = int(round(fit_fraction * len(rows)))
    if num_fit < 1 or num_fit == len(rows):
      continue
    fit, test = rows[:num_fit], rows[num_fit:]
    fit_mean = target[fit].mean(0)
    for layer, x in enumerate(features):
      prediction = Ridge(alpha=alpha).fit(x[fit], target[fit]).predict(x[test])
      for measure, value in cosine_measures(prediction, target[test], fit_mean).items():
        scores[measure][layer, d] = value
  return scores


def training_teacher_means(source, domains, max_clips: int = 4096) -> list[np.ndarray]:
  """Per domain the (C_d,) mean utterance target over (an even stride of at most `max_clips` of)
  the training clips of that domain; memory and reads stay flat in the corpus size.

  source: a data.pipeline.FeatureSplit (`record`, `indices_of_domain`).
  """
  means = []
  for d, name in enumerate(domains):
    rows = source.indices_of_domain(d)
    if not len(rows):
      raise ValueError(f'the training split has no {name!r} clip: no teacher mean for LASP')
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), max_clips)).astype(int)]
    total = sum(np.asarray(source.record(i)['teacher'], np.float64) for i in rows)
    means.append((total / len(rows)).astype(np.float32))
  return means


def storage_scores(
  model: AgRepaModel,
  batch: dict,
  domains: tuple[str, ...],
  key: jax.Array,
  teacher_means,
  *,
  t: float = 0.5,
  prompt_fraction: float = 0.15,
  batch_size: int = 16,
  fit_fraction: float = 0.5,
  ridge_alpha: float = 1.0,
  noise_std: float = NOISE_STD,
  quirks: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
  """{measure: {'bitc': (L, D) when width == token_dim, 'repa': (L, D), 'ridge': (L, D)}} storage
  scores of the stacked probe set `batch`; teacher_means: per domain the training split's (C_d,)
  mean target (`training_teacher_means`). `quirks`: the reference code's LASP (clean mel input,
  BiT-C probe −Linear(h))."""
  pooled = pooled_hidden(
    model.backbone,
    batch,
    t,
    key,
    prompt_fraction=prompt_fraction,
    batch_size=batch_size,
    noise_std=noise_std,
    clean_input=quirks,
  )
  targets = [np.asarray(batch['teacher'][d], np.float32) for d in domains]
  clip_domains = np.asarray(batch['domain'])
  by_probe = {}
  if model.backbone.cfg.width == model.backbone.cfg.token_dim:
    by_probe['bitc'] = bitc_head_scores(
      model.bitc_heads, pooled, targets, clip_domains, teacher_means, quirk=quirks
    )
  by_probe['repa'] = repa_head_scores(
    model.repa_heads, pooled, targets, clip_domains, teacher_means
  )
  by_probe['ridge'] = ridge_scores(
    pooled, targets, clip_domains, fit_fraction=fit_fraction, alpha=ridge_alpha
  )
  return {m: {probe: scores[m] for probe, scores in by_probe.items()} for m in MEASURES}
