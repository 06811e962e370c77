"""Parity with a PyTorch re-implementation of the official model (tests/reference/official.py).

Our model in the official forms (the paper configs' model keys) gets random weights, which are
exported into the reference; velocity, per-layer hidden states, FM/BiT-C/REPA losses, FoG-A scores
and guided sway sampling then agree to ≤ 1e-5 relative in float32, for one and two codebooks.
Dropout is off (evaluation mode): the two frameworks draw different random masks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from agrepa_jax import audio, losses
from agrepa_jax.generation import sampler
from agrepa_jax.model import AgRepaModel, ModelConfig
from agrepa_jax.probe import batch as probe_batch
from agrepa_jax.probe import fog_a
from tests.reference.export import export_weights, official_channels
from tests.reference.official import FlowModel, OfficialConfig

SINGLE = ModelConfig(
  num_layers=3,
  width=32,
  num_heads=4,
  token_dim=16,
  vocab_size=11,
  n_mels=8,
  dropout=0.2,
  token_tables='per_domain',
  time_embedding='official',
  dropout_positions='official',
  modulation_init='normal',
  bitc_form='official',
)
DUAL = dataclasses.replace(SINGLE, num_codebooks=2, codebook_fusion='concat', second_vocab_size=7)
CONFIGS = {'single': SINGLE, 'dual': DUAL}
TEACHER_DIMS = (6, 5)
BATCH, FRAMES, TOKENS = 4, 12, 5
TOLERANCE = 1e-5

torch.set_num_threads(1)


def relative_error(ours, official) -> float:
  """max |ours − official| / max |official|."""
  ours, official = np.asarray(ours, np.float64), np.asarray(official, np.float64)
  return float(np.abs(ours - official).max() / np.abs(official).max())


def to_torch(x, dtype=torch.float32):
  return torch.from_numpy(np.array(x)).to(dtype)


def mels(x):
  """Our (B, T, n_mels) -> the official (B, n_mels, T)."""
  return to_torch(x).permute(0, 2, 1)


def random_model(cfg: ModelConfig, seed: int = 0) -> AgRepaModel:
  """Our model with every parameter (frozen ones too) drawn from N(0, 0.2²)."""
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: AgRepaModel(cfg, TEACHER_DIMS, nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)  # numpy: drawing with JAX would compile a program per shape
  draws = [0.2 * rng.standard_normal(x.shape).astype(np.float32) for x in leaves]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, [jnp.asarray(x) for x in draws]))


def official_twin(ours: AgRepaModel, cfg: ModelConfig) -> FlowModel:
  """The reference model at the dimensions and settings of `cfg`, holding `ours`'s weights."""
  reference = FlowModel(
    OfficialConfig(
      num_layers=cfg.num_layers,
      width=cfg.width,
      num_heads=cfg.num_heads,
      n_mels=cfg.n_mels,
      token_dim=cfg.token_dim,
      vocab_size=cfg.vocab_size,
      teacher_dims=TEACHER_DIMS,
      dual=cfg.num_codebooks == 2,
      beats_vocab_size=cfg.second_vocab_size,
      mlp_ratio=cfg.mlp_ratio,
      dropout=cfg.dropout,
    )
  )
  export_weights(ours, reference)
  return reference


@functools.cache
def models(name: str) -> tuple[AgRepaModel, FlowModel]:
  """Our model with random parameters (random_model), and the reference holding its weights."""
  ours = random_model(CONFIGS[name])
  return ours, official_twin(ours, CONFIGS[name]).eval()


def make_batch(cfg: ModelConfig, seed: int = 1) -> dict:
  """Full-length clips (every frame holds audio), two per domain."""
  k = jax.random.split(jax.random.key(seed), 4)
  tokens = [
    jax.random.randint(jax.random.fold_in(k[0], c), (BATCH, TOKENS), 0, vocab)
    for c, vocab in enumerate(cfg.vocab_sizes)
  ]
  return {
    'mel': jax.random.normal(k[1], (BATCH, FRAMES, cfg.n_mels)),
    'tokens': jnp.stack(tokens, 1),
    'domain': jnp.array([0, 1, 0, 1], jnp.int32),
    'num_samples': jnp.full((BATCH,), FRAMES * audio.HOP_LENGTH),
    'teacher': {
      'speech': jax.random.normal(k[2], (BATCH, TEACHER_DIMS[0])),
      'audio': jax.random.normal(k[3], (BATCH, TEACHER_DIMS[1])),
    },
  }


