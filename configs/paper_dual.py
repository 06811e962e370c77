"""The paper's dual-codebook experiment: configs/paper_single.py with two token streams and the
paper's FoG-A layers and λ for the dual-codebook model.

As in the official code, the second stream holds BEATs tokenizer labels (vocabulary 1024, one table
for both domains), the two embeddings are concatenated and projected per domain (2048 → 1024) before
interpolation, and the model trains without BiT-C. External tokens (data.token_dir) hold the two
streams as rows of a (2, N) array.

  python -m agrepa_jax.main --config configs/paper_dual.py --workdir DIR [as paper_single.py]

`configs/paper_dual.py:official`: the official code's training step exactly (as paper_single.py).
"""

import pathlib

from agrepa_jax import config_base


def get_config(variant: str = ''):
  """variant '' (ours) or 'official' (fidelity='official')."""
  config = config_base.config_from_file(pathlib.Path(__file__).with_name('paper_single.py'))
  config.model.update(num_codebooks=2, codebook_fusion='concat', second_vocab_size=1024)
  config.bitc.enabled = False
  config.repa.preset = 'paper_dual'
  return config_base.with_fidelity(config, variant)
