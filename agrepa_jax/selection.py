"""The dense (layers × domains) alignment weights λ, from config or the paper's presets."""
import numpy as np

# Layers (1-based) and λ that the paper's code selected by FoG-A for the 24-layer model (DESIGN.md §7).
PAPER_PRESETS = {
    'paper_single': {'speech': {1: 0.334, 9: 0.139, 5: 0.118}, 'audio': {1: 0.278, 21: 0.120, 9: 0.112}},
    'paper_dual': {'speech': {1: 0.506, 3: 0.131, 23: 0.108}, 'audio': {1: 0.388, 3: 0.103, 7: 0.086}},
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
  if repa.selection == 'none':
    return np.zeros((num_layers, len(domains)), np.float32)
  if repa.selection != 'fixed':
    raise ValueError(f"repa.selection={repa.selection!r}: expected 'none' or 'fixed'")
  if repa.preset:
    if repa.preset not in PAPER_PRESETS:
      raise ValueError(f'repa.preset={repa.preset!r}: expected one of {sorted(PAPER_PRESETS)} or empty')
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
