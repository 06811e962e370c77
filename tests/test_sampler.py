import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agrepa_jax import sharding
from agrepa_jax.generation import sampler
from agrepa_jax.model import DiT
from tests.helpers import tiny_model_config

CFG = tiny_model_config(num_layers=2)
BATCH, FRAMES = 8, 12


def random_dit(cfg=CFG, seed=0, scale=0.1):
  """A DiT with every parameter drawn as noise (so zero-initialized layers hide no bug), built from
  abstract shapes and numpy draws: eager initialization would compile one kernel per shape."""
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(cfg, nnx.Rngs(0))))
  rng = np.random.default_rng(seed)
  state = jax.tree.map(lambda x: jnp.asarray(scale * rng.standard_normal(x.shape), x.dtype), state)
  return nnx.merge(graphdef, state)


@pytest.fixture(scope='module')
def backbone():
  return random_dit()


@pytest.fixture(scope='module')
def conditioning():
  k = jax.random.split(jax.random.key(1), 3)
  return dict(
    tokens=jax.random.randint(k[0], (BATCH, 1, 5), 0, CFG.vocab_size),
    ref_mel=jax.random.normal(k[1], (BATCH, FRAMES, CFG.n_mels)),
    domain=jnp.arange(BATCH) % 2,
    prompt_mask=jnp.asarray(sampler.leading_frames_mask(np.arange(BATCH) % 4, FRAMES)),
  )


def test_sway_zero_is_uniform_and_minus_one_is_monotone_from_zero_to_one():
  np.testing.assert_allclose(sampler.sway_time_grid(9, 0.0), np.linspace(0, 1, 9), atol=1e-7)
  grid = np.asarray(sampler.sway_time_grid(32, -1.0))
  assert grid[0] == 0.0 and abs(grid[-1] - 1.0) < 1e-6
  assert (np.diff(grid) > 0).all()
  uniform = np.linspace(0, 1, 32)
  np.testing.assert_allclose(grid, 1 - np.cos(np.pi / 2 * uniform), atol=1e-6)
  assert grid[1] - grid[0] < 0.01 < grid[-1] - grid[-2]  # small steps near the noise end


def gaussian_flow_velocity(sigma0, sigma1, mu):
  """Exact marginal velocity of x_t = (1 − t)x0 + t·x1, x0 ~ N(0, σ0²) ⟂ x1 ~ N(μ, σ1²).

  x_t ~ N(tμ, s_t²) with s_t² = (1 − t)²σ0² + t²σ1², and (x − tμ)/s_t is constant along the flow,
  so v = μ + (s_t'/s_t)(x − tμ) and x0 flows to μ + (σ1/σ0)·x0.
  """

  def velocity(x, t):
    variance = (1 - t) ** 2 * sigma0**2 + t**2 * sigma1**2
    return mu + (t * sigma1**2 - (1 - t) * sigma0**2) / variance * (x - t * mu)

  return velocity


@pytest.mark.parametrize('sway', [0.0, -1.0])
def test_euler_converges_to_the_exact_gaussian_flow_endpoint_at_first_order(sway):
  sigma0, sigma1, mu = 0.5, 1.5, 2.0
  x0 = sigma0 * jax.random.normal(jax.random.key(0), (16,))
  exact = mu + sigma1 / sigma0 * x0
  errors = np.array(
    [
      float(
        jnp.abs(
          sampler.euler_integrate(
            gaussian_flow_velocity(sigma0, sigma1, mu), x0, sampler.sway_time_grid(steps + 1, sway)
          )
          - exact
        ).max()
      )
      for steps in (8, 16, 32, 64, 128)
    ]
  )
  np.testing.assert_allclose(errors[:-1] / errors[1:], 2.0, atol=0.15)  # error ∝ 1/N
  assert errors[-1] < 0.05


@pytest.mark.parametrize(
  'form, weight, expected',
  [
    ('official', 0.0, [1.0, -2.0]),  # w = 0: the unconditional velocity
    ('official', 1.0, [3.0, 4.0]),  # w = 1: the conditional velocity
    ('official', 3.0, [7.0, 16.0]),  # 1 + 3·(3 − 1), −2 + 3·(4 + 2)
    ('f5', 0.0, [3.0, 4.0]),  # w = 0: the conditional velocity
    ('f5', 3.0, [9.0, 22.0]),  # 3 + 3·(3 − 1), 4 + 3·(4 + 2)
  ],
)
def test_guidance_forms_by_hand(form, weight, expected):
  conditional, unconditional = jnp.array([3.0, 4.0]), jnp.array([1.0, -2.0])
  np.testing.assert_allclose(sampler.guide(conditional, unconditional, weight, form), expected)


def test_f5_guidance_is_official_guidance_one_weight_higher():
  conditional, unconditional = jnp.array([0.3, -1.2]), jnp.array([-0.7, 0.4])
  np.testing.assert_allclose(
    sampler.guide(conditional, unconditional, 3.0, 'f5'),
    sampler.guide(conditional, unconditional, 4.0, 'official'),
    rtol=1e-6,
  )


