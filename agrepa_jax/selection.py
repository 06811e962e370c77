"""The dense (layers × domains) alignment weights λ: from config, the paper's presets, or FoG-A."""

import numpy as np

# Layers (1-based) and λ that the paper's code selected by FoG-A for the 24-layer model (DESIGN.md §7).
PAPER_PRESETS = {
  'paper_single': {
    'speech': {1: 0.334, 9: 0.139, 5: 0.118},
    'audio': {1: 0.278, 21: 0.120, 9: 0.112},
  },
  'paper_dual': {
    'speech': {1: 0.506, 3: 0.131, 23: 0.108},
    'audio': {1: 0.388, 3: 0.103, 7: 0.086},
  },
}


def dense_lambdas(per_domain: dict[str, dict[int, float]], num_layers: int, domains) -> np.ndarray:
  """{domain: {layer (1-based): λ}} -> (num_layers, len(domains)) float32."""
  lambdas = np.zeros((num_layers, len(domains)), np.float32)
  for d, domain in enumerate(domains):
    for layer, weight in per_domain.get(domain, {}).items():
      if not 1 <= layer <= num_layers:
        raise ValueError(f'repa: layer {layer} for domain {domain!r} is outside 1..{num_layers}')
      lambdas[layer - 1, d] = weight
  return lambdas


def lambdas_from_config(config) -> np.ndarray:
  repa, domains, num_layers = config.repa, tuple(config.data.domains), config.model.num_layers
  if repa.selection == 'none' or measures_online(config):
    return np.zeros(
      (num_layers, len(domains)), np.float32
    )  # online FoG-A sets λ at its first measurement
  if repa.selection == 'fog_a':
    from agrepa_jax.probe import select

    return dense_lambdas(select.read_selection(repa.selection_file), num_layers, domains)
  if repa.selection != 'fixed':
    raise ValueError(f"repa.selection={repa.selection!r}: expected 'none', 'fixed' or 'fog_a'")
  if repa.preset:
    if repa.preset not in PAPER_PRESETS:
      raise ValueError(
        f'repa.preset={repa.preset!r}: expected one of {sorted(PAPER_PRESETS)} or empty'
      )
    return dense_lambdas(PAPER_PRESETS[repa.preset], num_layers, domains)
  per_domain = {}
  for domain in domains:
    layers = list(repa.layers[domain])
    weights = list(repa.lambdas[domain])
    if len(weights) == 1:
      weights = weights * len(layers)
    if len(weights) != len(layers):
      raise ValueError(f'repa.lambdas.{domain} has {len(weights)} values for {len(layers)} layers')
    per_domain[domain] = dict(zip(layers, weights))
  return dense_lambdas(per_domain, num_layers, domains)


def measures_online(config) -> bool:
  """True when λ comes from FoG-A re-measured during training (no selection file given)."""
  return config.repa.selection == 'fog_a' and not config.repa.selection_file


def lambda_scalars(lambdas: np.ndarray, domains) -> dict[str, float]:
  """The non-zero entries of a dense λ as metric scalars named lambda/<domain>/L<layer, 1-based>."""
  lambdas = np.asarray(lambdas)
  return {
    f'lambda/{domain}/L{layer + 1}': float(lambdas[layer, d])
    for d, domain in enumerate(domains)
    for layer in np.flatnonzero(lambdas[:, d])
  }


class OnlineFogA:
  """Re-measures FoG-A on a fixed held-out probe batch and turns the moving-average scores into λ.

  The probe settings (t values, clips, top-K, λ rule) are `config.probe`'s, or the reference code's
  with `repa.quirks`; `repa.score_ema` is the decay of the moving average.
  """

  def __init__(self, config, heldout_source):
    from agrepa_jax import probe
    from agrepa_jax.probe import batch as probe_batch

    self.config, self.domains = config, tuple(config.data.domains)
    self.schedule = probe.schedule_from_config(config)
    clip_domains = np.asarray(heldout_source.arrays['domain'])
    rows = probe_batch.balanced_indices(
      clip_domains, len(self.domains), self.schedule.num_clips, config.probe.seed
    )
    self.batch = probe_batch.stack_records([heldout_source[int(i)] for i in rows], self.domains)
    self.eligible = probe.probed_layers(config.model.num_layers, self.schedule)

  def measure(self, dit, step: int, mesh) -> np.ndarray:
    """(L, domains) FoG-A scores of the current model, its ablations split over the training mesh.

    The dropout draw of the reference-quirk schedule follows `step`.
    """
    import jax

    from agrepa_jax.probe import fog_a, select

    probe = self.config.probe
    key = jax.random.fold_in(jax.random.key(probe.seed), step)
    table, _ = fog_a.fog_a_table(
      dit,
      self.batch,
      self.schedule.t_values,
      key,
      num_domains=len(self.domains),
      batch_size=probe.batch_size,
      chunk_size=probe.chunk_size,
      mesh=mesh,
      prompt_fraction=probe.prompt_fraction,
      dropout=self.schedule.dropout,
      noise_std=self.config.flow.noise_std,
    )
    return select.layer_scores(table, self.schedule.t_values, probe.selection_t)

  def update(
    self, scores: np.ndarray, previous: np.ndarray | None
  ) -> tuple[np.ndarray, np.ndarray]:
    """New (λ, moving-average scores) from fresh scores; a domain absent from the probe keeps its old scores."""
    from agrepa_jax.probe import select

    if previous is not None:
      scores = np.where(np.isfinite(scores), scores, previous)
    averaged = select.ema_update(previous, scores, self.config.repa.score_ema)
    probe = self.config.probe
    silent = ~(np.nan_to_num(averaged) > 0).any(
      0
    )  # a domain whose blocks all score 0 selects nothing yet
    chosen = select.select_layers(
      np.where(silent[None], np.nan, averaged),
      self.domains,
      top_k=probe.top_k,
      rule=self.schedule.lambda_rule,
      total=probe.lambda_total,
      temperature=probe.softmax_temperature,
      eligible=self.eligible,
    )
    return dense_lambdas(chosen, self.config.model.num_layers, self.domains), averaged
