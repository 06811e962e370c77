"""Probing a trained baseline (docs/method.md): FoG-A contribution, LASP storage, SCD, selection.

`config.probe` holds the settings (config_base.py); `report.run_probe` runs it all, and
`online.OnlineFogA` re-measures FoG-A during training. What a measurement covers (its schedule) is
part of the selection (selection.py), which the probes build on.
"""

from agrepa_jax.selection import (
  REFERENCE_SCHEDULE,
  ProbeSchedule,
  probed_layers,
  schedule_from_config,
)

__all__ = ['REFERENCE_SCHEDULE', 'ProbeSchedule', 'probed_layers', 'schedule_from_config']
