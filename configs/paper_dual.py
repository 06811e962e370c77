"""The paper's model with dual codebooks (two token streams, concatenated and projected) and the
paper's FoG-A layer/λ preset for it. Otherwise as configs/paper_single.py."""

from agrepa_jax import config_base


def get_config():
  return config_base.paper_config(num_codebooks=2, preset='paper_dual')
