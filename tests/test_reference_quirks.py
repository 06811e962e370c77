"""The official code's probe quirks behind repa.quirks.

FoG-A on the clean mel labelled t with fresh dropout in every forward pass, and λ from the
cumulative mean of every FoG-A measurement.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax import config_base
from agrepa_jax.probe import REFERENCE_SCHEDULE, fog_a
from agrepa_jax.probe import batch as probe_batch
from agrepa_jax.probe.online import OnlineFogA
from tests.test_probe import CFG, FRAMES, make_batch, make_dit


def test_clean_input_feeds_the_mel_itself_labelled_t():
  batch = make_batch()
  noise = probe_batch.clip_noise(jax.random.key(0), 4, (FRAMES, CFG.n_mels))
  inputs = probe_batch.model_inputs(batch, jnp.float32(0.8), noise, 0.15, clean=True)
  np.testing.assert_array_equal(inputs['x_t'], batch['mel'])
  np.testing.assert_array_equal(inputs['t'], np.full(4, 0.8, np.float32))


def test_fresh_dropout_draws_a_new_mask_in_every_forward_pass():
  dit, batch = make_dit(), make_batch()
  noise = probe_batch.clip_noise(jax.random.key(0), 4, (FRAMES, CFG.n_mels))
  key = jax.random.key(3)
  inputs = probe_batch.model_inputs(batch, jnp.float32(0.8), noise, 0.15, clean=True)
  masks = np.concatenate([np.ones((1, CFG.num_layers)), 1 - np.eye(CFG.num_layers)])
  keys = jax.random.split(key, CFG.num_layers + 1)
  graphdef, state = nnx.split(dit)
  valid = probe_batch.valid_frames(batch['num_samples'], FRAMES)
  forward = jax.jit(
    lambda gates, k: nnx.merge(graphdef, state)(
      **inputs, gates=gates, dropout_key=k, lengths=valid.sum(1)
    )[0]
  )
  velocities = [forward(jnp.asarray(m, jnp.float32), k) for m, k in zip(masks, keys)]
  expected = fog_a.relative_rms(jnp.stack(velocities[1:]), velocities[0], valid)
  fresh = fog_a.naive_clip_scores(
    dit, batch, 0.8, noise, dropout_key=key, clean_input=True, fresh_dropout=True
  )
  shared = fog_a.naive_clip_scores(dit, batch, 0.8, noise, dropout_key=key, clean_input=True)
  np.testing.assert_allclose(fresh, expected, rtol=2e-5, atol=1e-6)
  assert not np.allclose(fresh, shared, rtol=1e-3)


def test_fog_a_table_in_training_mode_runs_the_official_probe():
  dit, batch = make_dit(), make_batch()
  key = jax.random.key(4)
  table, _ = fog_a.fog_a_table(
    dit, batch, (0.8,), key, num_domains=2, batch_size=4, dropout=True, clean_input=True
  )
  noise = probe_batch.clip_noise(key, 4, (FRAMES, CFG.n_mels))
  per_clip = fog_a.naive_clip_scores(
    dit,
    batch,
    0.8,
    noise,
    dropout_key=probe_batch.dropout_key(key, 0, 0),
    clean_input=True,
    fresh_dropout=True,
  )
  means, _ = fog_a.domain_means(np.asarray(per_clip), np.asarray(batch['domain']), 2)
  np.testing.assert_allclose(table[:, 0], means, rtol=1e-6)


def online_fog_a(quirks: bool, num_layers: int = 4) -> OnlineFogA:
  """An OnlineFogA without a probe set: `update` needs only the config and the schedule."""
  config = config_base.base_config()
  config.model.num_layers = num_layers
  config.repa.update(selection='fog_a', quirks=quirks, score_ema=0.5)
  config.probe.update(top_k=2, lambda_rule='raw')
  return OnlineFogA(config)


def test_quirks_average_every_measurement_cumulatively():
  online = online_fog_a(quirks=True)
  assert online.schedule == REFERENCE_SCHEDULE
  measurements = [
    np.array([[0.3, 0.1], [0.0, 0.0], [0.1, 0.4], [0.0, 0.0]]),
    np.array([[0.1, 0.3], [0.0, 0.0], [0.2, 0.2], [0.0, 0.0]]),
    np.array([[0.2, 0.2], [0.0, 0.0], [0.6, 0.3], [0.0, 0.0]]),
  ]
  averaged = None
  for count, scores in enumerate(measurements, start=1):
    lambdas, averaged = online.update(scores, averaged, count)
  np.testing.assert_allclose(averaged, np.mean(measurements, 0), rtol=1e-12)
  # raw λ on the odd (1-based) layers: the averaged scores themselves
  np.testing.assert_allclose(lambdas, [[0.2, 0.2], [0, 0], [0.3, 0.3], [0, 0]], rtol=1e-6)


def test_without_quirks_the_average_is_the_moving_one():
  online = online_fog_a(quirks=False)
  first, second = np.full((4, 2), 0.2), np.full((4, 2), 0.6)
  _, averaged = online.update(first, None, 1)
  _, averaged = online.update(second, averaged, 2)
  np.testing.assert_allclose(averaged, 0.5 * first + 0.5 * second)
