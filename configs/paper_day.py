"""The paper's experiment sized for one accelerator-day: probe then intervene over 3 seeds with a
12 × 512 DiT on LibriSpeech train-clean-100 (speech, ≈ 28.5 k utterances) + AudioSet
balanced_train (audio, ≈ 22 k clips), both domains under the 1:1 sampler, the paper's teachers.

  python -m agrepa_jax.main --config configs/paper_day.py --workdir DIR \
    --config.data.speech_dir=.../LibriSpeech/train-clean-100 \
    --config.data.audio_dir=.../audioset/balanced_train \
    --config.teachers.speech.checkpoint=large-v3.pt \
    --config.teachers.audio.checkpoint=BEATs_iter3_plus_AS2M.pt \
    --config.vocoder.checkpoint=.../vocos-mel-24khz

Everything else follows the paper's single-codebook config (configs/paper_single.py): schedule,
dropout, flow matching, 10 s clips, tokens at 25 Hz, utterance-level REPA. Step time, memory and
the day's budget: docs/compare.md. `configs/paper_day.py:official` runs every variant in the
official code's forms (fidelity='official'); `:VARIANT` or `:official,VARIANT` one compare variant.
"""

import pathlib

import ml_collections

from agrepa_jax import config_base

STEPS_PER_RUN = 12_000  # ≈ 13 epochs of train-clean-100 under the 1:1 sampler at batch 64


def get_config(variant: str = ''):
  """variant: '', 'official', a compare variant (config_base.variant_config), 'official,VARIANT'."""
  fidelity, _, variant = variant.rpartition(',') if ',' in variant else ('', '', variant)
  if variant == 'official':
    fidelity, variant = variant, ''
  config = config_base.config_from_file(pathlib.Path(__file__).with_name('paper_single.py'))
  config.workflow = 'compare'
  config.batch_size = 64
  config.num_steps = STEPS_PER_RUN
  config.log_every = 100
  config.eval_every = 1000
  config.eval_batches = 16
  config.checkpoint_every = 2000

  # Model: 12 blocks of width 512 (8 heads), bf16, full remat (batch 64 of 10 s clips on one GPU).
  config.model.update(num_layers=12, width=512, num_heads=8, token_dim=512, remat='full')
  config.mesh.update(data=-1, fsdp=1)
  # Alignment of the top-level config (what --mode aot compiles); the compare workflow sets each
  # variant's. The paper's presets name layers of a 24-block model.
  config.repa.update(
    selection='fixed',
    preset='',
    layers={'speech': [1], 'audio': [1]},
    lambdas={'speech': [0.5], 'audio': [0.5]},
  )

  # Data: both domains from directories; the cache (teacher targets, tokens) is built once.
  config.data.update(source='directories', domains=('speech', 'audio'))

  # Probe (Phase I) and evaluation (every variant) on more clips than the CPU default.
  config.probe.update(num_clips=128, batch_size=32, chunk_size=4)
  config.eval.update(batch_size=32)
  config.compare = ml_collections.ConfigDict(
    dict(
      variants=('none', 'fixed:1', 'fixed:4', 'fixed:8', 'fixed:12', 'fog_a'),  # Phase II
      fixed_lambda=0.5,  # λ of the fixed-layer variants
      eval_clips=256,  # held-out clips generated per variant for FAD/WER/mel L1
      num_seeds=3,  # seeds config.seed + i; each runs the whole workflow
    )
  )
  config = config_base.with_fidelity(config, fidelity)
  return config_base.variant_config(config, variant) if variant else config
