import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agrepa_jax import audio, config_base, losses, selection
from agrepa_jax.model import AgRepaModel, BitcHeads, RepaHeads, masked_mean
from tests.helpers import tiny_model_config
from tests.test_model import randomize

DIMS = (3, 2)  # teacher widths of domain 0 and domain 1


def numpy_cos_distance(a, b):
  return 1 - (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def test_cosine_distance_hand_cases():
  a = jnp.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
  b = jnp.array([[0.0, 3.0], [2.0, 2.0], [-1.0, 0.0]])
  np.testing.assert_allclose(losses.cosine_distance(a, b), [1.0, 0.0, 2.0], atol=3e-7)


def test_flow_matching_loss_weights_frames():
  v = jnp.zeros((1, 3, 2))
  u = jnp.array([[[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]])
  # per-frame MSE 1, 4, 9; the first frame is a prompt frame (weight 0)
  np.testing.assert_allclose(losses.flow_matching_loss(v, u, jnp.array([[0.0, 1.0, 1.0]])), 6.5)
  np.testing.assert_allclose(losses.flow_matching_loss(v, u, jnp.ones((1, 3))), 14 / 3, rtol=1e-6)


def test_flow_matching_inputs_follow_the_path_and_prompt_rules():
  cfg = losses.FlowMatchingConfig()
  x1 = jax.random.normal(jax.random.key(0), (512, 40, 4))
  valid = jnp.full((512,), 30)
  out = losses.flow_matching_inputs(jax.random.key(1), x1, valid, cfg)
  t = out['t'][:, None, None]
  x0 = x1 - out['u']
  np.testing.assert_allclose(out['x_t'], (1 - t) * x0 + t * x1, atol=1e-5)
  np.testing.assert_allclose(x0.std(), cfg.noise_std, rtol=0.02)
  prompt = np.asarray(out['ref_mel'] != 0).any(-1)
  lengths = prompt.sum(1)
  kept = lengths > 0
  assert lengths.max() <= 9 and lengths[kept].min() >= 1  # r in 1..floor(0.3 * 30)
  assert np.all(prompt[kept] == (np.arange(40)[None] < lengths[kept, None]))  # a prefix
  np.testing.assert_allclose(out['ref_mel'][prompt], x1[prompt])
  assert 0.82 < kept.mean() < 0.97 and 0.82 < float(out['token_keep'].mean()) < 0.97
  np.testing.assert_array_equal(out['loss_weights'], ~prompt)
  on_prompt = losses.flow_matching_inputs(
    jax.random.key(1), x1, valid, losses.FlowMatchingConfig(loss_on_prompt=True)
  )
  np.testing.assert_array_equal(on_prompt['loss_weights'], 1.0)


def test_frame_mask():
  np.testing.assert_array_equal(
    losses.frame_mask(jnp.array([0, 256, 257]), 3, 256),
    [[False] * 3, [True, False, False], [True, True, False]],
  )


def test_bitc_loss_matches_hand_computation():
  heads = BitcHeads(4, DIMS, nnx.Rngs(0))
  e = jax.random.normal(jax.random.key(0), (3, 5, 4))
  domain = jnp.array([0, 1, 0])
  teacher = (
    jax.random.normal(jax.random.key(1), (3, 3)),
    jax.random.normal(jax.random.key(2), (3, 2)),
  )
  weights = (0.5, 1.0)
  pooled = np.asarray(e).mean(1)
  expected = 0.0
  for i, d in enumerate(np.asarray(domain).tolist()):
    norm = nnx.LayerNorm(4, rngs=nnx.Rngs(0))  # fresh LayerNorm: scale 1, bias 0
    mu, sd = pooled[i].mean(), np.sqrt(pooled[i].var() + norm.epsilon)
    projected = ((pooled[i] - mu) / sd) @ np.asarray(heads.projections[d].kernel[...]) + np.asarray(
      heads.projections[d].bias[...]
    )
    expected += weights[d] * numpy_cos_distance(projected, np.asarray(teacher[d][i])) / 3
  np.testing.assert_allclose(
    losses.bitc_loss(heads, e, teacher, domain, weights), expected, rtol=1e-5
  )


def repa_case(frames=False):
  heads = RepaHeads(num_layers=3, width=4, teacher_dims=DIMS, rngs=nnx.Rngs(0))
  shape = (3, 2, 6, 4) if frames else (3, 2, 4)
  hidden = jax.random.normal(jax.random.key(0), shape)
  teacher_shape = lambda c: (2, 5, c) if frames else (2, c)
  teacher = tuple(
    jax.random.normal(jax.random.key(i + 1), teacher_shape(c)) for i, c in enumerate(DIMS)
  )
  return heads, hidden, teacher, jnp.array([1, 0])


def head_output(heads, layer, domain, z):
  mlp = heads.per_domain[domain]
  take = lambda p: np.asarray(p[...])[layer]
  z = np.asarray(z) / np.linalg.norm(np.asarray(z), axis=-1, keepdims=True)
  hidden = np.asarray(
    jax.nn.gelu(z @ take(mlp.hidden.kernel) + take(mlp.hidden.bias), approximate=False)
  )
  return hidden @ take(mlp.out.kernel) + take(mlp.out.bias)


def test_repa_loss_utterance_matches_hand_computation():
  heads, hidden, teacher, domain = repa_case()
  lambdas = jnp.array([[0.2, 0.0], [0.0, 0.7], [0.5, 0.3]])
  expected = 0.0
  for i, d in enumerate(np.asarray(domain).tolist()):
    for layer in range(3):
      prediction = head_output(heads, layer, d, hidden[layer, i])
      expected += (
        float(lambdas[layer, d]) * numpy_cos_distance(prediction, np.asarray(teacher[d][i])) / 2
      )
  np.testing.assert_allclose(
    losses.repa_loss(heads, hidden, teacher, domain, lambdas), expected, rtol=1e-5
  )


def test_repa_loss_frame_granularity_averages_valid_frames():
  heads, hidden, teacher, domain = repa_case(frames=True)
  lambdas = jnp.array([[0.0, 0.0], [1.0, 0.4], [0.0, 0.0]])
  valid = jnp.array([[True] * 6, [True] * 3 + [False] * 3])
  from agrepa_jax.model import interpolate_linear

  expected = 0.0
  for i, d in enumerate(np.asarray(domain).tolist()):
    target = np.asarray(interpolate_linear(teacher[d], 6))[i]
    prediction = head_output(heads, 1, d, hidden[1, i])
    per_frame = numpy_cos_distance(prediction, target)
    expected += float(lambdas[1, d]) * per_frame[np.asarray(valid[i])].mean() / 2
  np.testing.assert_allclose(
    losses.repa_loss(heads, hidden, teacher, domain, lambdas, valid), expected, rtol=1e-5
  )


def test_one_hot_lambda_equals_single_layer_repa():
  heads, hidden, teacher, domain = repa_case()
  one_hot = jnp.zeros((3, 2)).at[2, :].set(1.0)
  single = np.mean(
    [
      numpy_cos_distance(head_output(heads, 2, d, hidden[2, i]), np.asarray(teacher[d][i]))
      for i, d in enumerate(np.asarray(domain).tolist())
    ]
  )
  np.testing.assert_allclose(
    losses.repa_loss(heads, hidden, teacher, domain, one_hot), single, rtol=1e-5
  )


def test_changing_lambda_does_not_recompile():
  heads, hidden, teacher, domain = repa_case()
  graphdef, state = nnx.split(heads)
  fn = jax.jit(
    lambda s, lam: losses.repa_loss(nnx.merge(graphdef, s), hidden, teacher, domain, lam)
  )
  values = [float(fn(state, lam)) for lam in (jnp.eye(3, 2), jnp.ones((3, 2)), jnp.zeros((3, 2)))]
  assert fn._cache_size() == 1
  assert values[2] == 0.0 and values[1] > values[0] > 0


def test_masked_mean_hand_cases():
  x = jnp.array([[[1.0], [2.0], [3.0], [100.0]], [[4.0], [-8.0], [50.0], [50.0]]])
  mask = jnp.array([[True, True, True, False], [True, True, False, False]])
  np.testing.assert_allclose(masked_mean(x, mask), [[2.0], [-2.0]])
  np.testing.assert_allclose(masked_mean(x, None), [[26.5], [24.0]])
  np.testing.assert_array_equal(masked_mean(x, jnp.zeros((2, 4), bool)), 0.0)  # no valid frame


def test_bitc_loss_pools_valid_frames_only():
  heads = BitcHeads(4, DIMS, nnx.Rngs(0))
  e = jax.random.normal(jax.random.key(0), (2, 5, 4))
  junk = 100 * jax.random.normal(jax.random.key(3), (2, 3, 4))
  teacher = (
    jax.random.normal(jax.random.key(1), (2, 3)),
    jax.random.normal(jax.random.key(2), (2, 2)),
  )
  domain, weights = jnp.array([0, 1]), (0.5, 1.0)
  valid = jnp.arange(8)[None] < jnp.array([[5], [5]])
  padded = losses.bitc_loss(
    heads, jnp.concatenate([e, junk], 1), teacher, domain, weights, valid_frames=valid
  )
  np.testing.assert_allclose(
    padded, losses.bitc_loss(heads, e, teacher, domain, weights), rtol=1e-6
  )


def test_active_layers_take_the_largest_lambda_among_layers_with_heads():
  lambdas = jnp.array([[0.1, 0.0], [0.0, 0.3], [0.5, 0.0], [0.2, 0.7]])
  has_head = np.array([[True, True], [False, True], [True, True], [True, False]])
  layers, weights = selection.active_layers(lambdas, has_head, 2)
  # speech: 0.5 (layer 2) then 0.2 (layer 3); audio: layer 3 has no head, so 0.3 (layer 1), then
  # an unused slot with λ = 0 on the shallowest remaining layer
  np.testing.assert_array_equal(layers, [[2, 3], [1, 0]])
  np.testing.assert_allclose(weights, [[0.5, 0.2], [0.3, 0.0]])


def test_repa_heads_exist_only_for_selectable_layers(tmp_path):
  config = config_base.base_config()
  config.model.num_layers = 6
  config.repa.update(
    selection='fixed',
    layers={'speech': [2, 5], 'audio': [4]},
    lambdas={'speech': [0.5], 'audio': [0.5]},
  )
  assert selection.repa_head_layers(config) == ((1, 4), (3,))
  config.repa.update(selection='fog_a')
  assert selection.repa_head_layers(config) == (tuple(range(6)),) * 2
  config.repa.quirks = True
  assert selection.repa_head_layers(config) == ((0, 2, 4),) * 2  # layers 1, 3, 5
  config.repa.update(selection='none', quirks=False)
  assert selection.repa_head_layers(config) == ((), ())
  config.repa.all_layer_heads = True
  assert selection.repa_head_layers(config) == (tuple(range(6)),) * 2


def test_lambdas_beyond_max_layers_or_without_a_head_are_refused(tmp_path):
  config = config_base.base_config()
  config.model.num_layers = 6
  config.repa.update(selection='fixed', layers={'speech': [1, 2, 3, 4], 'audio': [4]}, max_layers=3)
  with pytest.raises(ValueError, match='repa.max_layers=3'):
    selection.lambdas_from_config(config)
  (tmp_path / 'selection.json').write_text(
    json.dumps({'domains': {'speech': {'layers': [2], 'lambdas': [0.4]}}})
  )
  config.repa.update(
    selection='fog_a', selection_file=str(tmp_path / 'selection.json'), quirks=True
  )
  with pytest.raises(ValueError, match=r'layers \[2\] of domain .speech. have no REPA head'):
    selection.lambdas_from_config(config)


def test_repa_loss_runs_only_the_heads_of_active_layers():
  heads = RepaHeads(4, 4, DIMS, nnx.Rngs(0), layers=((0, 2, 3), (1,)))
  hidden = jax.random.normal(jax.random.key(0), (4, 2, 4))
  teacher = (
    jax.random.normal(jax.random.key(1), (2, 3)),
    jax.random.normal(jax.random.key(2), (2, 2)),
  )
  domain = jnp.array([1, 0])
  lambdas = jnp.array([[0.0, 0.0], [0.0, 0.6], [0.3, 0.0], [0.2, 0.0]])
  # clip 1 is domain 0: heads in slots 1 (layer 2) and 2 (layer 3); clip 0 is domain 1: slot 0
  distance = lambda d, slot, layer, i: numpy_cos_distance(
    head_output(heads, slot, d, hidden[layer, i]), np.asarray(teacher[d][i])
  )
  expected = (
    0.3 * distance(0, 1, 2, 1) + 0.2 * distance(0, 2, 3, 1) + 0.6 * distance(1, 0, 1, 0)
  ) / 2
  for max_layers in (2, 4):
    np.testing.assert_allclose(
      losses.repa_loss(heads, hidden, teacher, domain, lambdas, max_layers=max_layers),
      expected,
      rtol=1e-5,
    )
  # with K = 1 only the largest λ of each domain runs
  expected_k1 = (0.3 * distance(0, 1, 2, 1) + 0.6 * distance(1, 0, 1, 0)) / 2
  np.testing.assert_allclose(
    losses.repa_loss(heads, hidden, teacher, domain, lambdas, max_layers=1), expected_k1, rtol=1e-5
  )


def test_new_layer_selection_does_not_recompile_with_max_layers():
  heads, hidden, teacher, domain = repa_case()
  graphdef, state = nnx.split(heads)
  fn = jax.jit(
    lambda s, lam: losses.repa_loss(
      nnx.merge(graphdef, s), hidden, teacher, domain, lam, max_layers=1
    )
  )
  one_hot = lambda layer: jnp.zeros((3, 2)).at[layer].set(1.0)
  values = [float(fn(state, one_hot(layer))) for layer in range(3)]
  assert fn._cache_size() == 1
  for layer, value in enumerate(values):
    np.testing.assert_allclose(
      value, float(losses.repa_loss(heads, hidden, teacher, domain, one_hot(layer))), rtol=1e-6
    )


PADDING_CFG = tiny_model_config(dropout=0.0)


def pad_frames(x, frames, key):
  """(B, T, ...) -> (B, frames, ...) with large random junk after T."""
  junk = 50 * jax.random.normal(key, (x.shape[0], frames - x.shape[1], *x.shape[2:]))
  return jnp.concatenate([x, junk.astype(x.dtype)], 1)


def padded_case(frames, real, key):
  """The real (B, `real`) clip batch, draws and teacher frames padded with junk to `frames`."""
  keys = iter(jax.random.split(key, 10))
  pad = lambda x: x if frames == real else pad_frames(x, frames, next(keys))
  k = jax.random.split(jax.random.key(0), 6)
  mel = jax.random.normal(k[0], (2, real, PADDING_CFG.n_mels))
  # one token per frame, so the token interpolation to T frames is the identity on every length
  tokens = jax.random.randint(k[1], (2, 1, real), 0, PADDING_CFG.vocab_size)
  junk_tokens = jax.random.randint(next(keys), (2, 1, frames - real), 0, PADDING_CFG.vocab_size)
  num_samples = jnp.array([real, real - 4]) * audio.HOP_LENGTH
  valid = losses.frame_mask(num_samples, real, audio.HOP_LENGTH)
  inputs = losses.flow_matching_inputs(k[2], mel, valid.sum(1), losses.FlowMatchingConfig())
  inputs = {
    **inputs,
    **{name: pad(inputs[name]) for name in ('x_t', 'u', 'ref_mel')},
    'loss_weights': pad(inputs['loss_weights'][..., None])[..., 0],
  }
  batch = dict(
    mel=pad(mel),
    tokens=jnp.concatenate([tokens, junk_tokens], -1),
    domain=jnp.array([0, 1]),
    num_samples=num_samples,
    teacher={'speech': jax.random.normal(k[3], (2, 6)), 'audio': jax.random.normal(k[4], (2, 5))},
    teacher_frames={
      name: pad(jax.random.normal(key, (2, real, dim)))
      for name, key, dim in zip(('speech', 'audio'), jax.random.split(k[5]), (6, 5))
    },
  )
  return batch, inputs, losses.frame_mask(num_samples, frames, audio.HOP_LENGTH)


def first_frames_velocity(dit, batch, inputs, frames, lengths):
  velocity, _ = dit(
    inputs['x_t'], inputs['t'], batch['tokens'], inputs['ref_mel'], batch['domain'], lengths=lengths
  )
  return velocity[:, :frames]


@pytest.mark.parametrize('granularity', ['utterance', 'frame'])
def test_padding_cannot_change_the_losses_or_velocity_of_real_frames(granularity):
  model = randomize(AgRepaModel(PADDING_CFG, (6, 5), nnx.Rngs(0)))
  cfg = losses.LossConfig(
    losses.FlowMatchingConfig(), (0.5, 1.0), granularity, ('speech', 'audio'), max_layers=2
  )
  lambdas = jnp.array([[0.4, 0.0], [0.0, 0.3], [0.2, 0.5]])
  real = 12
  results = []
  for frames, key in ((real, 1), (16, 2), (21, 3)):
    batch, inputs, valid = padded_case(frames, real, jax.random.key(key))
    parts = losses.losses_given_draws(model, batch, inputs, valid, lambdas, cfg)
    real_valid = np.asarray(valid[:, :real])
    velocity = first_frames_velocity(model.backbone, batch, inputs, real, valid.sum(1))
    results.append((parts, velocity[real_valid]))
  (reference, v_reference), *padded = results
  assert all(reference[k] > 0 for k in ('loss_fm', 'loss_bitc', 'loss_repa'))
  for parts, velocity in padded:
    np.testing.assert_allclose(velocity, v_reference, rtol=1e-5, atol=1e-5)
    for name in ('loss_fm', 'loss_bitc', 'loss_repa', 'loss'):
      np.testing.assert_allclose(parts[name], reference[name], rtol=1e-5, err_msg=name)
  # without the mask the padding leaks into the real frames
  unmasked = first_frames_velocity(model.backbone, batch, inputs, real, lengths=None)
  assert not np.allclose(unmasked[real_valid], v_reference, atol=1e-3)
