"""The built-in tokenizer: k-means units over teacher frame features at a fixed token rate.

A second codebook, when asked for, quantizes the residual of the first (residual k-means), so the
dual-codebook model has two complementary streams as in the paper's dual setting.
"""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.cluster import KMeans

from agrepa_jax.data import DataError


def pool_to_rate(frames: np.ndarray, num_tokens: int) -> np.ndarray:
  """(F, C) teacher frames -> (num_tokens, C) means over equal time segments."""
  edges = np.linspace(0, frames.shape[0], num_tokens + 1).round().astype(int)
  edges[1:] = np.maximum(edges[1:], edges[:-1] + 1)
  edges = np.minimum(edges, frames.shape[0])
  return np.stack([frames[a : max(b, a + 1)].mean(0) for a, b in zip(edges[:-1], edges[1:])])


def fit_codebooks(
  features: np.ndarray,
  codebook_size: int,
  num_codebooks: int,
  seed: int,
  max_fit_points: int = 200_000,
) -> list[np.ndarray]:
  """Residual k-means: a list of (codebook_size, C) centroid arrays fitted on (P, C) features."""
  rng = np.random.default_rng(seed)
  if len(features) > max_fit_points:
    features = features[rng.choice(len(features), max_fit_points, replace=False)]
  if len(features) < codebook_size:
    raise DataError(
      f'tokenizer: {len(features)} feature frames cannot fit {codebook_size} units; lower '
      'model.vocab_size or raise data.tokenizer_clips'
    )
  codebooks, residual = [], features.astype(np.float32)
  for k in range(num_codebooks):
    kmeans = KMeans(n_clusters=codebook_size, n_init=1, max_iter=100, random_state=seed + k).fit(
      residual
    )
    centroids = kmeans.cluster_centers_.astype(np.float32)
    codebooks.append(centroids)
    residual = residual - centroids[kmeans.labels_]
  return codebooks


@jax.jit
def _nearest(residual: jax.Array, centroids: jax.Array) -> jax.Array:
  distances = (
    jnp.square(residual).sum(1, keepdims=True)
    - 2 * residual @ centroids.T
    + jnp.square(centroids).sum(1)[None]
  )
  return distances.argmin(1)


def assign_tokens(features: np.ndarray, codebooks: list[np.ndarray]) -> np.ndarray:
  """(..., C) features -> (K, ...) int32 unit indices, one row per codebook (on the accelerator)."""
  flat = jnp.asarray(features.reshape(-1, features.shape[-1]), jnp.float32)
  rows, residual = [], flat
  for centroids in codebooks:
    centroids = jnp.asarray(centroids, jnp.float32)
    index = _nearest(residual, centroids)
    rows.append(np.asarray(index).reshape(features.shape[:-1]).astype(np.int32))
    residual = residual - centroids[index]
  return np.stack(rows)


def assign_token_lists(features: list[np.ndarray], codebooks: list[np.ndarray]) -> list[np.ndarray]:
  """[(N_i, C)] features of several clips -> [(K, N_i)] tokens, in one call on rows padded to a
  power of two (so clips of any length compile a handful of shapes, not one per length)."""
  lengths = [len(f) for f in features]
  total = sum(lengths)
  rows = 1 << max(total - 1, 0).bit_length()
  flat = np.zeros((rows, features[0].shape[-1]), np.float32)
  flat[:total] = np.concatenate(features)
  tokens = assign_tokens(flat, codebooks)[:, :total]
  return np.split(tokens, np.cumsum(lengths)[:-1], axis=1)
