"""The alignment weights λ: which layers REPA aligns, per domain, and how strongly.

λ is a dense (layers × domains) array, an input of the train step, so a new selection never
recompiles. It comes from the config (fixed layers or the paper's presets), from a probe's
selection.json, or from FoG-A re-measured during training (probe/online.py). FoG-A selection: per
domain, the top-K layers by score; λ rules over them: 'raw', λ = the score itself (the paper's
code); 'normalized', the scores scaled to sum to `total`; 'softmax', total · softmax(score / T).
A selection is {domain: {layer (1-based): λ}}, what `dense_lambdas` takes. A FoG-A schedule
(`ProbeSchedule`) says what a measurement covers, so also which layers a selection can pick.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

# Layers (1-based) and λ that the paper's code selected by FoG-A for the 24-layer model, exactly
# as its REPA models hold them.
PAPER_PRESETS = {
  'paper_single': {
    'speech': {1: 0.334, 9: 0.139, 5: 0.1176},
    'audio': {1: 0.278, 21: 0.12, 9: 0.1122},
  },
  'paper_dual': {
    'speech': {1: 0.506, 3: 0.1308, 23: 0.1082},
    'audio': {1: 0.388, 3: 0.1026, 7: 0.0856},
  },
}


@dataclasses.dataclass(frozen=True)
class ProbeSchedule:
  """What a FoG-A measurement covers: which t, how many clips, dropout, which layers."""

  t_values: tuple[float, ...]
  num_clips: int
  dropout: bool  # training mode: a fresh dropout draw in every forward pass (the official)
  clean_input: bool  # the model reads the clean mel x1 labelled t (the official), not x_t
  odd_layers_only: bool  # only 1-based odd layers are probed; even ones score 0, never selected
  lambda_rule: str  # how selected layers' scores become λ (layer_lambdas)


# Reference quirks (docs/method.md, reference quirks): the paper's code probes in training mode
# (fresh dropout per pass) at t = 0.8 on the clean mel of 2 clips, only odd-numbered layers, and
# uses the raw score as λ.
REFERENCE_SCHEDULE = ProbeSchedule(
  t_values=(0.8,),
  num_clips=2,
  dropout=True,
  clean_input=True,
  odd_layers_only=True,
  lambda_rule='raw',
)


def schedule_from_config(config) -> ProbeSchedule:
  """config.probe's schedule, or the reference code's when config.repa.quirks is set."""
  if config.repa.quirks:
    return REFERENCE_SCHEDULE
  probe = config.probe
  return ProbeSchedule(
    tuple(float(t) for t in probe.t_values),
    int(probe.num_clips),
    dropout=False,
    clean_input=False,
    odd_layers_only=False,
    lambda_rule=probe.lambda_rule,
  )


def probed_layers(num_layers: int, schedule: ProbeSchedule) -> np.ndarray:
  """(L,) bool: the layers a schedule measures (index 0 is layer 1)."""
  layers = np.arange(1, num_layers + 1)
  return layers % 2 == 1 if schedule.odd_layers_only else np.ones(num_layers, bool)


def dense_lambdas(per_domain: dict[str, dict[int, float]], num_layers: int, domains) -> np.ndarray:
  """{domain: {layer (1-based): λ}} -> (num_layers, len(domains)) float32."""
  lambdas = np.zeros((num_layers, len(domains)), np.float32)
  for d, domain in enumerate(domains):
    for layer, weight in per_domain.get(domain, {}).items():
      if not 1 <= layer <= num_layers:
        raise ValueError(f'repa: layer {layer} for domain {domain!r} is outside 1..{num_layers}')
      lambdas[layer - 1, d] = weight
  return lambdas


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


def _raw(scores, total, temperature):
  return scores


def _normalized(scores, total, temperature):
  if scores.sum() <= 0:
    raise ValueError(f'normalized λ needs a positive score sum, got scores {scores.tolist()}')
  return total * scores / scores.sum()


def _softmax(scores, total, temperature):
  weights = np.exp((scores - scores.max()) / temperature)
  return total * weights / weights.sum()


# λ rule -> (scores, total, temperature) -> λ of the selected layers. A new rule is a new entry.
LAMBDA_RULES = {'raw': _raw, 'normalized': _normalized, 'softmax': _softmax}


def layer_lambdas(scores: np.ndarray, rule: str, total: float, temperature: float) -> np.ndarray:
  """λ of the selected layers from their scores."""
  if rule not in LAMBDA_RULES:
    raise ValueError(f'lambda_rule={rule!r}: expected one of {tuple(LAMBDA_RULES)}')
  return LAMBDA_RULES[rule](np.asarray(scores, np.float64), total, temperature)


def layer_scores(table: np.ndarray, t_values, selection_t: float) -> np.ndarray:
  """(L, n_t, D) FoG-A table -> (L, D): the mean over t (selection_t < 0) or one t's column."""
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
  """{domain: {layer (1-based): λ}} from (L, D) scores; no finite score: nothing selected."""
  selection = {}
  for d, domain in enumerate(domains):
    chosen = top_k_layers(scores[:, d], top_k, eligible)
    lambdas = layer_lambdas(scores[chosen, d], rule, total, temperature) if len(chosen) else []
    selection[domain] = {int(layer) + 1: float(lam) for layer, lam in zip(chosen, lambdas)}
  return selection