def official_tokens(tokens) -> torch.Tensor:
  """Our (B, K, N) streams -> the official (B, K·N) layout, interleaved m1, b1, m2, b2, ..."""
  tokens = np.asarray(tokens)
  return torch.from_numpy(tokens.transpose(0, 2, 1).reshape(tokens.shape[0], -1)).long()


def official_lambdas(lambdas: np.ndarray) -> dict[int, dict[int, float]]:
  """Dense (L, domains) λ -> {domain: {0-based layer: λ}} of its non-zero entries."""
  return {
    d: {int(layer): float(lambdas[layer, d]) for layer in np.flatnonzero(lambdas[:, d])}
    for d in range(lambdas.shape[1])
  }


def fused_embedding(reference: FlowModel, batch: dict) -> torch.Tensor:
  domain = torch.from_numpy(np.array(batch['domain'])).long()
  return reference.fused_embedding(official_tokens(batch['tokens']), domain, FRAMES)


@pytest.mark.parametrize('name', CONFIGS)
def test_velocity_and_per_layer_hidden_states_match(name):
  ours, reference = models(name)
  batch = make_batch(ours.backbone.cfg)
  k = jax.random.split(jax.random.key(2), 3)
  x_t = jax.random.normal(k[0], batch['mel'].shape)
  t = jax.random.uniform(k[1], (BATCH,))
  ref_mel = jax.random.normal(k[2], batch['mel'].shape)
  velocity, extras = ours.backbone(
    x_t, t, batch['tokens'], ref_mel, batch['domain'], hidden='frame'
  )
  with torch.no_grad():
    fused = fused_embedding(reference, batch)
    expected, hidden = reference.predict_velocity(
      mels(x_t), to_torch(t), torch.cat([fused, mels(ref_mel)], 1)
    )
  width = ours.backbone.cfg.width
  assert relative_error(extras['token_embedding'], fused.permute(0, 2, 1)) <= TOLERANCE
  assert relative_error(np.swapaxes(velocity, 1, 2), expected) <= TOLERANCE
  per_layer = np.asarray(extras['hidden'])[..., official_channels(width)]
  for layer in range(ours.backbone.cfg.num_layers):
    assert relative_error(per_layer[layer], hidden[layer]) <= TOLERANCE


@pytest.mark.parametrize('name', CONFIGS)
def test_flow_matching_bitc_and_repa_losses_match(name):
  ours, reference = models(name)
  cfg = ours.backbone.cfg
  batch = make_batch(cfg)
  dual = cfg.num_codebooks == 2
  loss_cfg = losses.LossConfig(
    flow=losses.FlowMatchingConfig(loss_on_prompt=True, token_drop_prob=0.5),
    bitc_weights=None if dual else (0.5, 1.0),  # the official dual-codebook model has no BiT-C
    granularity='utterance',
    domains=('speech', 'audio'),
    bitc_skips_dropped=True,
  )
  lambdas = np.zeros((cfg.num_layers, 2), np.float32)
  lambdas[[0, 2], 0], lambdas[[0, 1], 1] = (0.334, 0.139), (0.278, 0.12)
  key = jax.random.key(5)
  parts = losses.compute_losses(ours, batch, jnp.asarray(lambdas), key, loss_cfg, train=False)

  # The same draws as compute_losses: t, noise, prompt and token drops from its sample key.
  valid = jnp.full((BATCH,), FRAMES)
  inputs = losses.flow_matching_inputs(jax.random.split(key)[0], batch['mel'], valid, loss_cfg.flow)
  kept = np.asarray(inputs['token_keep'])
  assert 0 < kept.sum() < BATCH  # both kinds of clip take part
  with torch.no_grad():
    expected = reference.losses(
      x=mels(batch['mel']),
      t=to_torch(inputs['t']),
      noise=mels(batch['mel'] - inputs['u']),
      fused=fused_embedding(reference, batch),
      ref_mel=mels(inputs['ref_mel']),
      kept=to_torch(kept),
      domain_ids=torch.from_numpy(np.array(batch['domain'])).long(),
      teachers=[to_torch(batch['teacher'][d]) for d in loss_cfg.domains],
      lambdas=official_lambdas(lambdas),
      bitc_weights=loss_cfg.bitc_weights,
    )
  assert relative_error(parts['loss_fm'], expected['fm']) <= TOLERANCE
  assert relative_error(parts['loss_repa'], expected['repa']) <= TOLERANCE
  if dual:
    assert float(parts['loss_bitc']) == 0.0
  else:
    assert relative_error(parts['loss_bitc'], expected['bitc']) <= TOLERANCE


