"""The paper's dual-codebook experiment: configs/paper_single.py with two token streams and the
paper's FoG-A layers and λ for the dual-codebook model.

  python -m agrepa_jax.main --config configs/paper_dual.py --workdir DIR [as paper_single.py]
"""

import pathlib

from agrepa_jax import config_base


def get_config():
  config = config_base.config_from_file(pathlib.Path(__file__).with_name('paper_single.py'))
  config.model.num_codebooks = 2
  config.repa.preset = 'paper_dual'
  return config
