"""The paper's model with a single codebook: 24 blocks, width 1024, vocab 4096; Whisper large-v3
(speech) and BEATs iter3+ AS2M (audio) teachers; AdamW 1e-4, one-cycle over 3 epochs; REPA on the
paper's FoG-A layer/λ preset for this model (DESIGN.md §7).

Point data.speech_dir / data.audio_dir at LibriSpeech and AudioSet audio and teachers.*.checkpoint at
the teacher checkpoints; --mode aot needs none of them.
"""

from agrepa_jax import config_base


def get_config():
  return config_base.paper_config(num_codebooks=1, preset='paper_single')