def test_unknown_guidance_form_names_the_config_key():
  with pytest.raises(ValueError, match='sample.cfg_form'):
    sampler.guide(jnp.zeros(2), jnp.zeros(2), 1.0, 'f5tts')


def test_cfg_is_one_batched_extrapolation_of_conditional_and_unconditional_velocities(
  backbone, conditioning
):
  c = conditioning
  x_t = jax.random.normal(jax.random.key(2), (BATCH, FRAMES, CFG.n_mels))
  t = jnp.linspace(0.1, 0.9, BATCH)
  args = (x_t, t, c['tokens'], c['ref_mel'], c['domain'])
  velocity = nnx.jit(lambda model, keep: model(*args, token_keep=keep)[0])
  conditional, unconditional = (
    velocity(backbone, jnp.ones(BATCH)),
    velocity(backbone, jnp.zeros(BATCH)),
  )
  assert float(jnp.abs(conditional - unconditional).max()) > 1e-3  # dropping tokens matters
  guided = nnx.jit(sampler.cfg_velocity, static_argnames='form')
  np.testing.assert_allclose(guided(backbone, *args, 0.0), unconditional, atol=1e-5)
  np.testing.assert_allclose(guided(backbone, *args, 1.0), conditional, atol=1e-5)
  np.testing.assert_allclose(
    guided(backbone, *args, 3.0), unconditional + 3.0 * (conditional - unconditional), atol=1e-4
  )
  np.testing.assert_allclose(
    guided(backbone, *args, 3.0, form='f5'),
    conditional + 3.0 * (conditional - unconditional),
    atol=1e-4,
  )


def python_loop_sample(backbone, c, key, num_points, sway, cfg_weight, noise_std):
  """Reference: Euler steps in a Python loop over the sway grid, then the prompt frames copied
  in."""
  reference = jnp.where(c['prompt_mask'][..., None], c['ref_mel'], 0.0)
  x = noise_std * jax.random.normal(key, reference.shape)
  grid = np.asarray(sampler.sway_time_grid(num_points, sway))
  velocity = nnx.jit(sampler.cfg_velocity)
  for t, t_next in zip(grid[:-1], grid[1:]):
    v = velocity(
      backbone, x, jnp.full((BATCH,), t), c['tokens'], reference, c['domain'], cfg_weight
    )
    x = x + (t_next - t) * v
  return jnp.where(c['prompt_mask'][..., None], reference, x)


def test_jitted_sampler_equals_python_loop_and_copies_the_prompt(backbone, conditioning):
  c = conditioning
  key = jax.random.key(3)
  out = sampler.sample(
    backbone,
    c['tokens'],
    c['ref_mel'],
    c['domain'],
    key,
    c['prompt_mask'],
    num_points=6,
    sway=-1.0,
    cfg_weight=2.0,
    noise_std=0.5,
  )
  expected = python_loop_sample(backbone, c, key, 6, -1.0, 2.0, 0.5)
  np.testing.assert_allclose(out, expected, atol=1e-5)
  mask = np.asarray(c['prompt_mask'])
  np.testing.assert_array_equal(np.asarray(out)[mask], np.asarray(c['ref_mel'])[mask])
  assert np.isfinite(np.asarray(out)).all() and np.abs(np.asarray(out)[~mask]).mean() > 0.1


def test_reference_outside_the_prompt_is_ignored(backbone, conditioning):
  c = conditioning
  scrambled = jnp.where(c['prompt_mask'][..., None], c['ref_mel'], 7.0)
  sample = lambda ref: sampler.sample(
    backbone, c['tokens'], ref, c['domain'], jax.random.key(4), c['prompt_mask'], num_points=4
  )
  np.testing.assert_array_equal(sample(c['ref_mel']), sample(scrambled))


def test_sharded_sampling_equals_single_device(backbone, conditioning):
  c = conditioning
  mesh = sharding.make_mesh({'data': 4, 'fsdp': 2})
  run = lambda mesh: sampler.sample(
    backbone,
    c['tokens'],
    c['ref_mel'],
    c['domain'],
    jax.random.key(5),
    c['prompt_mask'],
    num_points=4,
    mesh=mesh,
  )
  sharded = run(mesh)
  assert sharded.sharding.is_fully_replicated and len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(sharded, run(None), atol=1e-5)


def test_prompt_lengths_from_seconds_or_fraction_leave_a_frame_to_generate():
  hop_seconds = 256 / 24000
  num_samples = np.array(
    [24000, 2400, 257]
  )  # 94, 10 and 2 frames whose center holds audio (frame_mask)
  np.testing.assert_array_equal(sampler.prompt_lengths(num_samples, 0.5), [47, 9, 1])
  np.testing.assert_array_equal(sampler.prompt_lengths(num_samples, 3 * hop_seconds), [3, 3, 1])
  np.testing.assert_array_equal(
    sampler.prompt_lengths(num_samples, 0.5, prompt_fraction=0.25), [23, 2, 0]
  )
  np.testing.assert_array_equal(
    sampler.prompt_lengths(np.array([256]), 0.5), [0]
  )  # one frame: nothing to copy
  np.testing.assert_array_equal(
    sampler.leading_frames_mask([2, 0], 3), [[True, True, False], [False] * 3]
  )
