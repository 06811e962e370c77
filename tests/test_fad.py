"""FAD and FAD∞ against closed forms and against their expected behavior on sampled Gaussians."""

import numpy as np
import pytest
import scipy.linalg

from agrepa_jax.generation import fad


def random_covariance(rng, dim):
  factor = rng.standard_normal((dim, dim))
  return factor @ factor.T / dim + 0.1 * np.eye(dim)


def test_frechet_distance_of_diagonal_gaussians_matches_closed_form():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
  var1, var2 = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
  closed_form = np.sum((mu1 - mu2) ** 2) + np.sum(var1 + var2 - 2 * np.sqrt(var1 * var2))
  got = fad.frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2))
  assert got == pytest.approx(closed_form, rel=1e-10)


def test_frechet_distance_of_full_gaussians_matches_symmetric_form():
  """tr((Σ₁Σ₂)^½) = tr((Σ₁^½ Σ₂ Σ₁^½)^½), the latter from symmetric eigendecompositions only."""
  rng = np.random.default_rng(1)
  cov1, cov2 = random_covariance(rng, 12), random_covariance(rng, 12)
  mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
  root1 = scipy.linalg.sqrtm(cov1).real
  inner_eigenvalues = np.linalg.eigvalsh(root1 @ cov2 @ root1)
  want = (
    np.sum((mu1 - mu2) ** 2)
    + np.trace(cov1)
    + np.trace(cov2)
    - 2 * np.sum(np.sqrt(inner_eigenvalues))
  )
  assert fad.frechet_distance(mu1, cov1, mu2, cov2) == pytest.approx(want, rel=1e-9)


def test_frechet_distance_is_zero_for_one_gaussian():
  rng = np.random.default_rng(2)
  cov = random_covariance(rng, 20)
  assert abs(fad.frechet_distance(np.ones(20), cov, np.ones(20), cov)) < 1e-9


def test_frechet_distance_retries_a_failed_root_with_a_ridge(monkeypatch):
  """If sqrtm of the raw product is not finite, both covariances get eps on the diagonal."""
  roots, sqrtm = [], scipy.linalg.sqrtm

  def sqrtm_failing_first(matrix):
    roots.append(matrix)
    return np.full_like(matrix, np.nan) if len(roots) == 1 else sqrtm(matrix)

  monkeypatch.setattr(fad.scipy.linalg, 'sqrtm', sqrtm_failing_first)
  var1, var2 = np.array([1.0, 0.0, 2.0]), np.array([0.0, 3.0, 2.0])
  got = fad.frechet_distance(np.zeros(3), np.diag(var1), np.ones(3), np.diag(var2))
  eps = fad.SINGULAR_EPS
  want = 3 + np.sum(var1 + var2) - 2 * np.sum(np.sqrt((var1 + eps) * (var2 + eps)))
  assert len(roots) == 2
  assert got == pytest.approx(want, rel=1e-12)


def test_frechet_distance_rejects_mismatched_dimensions():
  with pytest.raises(ValueError, match='mismatched'):
    fad.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_gaussian_fit_is_mean_and_unbiased_covariance():
  embeddings = np.array([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]])
  mean, cov = fad.gaussian_fit(embeddings)
  np.testing.assert_allclose(mean, [2.0, 2.0])
  np.testing.assert_allclose(cov, [[4.0, 3.0], [3.0, 3.0]])


def test_gaussian_fit_needs_two_rows():
  with pytest.raises(ValueError, match='N >= 2'):
    fad.gaussian_fit(np.ones((1, 4)))


def test_fad_of_a_set_with_itself_is_zero():
  embeddings = np.random.default_rng(3).standard_normal((500, 32))
  assert abs(fad.fad(embeddings, embeddings)) < 1e-9


def test_fad_survives_fewer_samples_than_dimensions():
  rng = np.random.default_rng(4)
  real, generated = rng.standard_normal((20, 64)), rng.standard_normal((20, 64))
  assert np.isfinite(fad.fad(real, generated))
  assert abs(fad.fad(real, real)) < 1e-4


