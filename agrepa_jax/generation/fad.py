"""Fréchet Audio Distance between embedding sets, and FAD∞, its sample-size-free extrapolation.

FAD fits a Gaussian to each set of embeddings (one row per clip or frame) and measures
‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½). A finite generated set of n biases it upwards by about
a constant over n, so FAD∞ (Chong & Forsyth's FID∞, which fadtk adopted for audio) fits FAD against
1/n over random subsets of the generated set and reports the line's value at 1/n = 0.
"""

import dataclasses

import numpy as np
import scipy.linalg

SINGULAR_EPS = 1e-6
FADTK_MIN_N = 500


def frechet_distance(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), computed in float64."""
  mu1, mu2 = (np.atleast_1d(np.asarray(mu, np.float64)) for mu in (mu1, mu2))
  cov1, cov2 = (np.atleast_2d(np.asarray(cov, np.float64)) for cov in (cov1, cov2))
  if mu1.shape != mu2.shape or not cov1.shape == cov2.shape == (len(mu1),) * 2:
    raise ValueError(
      f'mismatched Gaussians: means {mu1.shape}, {mu2.shape}; '
      f'covariances {cov1.shape}, {cov2.shape}'
    )
  covariance_root = scipy.linalg.sqrtm(cov1 @ cov2)
  if not np.isfinite(covariance_root).all():
    # A (near) singular product, e.g. from fewer samples than dimensions: regularize both factors.
    offset = SINGULAR_EPS * np.eye(len(mu1))
    covariance_root = scipy.linalg.sqrtm((cov1 + offset) @ (cov2 + offset))
  # (Σ₁Σ₂)^½ has real eigenvalues (Σ₁, Σ₂ are PSD); rounding leaves tiny imaginary parts.
  trace_root = np.trace(covariance_root).real
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_root)


def gaussian_fit(embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean (D,) and unbiased covariance (D, D) of (N, D) embeddings."""
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2 or len(embeddings) < 2:
    raise ValueError(f'need (N >= 2, D) embeddings, got shape {embeddings.shape}')
  return embeddings.mean(0), np.cov(embeddings, rowvar=False)


def fad(real_embeddings: np.ndarray, generated_embeddings: np.ndarray) -> float:
  """FAD between two (N, D) embedding sets."""
  return frechet_distance(*gaussian_fit(real_embeddings), *gaussian_fit(generated_embeddings))


@dataclasses.dataclass(frozen=True)
class FadInfinity:
  value: float  # FAD extrapolated to infinitely many generated samples
  slope: float  # d FAD / d(1/n)
  r2: float  # how well FAD is linear in 1/n over the points
  points: list[tuple[int, float]]  # (subset size n, FAD) pairs the line was fitted to


def fad_infinity(
  real_embeddings: np.ndarray,
  generated_embeddings: np.ndarray,
  num_points: int = 15,
  min_n: int | None = None,
  seed: int = 0,
  with_replacement: bool = False,
) -> FadInfinity:
  """FAD∞: FAD of `num_points` generated subsets, sizes evenly from min_n to N, fitted in 1/n.

  Subsets are drawn without replacement, as Chong & Forsyth do: a subset of an i.i.d. sample is an
  i.i.d. sample, so the line extrapolates to the population's FAD. fadtk draws with replacement
  (`with_replacement=True` reproduces it); that extrapolates to the FAD of the generated set's own
  empirical distribution, which keeps the set's finite-N bias. min_n defaults to fadtk's 500, or
  N // 2 for sets smaller than 1000.
  """
  real_fit = gaussian_fit(real_embeddings)
  generated_embeddings = np.asarray(generated_embeddings)
  num_generated = len(generated_embeddings)
  min_n = min(FADTK_MIN_N, num_generated // 2) if min_n is None else min_n
  if not 2 <= min_n < num_generated or num_points < 2:
    raise ValueError(
      f'need 2 <= min_n < N and num_points >= 2; got min_n {min_n}, '
      f'N {num_generated}, num_points {num_points}'
    )
  rng = np.random.default_rng(seed)
  sizes = np.linspace(min_n, num_generated, num_points).astype(int)
  subsets = (rng.choice(num_generated, size=n, replace=with_replacement) for n in sizes)
  scores = np.array(
    [frechet_distance(*real_fit, *gaussian_fit(generated_embeddings[subset])) for subset in subsets]
  )
  inverse_sizes = 1.0 / sizes
  slope, intercept = np.polyfit(inverse_sizes, scores, 1)
  residual = scores - (slope * inverse_sizes + intercept)
  r2 = 1 - np.sum(residual**2) / np.sum((scores - scores.mean()) ** 2)
  return FadInfinity(
    float(intercept), float(slope), float(r2), [(int(n), float(s)) for n, s in zip(sizes, scores)]
  )
