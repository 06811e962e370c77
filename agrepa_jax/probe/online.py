"""FoG-A re-measured during training (online AG-REPA, or the reference code's Phase I record).

Every `repa.probe_every` steps the train loop calls `OnlineFogA.reselect`: FoG-A on a fixed
held-out probe batch, an average over the measurements so far, and the λ that the average selects
(selection.py turns scores into λ; this module only measures and averages).
"""

import json

import jax
import numpy as np
from etils import epath
from flax import nnx

from agrepa_jax import selection, sharding
from agrepa_jax.probe import batch as probe_batch
from agrepa_jax.probe import fog_a


class OnlineFogA:
  """Re-measures FoG-A on a fixed held-out probe batch and turns the averaged scores into λ.

  The probe settings (t values, clips, top-K, λ rule) are `config.probe`'s, or the reference code's
  with `repa.quirks`. The average is a moving one with decay `repa.score_ema`, or with
  `repa.quirks` the official cumulative mean of every measurement so far. With
  `repa.measure_only` the averaged scores are kept but the run's λ stay as configured.
  """

  def __init__(self, config, heldout_source=None):
    """heldout_source: the held-out CachedSplit the probe batch is drawn from (None: `measure`
    cannot run, `update` can)."""
    self.config, self.domains = config, tuple(config.data.domains)
    self.schedule = selection.schedule_from_config(config)
    self.eligible = selection.probed_layers(config.model.num_layers, self.schedule)
    self.latest = None  # (step, λ chosen from the averaged scores) of the latest measurement
    self.batch = None
    if heldout_source is not None:
      clip_domains = np.asarray(heldout_source.arrays['domain'])
      rows = probe_batch.balanced_indices(
        clip_domains, len(self.domains), self.schedule.num_clips, config.probe.seed
      )
      records = [heldout_source[int(i)] for i in rows]
      self.batch = probe_batch.stack_records(records, self.domains)

  def measure(self, dit, step: int, mesh) -> np.ndarray:
    """(L, domains) FoG-A scores of the current model, its ablations split over the training mesh.

    The dropout draw of the reference-quirk schedule follows `step`.
    """
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
      clean_input=self.schedule.clean_input,
      noise_std=self.config.flow.noise_std,
      mask_padding=self.config.model.mask_padding,
    )
    return selection.layer_scores(table, self.schedule.t_values, probe.selection_t)

  def update(
    self, scores: np.ndarray, previous: np.ndarray | None, count: int = 1
  ) -> tuple[np.ndarray, np.ndarray]:
    """New (λ, averaged scores) from fresh scores, the `count`-th measurement of the run.

    A domain absent from the probe keeps its old scores.
    """
    if previous is not None:
      scores = np.where(np.isfinite(scores), scores, previous)
    if self.config.repa.quirks:
      averaged = selection.cumulative_mean(previous, scores, count)
    else:
      averaged = selection.ema_update(previous, scores, self.config.repa.score_ema)
    probe = self.config.probe
    # a domain whose blocks all score 0 selects nothing yet
    silent = ~(np.nan_to_num(averaged) > 0).any(0)
    chosen = selection.select_layers(
      np.where(silent[None], np.nan, averaged),
      self.domains,
      top_k=probe.top_k,
      rule=self.schedule.lambda_rule,
      total=probe.lambda_total,
      temperature=probe.softmax_temperature,
      eligible=self.eligible,
    )
    return selection.dense_lambdas(chosen, self.config.model.num_layers, self.domains), averaged

  def reselect(self, state, graphdef, mesh):
    """Measures FoG-A on the current model; returns `state` with the new λ and score average."""
    model = nnx.merge(graphdef, state.params, state.frozen)
    step = int(state.step)
    scores = self.measure(model.backbone, step, mesh)
    previous = np.asarray(jax.device_get(state.scores))
    count = step // self.config.repa.probe_every  # measurements so far, this one included
    lambdas, averaged = self.update(scores, previous if previous.any() else None, count)
    self.latest = (step, lambdas)
    put = lambda x: jax.device_put(np.asarray(x, np.float32), sharding.replicated(mesh))
    if not selection.measures_online(self.config):
      return state.replace(scores=put(averaged))
    return state.replace(lambdas=put(lambdas), scores=put(averaged))

  def write_latest(self, path: epath.Path):
    """The latest measurement's selection as a selection.json (`repa.selection_file` reads it)."""
    step, lambdas = self.latest
    chosen = {
      domain: {int(layer) + 1: float(lambdas[layer, d]) for layer in np.flatnonzero(lambdas[:, d])}
      for d, domain in enumerate(self.domains)
    }
    settings = {'step': step, 'measurements': step // self.config.repa.probe_every}
    path.write_text(json.dumps(selection.selection_json(chosen, **settings), indent=2))