def test_fad_grows_with_a_mean_shift_as_its_square():
  rng = np.random.default_rng(5)
  real = rng.standard_normal((4000, 8))
  generated = rng.standard_normal((4000, 8))
  direction = np.ones(8) / np.sqrt(8)
  shifts = [0.0, 0.25, 0.5, 1.0, 2.0]
  scores = [fad.fad(real, generated + s * direction) for s in shifts]
  assert all(a < b for a, b in zip(scores, scores[1:]))
  # For identical covariances, the increase over no shift is shift² up to the sampled means' offset.
  np.testing.assert_allclose(np.array(scores) - scores[0], np.square(shifts), atol=0.1)


def fad_infinity_of_fresh_sets(with_replacement: bool, num_sets: int = 8):
  """FAD∞ and finite FAD of `num_sets` generated sets of 3000 from the real N(0, I₈)."""
  rng = np.random.default_rng(6)
  real = rng.standard_normal((50000, 8))
  generated_sets = [rng.standard_normal((3000, 8)) for _ in range(num_sets)]
  results = [
    fad.fad_infinity(real, generated, min_n=300, seed=i, with_replacement=with_replacement)
    for i, generated in enumerate(generated_sets)
  ]
  return results, [fad.fad(real, generated) for generated in generated_sets]


def test_fad_infinity_of_one_distribution_extrapolates_to_zero():
  results, finite = fad_infinity_of_fresh_sets(with_replacement=False)
  assert [n for n, _ in results[0].points] == list(np.linspace(300, 3000, 15).astype(int))
  assert results[0].points[-1][1] == pytest.approx(finite[0])  # the largest subset is the whole set
  values = np.array([r.value for r in results])
  assert abs(values.mean()) < 0.003 < np.mean(finite)
  assert (values < finite).all()
  # For N(0, I_D) against itself FAD's first-order bias is (D + D(D + 1) / 4) / n: 26 / n for D = 8.
  assert np.mean([r.slope for r in results]) == pytest.approx(26, rel=0.15)
  assert min(r.r2 for r in results) > 0.8


def test_fad_infinity_with_replacement_keeps_the_sets_own_bias():
  """fadtk's resampling extrapolates to the generated set's empirical distribution."""
  results, finite = fad_infinity_of_fresh_sets(with_replacement=True)
  assert np.mean([r.value for r in results]) == pytest.approx(np.mean(finite), rel=0.3)


def test_fad_infinity_recovers_the_true_distance():
  """N(0.5, 2 I₈) against N(0, I₈), averaged over sets: FAD∞ removes the bias, not the noise."""
  rng = np.random.default_rng(7)
  real = rng.standard_normal((50000, 8))
  true_distance = 8 * 0.5**2 + 8 * (1 + 2 - 2 * np.sqrt(2.0))
  generated_sets = [rng.standard_normal((3000, 8)) * np.sqrt(2.0) + 0.5 for _ in range(8)]
  values = [
    fad.fad_infinity(real, generated, min_n=300, seed=i).value
    for i, generated in enumerate(generated_sets)
  ]
  assert np.mean(values) == pytest.approx(true_distance, abs=0.03)


def test_fad_infinity_is_reproducible_per_seed():
  rng = np.random.default_rng(8)
  real, generated = rng.standard_normal((2000, 4)), rng.standard_normal((1200, 4))
  first = fad.fad_infinity(real, generated, seed=3)
  assert first == fad.fad_infinity(real, generated, seed=3)
  assert first != fad.fad_infinity(real, generated, seed=4)
  assert first.points[0][0] == 500  # fadtk's default smallest subset


def test_fad_infinity_needs_room_between_min_n_and_n():
  with pytest.raises(ValueError, match='min_n'):
    fad.fad_infinity(np.ones((10, 2)), np.ones((100, 2)), min_n=100)
