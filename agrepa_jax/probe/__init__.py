"""Probing a trained baseline (DESIGN.md §7): FoG-A contribution, LASP storage, SCD, and layer selection.

`probe_config()` holds the settings (attached as `config.probe`); `report.run_probe` runs it all.
"""

import dataclasses

import ml_collections
import numpy as np


def probe_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      checkpoint_step=-1,  # -1: the latest checkpoint of the workdir
      num_clips=32,  # held-out clips, balanced over domains
      batch_size=16,  # clips per probe forward
      t_values=(0.1, 0.3, 0.5, 0.7, 0.9),
      prompt_fraction=0.15,  # fixed prompt: the first ⌊f·valid frames⌋ of x1; 0 = no prompt
      chunk_size=1,  # FoG-A lanes (two ablations each) side by side per device; 1 suits CPUs
      # and large models, more helps where one lane leaves an accelerator idle
      top_k=3,
      selection_t=-1.0,  # t whose FoG-A scores select layers; -1: the mean over t_values
      lambda_rule='normalized',  # normalized (Σλ = lambda_total) | softmax | raw (the paper's code; also repa.quirks)
      lambda_total=0.5,  # Σλ per domain for normalized and softmax
      softmax_temperature=0.1,
      seed=0,
      lasp_t=0.5,  # t of the hidden states the storage probes read
      ridge_alpha=1.0,
      ridge_fit_fraction=0.5,  # share of each domain's clips the ridge probe is fitted on
    )
  )


@dataclasses.dataclass(frozen=True)
class ProbeSchedule:
  """What a FoG-A measurement covers: which t, how many clips, dropout, which layers."""

  t_values: tuple[float, ...]
  num_clips: int
  dropout: bool  # training mode: one dropout draw shared by all gate settings of a batch
  odd_layers_only: (
    bool  # only 1-based odd layers are probed; even layers score 0 and are never selected
  )
  lambda_rule: str  # how selected layers' scores become λ (select.layer_lambdas)


# Reference quirks (DESIGN.md §9): the paper's code probes in training mode at t = 0.8 on 2 clips,
# only odd-numbered layers, and uses the raw score as λ.
REFERENCE_SCHEDULE = ProbeSchedule(
  t_values=(0.8,), num_clips=2, dropout=True, odd_layers_only=True, lambda_rule='raw'
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
    odd_layers_only=False,
    lambda_rule=probe.lambda_rule,
  )


def probed_layers(num_layers: int, schedule: ProbeSchedule):
  """(L,) bool: the layers a schedule measures (index 0 is layer 1)."""
  layers = np.arange(1, num_layers + 1)
  return layers % 2 == 1 if schedule.odd_layers_only else np.ones(num_layers, bool)
