"""Store-Contribute Dissociation (docs/method.md, FoG-A and LASP): do the layers that store
teacher information contribute?

Per domain: the Spearman correlation between the storage (LASP) and contribution (FoG-A) scores
over layers, and the overlap |A ∩ B| / K of their top-K layer sets. Layers outside `eligible` (not
probed) take part in neither. The storage score is LASP's config.probe.storage_measure: by default
the centered cosine, since the raw cosine is nearly flat over layers (lasp.py).
"""

import numpy as np
from scipy import stats

from agrepa_jax.selection import top_k_layers


def top_k_overlap(storage: np.ndarray, contribution: np.ndarray, k: int) -> float:
  return len(set(top_k_layers(storage, k)) & set(top_k_layers(contribution, k))) / k


def dissociation(storage: np.ndarray, contribution: np.ndarray, k: int, layer_numbers=None) -> dict:
  """SCD of one domain from (n,) scores; `layer_numbers` (default 1..n) name the rows in the output.

  Everything is NaN (and the top lists empty) when a score is missing.
  """
  layer_numbers = (
    np.arange(1, len(storage) + 1) if layer_numbers is None else np.asarray(layer_numbers)
  )
  if np.isnan(storage).any() or np.isnan(contribution).any():
    return {
      'spearman': float('nan'),
      'p_value': float('nan'),
      'top_k_overlap': float('nan'),
      'storage_top': [],
      'contribution_top': [],
    }
  result = stats.spearmanr(storage, contribution)
  return {
    'spearman': float(result.statistic),
    'p_value': float(result.pvalue),
    'top_k_overlap': top_k_overlap(storage, contribution, k),
    'storage_top': layer_numbers[top_k_layers(storage, k)].tolist(),
    'contribution_top': layer_numbers[top_k_layers(contribution, k)].tolist(),
  }


def scd_report(
  storage: np.ndarray, contribution: np.ndarray, domains, k: int, eligible=None
) -> dict:
  """{domain: dissociation} from (L, D) storage and contribution scores.

  eligible: (L,) bool, the layers compared (default all); layers are reported 1-based.
  """
  eligible = np.ones(storage.shape[0], bool) if eligible is None else np.asarray(eligible)
  layers = np.flatnonzero(eligible)
  return {
    domain: dissociation(storage[layers, d], contribution[layers, d], k, layers + 1)
    for d, domain in enumerate(domains)
  }
