"""Layer selection for AG-REPA (DESIGN.md §7): per domain, the top-K layers by FoG-A score, and their λ.

λ rules over the selected layers: 'raw', λ = the score itself (the paper); 'normalized', the scores
scaled to sum to `total`; 'softmax', total · softmax(score / temperature). A selection is
{domain: {layer (1-based): λ}}, what `agrepa_jax.selection.dense_lambdas` takes.
"""

import json
import pathlib

import numpy as np

LAMBDA_RULES = ('raw', 'normalized', 'softmax')


def top_k_layers(scores: np.ndarray, k: int, eligible=None) -> np.ndarray:
  """0-based indices of the k highest finite scores among `eligible` layers, highest first.

  Ties go to the shallower layer.
  """
  scores = np.asarray(scores, np.float64)
  usable = (
    np.isfinite(scores) if eligible is None else np.isfinite(scores) & np.asarray(eligible, bool)
  )
  candidates = np.flatnonzero(usable)
  return candidates[np.argsort(-scores[candidates], kind='stable')][:k]


def layer_lambdas(scores: np.ndarray, rule: str, total: float, temperature: float) -> np.ndarray:
  """λ of the selected layers from their scores."""
  scores = np.asarray(scores, np.float64)
  if rule == 'raw':
    return scores
  if rule == 'normalized':
    if scores.sum() <= 0:
      raise ValueError(f'normalized λ needs a positive score sum, got scores {scores.tolist()}')
    return total * scores / scores.sum()
  if rule == 'softmax':
    weights = np.exp((scores - scores.max()) / temperature)
    return total * weights / weights.sum()
  raise ValueError(f'lambda_rule={rule!r}: expected one of {LAMBDA_RULES}')


def layer_scores(table: np.ndarray, t_values, selection_t: float) -> np.ndarray:
  """(L, n_t, D) FoG-A table -> (L, D): the mean over t (selection_t < 0) or the column at selection_t."""
  if selection_t < 0:
    return table.mean(1)
  matches = np.flatnonzero(np.isclose(np.asarray(t_values, np.float64), selection_t))
  if not len(matches):
    raise ValueError(
      f'selection_t={selection_t} is not one of the probed t values {list(t_values)}'
    )
  return table[:, matches[0]]


def select_layers(
  scores: np.ndarray,
  domains,
  *,
  top_k: int,
  rule: str = 'raw',
  total: float = 0.5,
  temperature: float = 0.1,
  eligible=None,
) -> dict[str, dict[int, float]]:
  """{domain: {layer (1-based): λ}} from (L, D) scores; a domain without finite scores selects nothing."""
  selection = {}
  for d, domain in enumerate(domains):
    chosen = top_k_layers(scores[:, d], top_k, eligible)
    lambdas = layer_lambdas(scores[chosen, d], rule, total, temperature) if len(chosen) else []
    selection[domain] = {int(layer) + 1: float(lam) for layer, lam in zip(chosen, lambdas)}
  return selection


def ema_update(old, new, decay: float):
  """Exponential moving average of scores re-measured during training; `old=None` starts at `new`."""
  return new if old is None else decay * old + (1 - decay) * new


def selection_json(selection: dict[str, dict[int, float]], **settings) -> dict:
  """The JSON form of a selection: settings plus {'domains': {domain: {'layers': [...], 'lambdas': [...]}}}."""
  return {
    **settings,
    'domains': {
      domain: {'layers': list(chosen), 'lambdas': list(chosen.values())}
      for domain, chosen in selection.items()
    },
  }


def read_selection(path: pathlib.Path) -> dict[str, dict[int, float]]:
  """A selection.json back as {domain: {layer (1-based): λ}}, ready for `selection.dense_lambdas`."""
  domains = json.loads(pathlib.Path(path).read_text())['domains']
  return {domain: dict(zip(entry['layers'], entry['lambdas'])) for domain, entry in domains.items()}
