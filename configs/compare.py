"""The paper's workflow on the embedded default, in one command:

  python -m agrepa_jax.main --config configs/compare.py --workdir DIR

trains Phase I (BiT-C, no hidden-state alignment), probes it (FoG-A, LASP, SCD, selection), trains
the Phase II variants from the same initialization and data order, and writes DIR/compare.csv and
DIR/compare_curves.png. One variant on its own: --config configs/compare.py:VARIANT, with VARIANT
none, fixed:<layer> or ag_repa (then also --config.repa.selection_file=.../probe/selection.json, or
AG-REPA re-measures FoG-A during training).
"""

import ml_collections

from agrepa_jax import compare, config_base


def get_config(variant: str = ''):
  config = config_base.embedded_config()
  config.num_steps = 300
  config.eval_every = 50
  config.checkpoint_every = 300
  config.workflow = 'compare'
  config.compare = ml_collections.ConfigDict(
    dict(
      variants=('none', 'fixed:1', 'fixed:2', 'fixed:4', 'ag_repa'),
      fixed_lambda=0.5,
      eval_clips=16,  # held-out clips generated per variant for FAD/WER/mel L1; 0 = skip
    )
  )
  return compare.variant_config(config, variant) if variant else config
