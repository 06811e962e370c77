"""The embedded default: a small model on generated speech and sound events, runnable on a laptop CPU.

python -m agrepa_jax.main --config configs/default.py --workdir workdir/default
"""

from agrepa_jax import config_base


def get_config():
  return config_base.embedded_config()