def ema_update(old, new, decay: float):
  """Exponential moving average of scores re-measured in training; `old=None` starts at `new`."""
  return new if old is None else decay * old + (1 - decay) * new


def selection_json(selection: dict[str, dict[int, float]], **settings) -> dict:
  """The JSON form of a selection: settings plus
  {'domains': {domain: {'layers': [...], 'lambdas': [...]}}}."""
  return {
    **settings,
    'domains': {
      domain: {'layers': list(chosen), 'lambdas': list(chosen.values())}
      for domain, chosen in selection.items()
    },
  }


def read_selection(path: epath.Path) -> dict[str, dict[int, float]]:
  """A selection.json back as {domain: {layer (1-based): λ}}, ready for `dense_lambdas`."""
  domains = json.loads(epath.Path(path).read_text())['domains']
  return {domain: dict(zip(entry['layers'], entry['lambdas'])) for domain, entry in domains.items()}


def _no_alignment(config) -> dict[str, dict[int, float]]:
  return {}


def _fixed_layers(config) -> dict[str, dict[int, float]]:
  repa = config.repa
  if repa.preset:
    if repa.preset not in PAPER_PRESETS:
      raise ValueError(
        f'repa.preset={repa.preset!r}: expected one of {sorted(PAPER_PRESETS)} or empty'
      )
    return PAPER_PRESETS[repa.preset]
  per_domain = {}
  for domain in config.data.domains:
    layers = list(repa.layers[domain])
    weights = list(repa.lambdas[domain])
    if len(weights) == 1:
      weights = weights * len(layers)
    if len(weights) != len(layers):
      raise ValueError(f'repa.lambdas.{domain} has {len(weights)} values for {len(layers)} layers')
    per_domain[domain] = dict(zip(layers, weights))
  return per_domain


def _fog_a_layers(config) -> dict[str, dict[int, float]]:
  if measures_online(config):
    return {}  # online FoG-A sets λ at its first measurement
  return read_selection(config.repa.selection_file)


# repa.selection -> config -> {domain: {layer (1-based): λ}}. A new selection rule is a new entry.
SELECTIONS = {'none': _no_alignment, 'fixed': _fixed_layers, 'fog_a': _fog_a_layers}


def lambdas_from_config(config) -> np.ndarray:
  """The dense (L, domains) λ a run starts from, checked against its heads and repa.max_layers."""
  lambdas = configured_lambdas(config)
  check_active_lambdas(
    lambdas, repa_head_layers(config), config.repa.max_layers, config.data.domains
  )
  return lambdas


def configured_lambdas(config) -> np.ndarray:
  """The dense (L, domains) λ of `config.repa.selection`, unchecked."""
  rule = config.repa.selection
  if rule not in SELECTIONS:
    raise ValueError(f'repa.selection={rule!r}: expected one of {tuple(SELECTIONS)}')
  return dense_lambdas(SELECTIONS[rule](config), config.model.num_layers, config.data.domains)


