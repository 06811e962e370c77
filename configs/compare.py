"""The paper's workflow, probe then intervene, over 3 seeds on the embedded default data:

  python -m agrepa_jax.main --config configs/compare.py --workdir DIR

For each seed: trains Phase I (BiT-C, no hidden-state alignment), probes it (FoG-A, LASP, SCD,
selection), trains the Phase II variants from the same initialization and data order, and
evaluates every variant (FAD, WER, mel L1 on compare.eval_clips held-out clips). Then writes
DIR/compare.csv (mean ± std over seeds, paired differences with 95% intervals), compare_runs.csv,
compare_curves.png and compare.html (docs/compare.md). About 20 minutes on 2 CPU cores, measured
(docs/compare.md). One variant on its own:
--config configs/compare.py:VARIANT with VARIANT none, fixed:<layer> or fog_a (then also
--config.repa.selection_file=.../selection.json, or FoG-A is re-measured during training).
"""

import pathlib

import ml_collections

from agrepa_jax import config_base


def get_config(variant: str = ''):
  config = config_base.config_from_file(pathlib.Path(__file__).with_name('default.py'))
  config.num_steps = 120
  config.eval_every = 40
  config.checkpoint_every = 120
  config.workflow = 'compare'
  config.compare = ml_collections.ConfigDict(
    dict(
      variants=('none', 'fixed:1', 'fixed:2', 'fixed:4', 'fog_a'),  # Phase II variants
      fixed_lambda=0.5,  # λ of the fixed-layer variants
      eval_clips=8,  # held-out clips generated per variant for FAD/WER/mel L1; 0 = skip
      num_seeds=3,  # seeds config.seed + i; each runs the whole workflow (Phase I, probe, Phase II)
    )
  )
  return config_base.variant_config(config, variant) if variant else config
