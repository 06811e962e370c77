"""Probing a trained baseline (docs/method.md): FoG-A contribution, LASP storage, SCD, selection.

`config.probe` holds the settings (config_base.py); `report.run_probe` runs it all.
"""

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ProbeSchedule:
  """What a FoG-A measurement covers: which t, how many clips, dropout, which layers."""

  t_values: tuple[float, ...]
  num_clips: int
  dropout: bool  # training mode: a fresh dropout draw in every forward pass (the official)
  clean_input: bool  # the model reads the clean mel x1 labelled t (the official), not x_t
  odd_layers_only: (
    bool  # only 1-based odd layers are probed; even layers score 0 and are never selected
  )
  lambda_rule: str  # how selected layers' scores become λ (selection.layer_lambdas)


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


def probed_layers(num_layers: int, schedule: ProbeSchedule):
  """(L,) bool: the layers a schedule measures (index 0 is layer 1)."""
  layers = np.arange(1, num_layers + 1)
  return layers % 2 == 1 if schedule.odd_layers_only else np.ones(num_layers, bool)
