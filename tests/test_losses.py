import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax import losses
from agrepa_jax.model import BitcHeads, RepaHeads

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
