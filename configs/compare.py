"""The paper's workflow, probe then intervene, on the embedded default data:

  python -m agrepa_jax.main --config configs/compare.py --workdir DIR

trains Phase I (BiT-C, no hidden-state alignment), probes it (FoG-A, LASP, SCD, selection), trains
the Phase II variants from the same initialization and data order, and writes DIR/compare.csv and
DIR/compare_curves.png. About 20 minutes on a 2-core CPU. One variant on its own:
--config configs/compare.py:VARIANT with VARIANT none, fixed:<layer> or fog_a (then also
--config.repa.selection_file=.../probe/selection.json, or FoG-A is re-measured during training).
"""

import pathlib

import ml_collections

from agrepa_jax import config_base


def get_config(variant: str = ''):
  config = config_base.config_from_file(pathlib.Path(__file__).with_name('default.py'))
  config.num_steps = 300
  config.eval_every = 50
  config.checkpoint_every = 300
  config.workflow = 'compare'
  config.compare = ml_collections.ConfigDict(
    dict(
      variants=('none', 'fixed:1', 'fixed:2', 'fixed:4', 'fog_a'),  # Phase II variants
      fixed_lambda=0.5,  # λ of the fixed-layer variants
      eval_clips=16,  # held-out clips generated per variant for FAD/WER/mel L1; 0 = skip
    )
  )
  return config_base.variant_config(config, variant) if variant else config