def repa_head_layers(config) -> tuple[tuple[int, ...], ...]:
  """Per domain, the 0-based layers that get a REPA head: the layers its selection can pick.

  fixed: the layers with λ ≠ 0; fog_a: every layer FoG-A probes (odd layers only under
  repa.quirks); none: no layer; repa.all_layer_heads: every layer.
  """
  repa, domains, num_layers = config.repa, tuple(config.data.domains), config.model.num_layers
  if repa.all_layer_heads:
    return tuple(tuple(range(num_layers)) for _ in domains)
  if repa.selection == 'fog_a':
    if config.probe.top_k > repa.max_layers:
      raise ValueError(
        f'probe.top_k={config.probe.top_k} selects more layers than repa.max_layers='
        f'{repa.max_layers}'
      )
    eligible = probed_layers(num_layers, schedule_from_config(config))
    return tuple(tuple(np.flatnonzero(eligible).tolist()) for _ in domains)
  lambdas = configured_lambdas(config)
  return tuple(tuple(np.flatnonzero(lambdas[:, d]).tolist()) for d in range(len(domains)))


def check_active_lambdas(lambdas: np.ndarray, head_layers, max_layers: int, domains) -> None:
  """Raises unless each domain's non-zero λ are at most `max_layers` layers that have a head."""
  for d, domain in enumerate(domains):
    chosen = np.flatnonzero(lambdas[:, d])
    if len(chosen) > max_layers:
      raise ValueError(
        f'repa: {len(chosen)} layers selected for domain {domain!r}, more than '
        f'repa.max_layers={max_layers}'
      )
    headless = sorted(set(chosen.tolist()) - set(head_layers[d]))
    if headless:
      raise ValueError(
        f'repa: layers {[layer + 1 for layer in headless]} of domain {domain!r} have no REPA '
        'head (repa.quirks keeps heads on odd layers only; repa.all_layer_heads keeps all)'
      )


def active_layers(lambdas: jax.Array, has_head: np.ndarray, max_layers: int):
  """Dense λ (L, domains) -> the layers whose REPA heads run: (domains, K) 0-based indices, their λ.

  K = min(max_layers, L) is static; the indices are traced, so a new λ never recompiles. Per domain
  the K largest |λ| among layers with a head (`has_head` (L, domains) bool), ties to the shallower
  layer; unused slots carry λ = 0. λ outside that set is ignored (check_active_lambdas).
  """
  usable = jnp.where(jnp.asarray(has_head), lambdas, 0.0).T
  _, layers = jax.lax.top_k(jnp.abs(usable), min(max_layers, usable.shape[1]))
  return layers, jnp.take_along_axis(usable, layers, axis=1)


ONLINE_SELECTION = 'online_selection.json'  # in the workdir: the latest online measurement's λ


def measures_online(config) -> bool:
  """True when λ comes from FoG-A re-measured during training (no selection file given)."""
  return config.repa.selection == 'fog_a' and not config.repa.selection_file


def probes_during_training(config) -> bool:
  """True when training re-measures FoG-A every repa.probe_every steps: to set λ (online AG-REPA),
  or only to record it (repa.measure_only, the reference code's Phase I)."""
  return measures_online(config) or config.repa.measure_only


def lambda_scalars(lambdas: np.ndarray, domains) -> dict[str, float]:
  """The non-zero entries of a dense λ as metric scalars named lambda/<domain>/L<layer, 1-based>."""
  lambdas = np.asarray(lambdas)
  return {
    f'lambda/{domain}/L{layer + 1}': float(lambdas[layer, d])
    for d, domain in enumerate(domains)
    for layer in np.flatnonzero(lambdas[:, d])
  }


def cumulative_mean(old, new, count: int):
  """Mean of `count` measurements: `old` the mean of the first count − 1, `new` the newest."""
  return new if old is None else old + (new - old) / count