def official_fog_a(reference: FlowModel, batch: dict, key, clean_input: bool) -> np.ndarray:
  """(L, domains) official FoG-A scores at t = 0.8 on the probe inputs `fog_a_table` draws."""
  noise = probe_batch.clip_noise(key, len(batch['domain']), batch['mel'].shape[1:])
  inputs = probe_batch.model_inputs(batch, jnp.float32(0.8), noise, 0.15, clean_input)
  with torch.no_grad():
    cond = torch.cat([fused_embedding(reference, batch), mels(inputs['ref_mel'])], 1)
    scores = reference.fog_attribution(
      mels(inputs['x_t']), cond, 0.8, torch.from_numpy(np.array(batch['domain']))
    )
  return np.array([scores[layer] for layer in range(reference.cfg.num_layers)])


@pytest.mark.parametrize('clean_input', [True, False], ids=['clean_mel_at_0.8', 'noisy_x_t'])
@pytest.mark.parametrize('name', CONFIGS)
def test_fog_a_scores_match(name, clean_input):
  ours, reference = models(name)
  batch = make_batch(ours.backbone.cfg)
  key = jax.random.key(7)
  table, counts = fog_a.fog_a_table(
    ours.backbone, batch, (0.8,), key, num_domains=2, batch_size=BATCH, clean_input=clean_input
  )
  np.testing.assert_array_equal(counts, [2, 2])
  assert (
    relative_error(table[:, 0], official_fog_a(reference, batch, key, clean_input)) <= TOLERANCE
  )


@pytest.mark.parametrize('name', CONFIGS)
def test_guided_sway_sampling_matches_step_by_step(name):
  ours, reference = models(name)
  batch = make_batch(ours.backbone.cfg)
  prompt = jnp.arange(FRAMES)[None, :, None] < jnp.array([3, 2, 4, 1])[:, None, None]
  ref_mel = jnp.where(prompt, batch['mel'], 0.0)
  x0 = 0.5 * jax.random.normal(jax.random.key(9), batch['mel'].shape)
  weight, num_points, sway = 3.0, 6, -1.0

  def velocity(x, t):
    """The official guidance v_u + w·(v_c − v_u) from our backbone's two passes."""
    run = lambda keep: ours.backbone(
      x, jnp.full((BATCH,), t), batch['tokens'], ref_mel, batch['domain'], token_keep=keep
    )[0]
    v_cond, v_uncond = run(jnp.ones(BATCH)), run(jnp.zeros(BATCH))
    return v_uncond + weight * (v_cond - v_uncond)

  grid = sampler.sway_time_grid(num_points, sway)
  states = [x0]
  for t, t_next in zip(grid[:-1], grid[1:]):
    states.append(states[-1] + (t_next - t) * velocity(states[-1], t))
  with torch.no_grad():
    expected = reference.sample_trajectory(
      mels(x0), fused_embedding(reference, batch), mels(ref_mel), num_points, weight, sway
    )
  for step, state in enumerate(states):
    assert relative_error(np.swapaxes(state, 1, 2), expected[step]) <= TOLERANCE, step
  final = sampler.euler_integrate(velocity, x0, grid)
  assert relative_error(np.swapaxes(final, 1, 2), expected[-1]) <= TOLERANCE
