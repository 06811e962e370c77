import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals

from agrepa_jax import ops
from agrepa_jax.model import (
  AgRepaModel,
  BitcHeads,
  DiTBlock,
  Frozen,
  ModelConfig,
  attention,
  attention_with_probability_dropout,
  interpolate_linear,
  run_blocks,
  sinusoidal_features,
)
from tests.helpers import tiny_model_config

CFG = tiny_model_config()


def randomize(module, seed=0, scale=0.1):
  """Replaces every parameter with noise, so zero-initialized layers do not hide bugs."""
  graphdef, state = nnx.split(module)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  noisy = [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, noisy))


def inputs(cfg=CFG, batch=2, frames=12, seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return dict(
    x_t=jax.random.normal(k[0], (batch, frames, cfg.n_mels)),
    t=jax.random.uniform(k[1], (batch,)),
    tokens=jax.random.randint(k[2], (batch, cfg.num_codebooks, 5), 0, cfg.vocab_size),
    ref_mel=jax.random.normal(k[3], (batch, frames, cfg.n_mels)),
    domain=jnp.array([0, 1][:batch]),
  )


@pytest.fixture(scope='module')
def model():
  return randomize(AgRepaModel(CFG, (6, 5), nnx.Rngs(0)).backbone)


def test_block_with_zero_gate_is_exactly_identity():
  block = randomize(DiTBlock(CFG, nnx.Rngs(1)))
  h = jax.random.normal(jax.random.key(2), (2, 12, CFG.width))
  time_emb = jax.random.normal(jax.random.key(3), (2, CFG.width))
  out = block(h, time_emb, jnp.float32(0.0), dropout_key=jax.random.key(4))
  np.testing.assert_array_equal(out, h)
  assert not np.allclose(block(h, time_emb, jnp.float32(1.0)), h)


def test_all_ones_gates_equal_ungated_model_and_an_unrolled_loop(model):
  x = inputs()
  v_default, _ = model(**x)
  v_ones, _ = model(**x, gates=jnp.ones(CFG.num_layers))
  np.testing.assert_array_equal(v_default, v_ones)

  # The scan over stacked blocks equals calling each layer's block in a Python loop.
  graphdef, state = nnx.split(model.blocks)
  h = jax.random.normal(jax.random.key(5), (2, 12, CFG.width))
  time_emb = jax.random.normal(jax.random.key(6), (2, CFG.width))
  scanned, pooled = run_blocks(
    model.blocks, h, time_emb, jnp.ones(CFG.num_layers), None, 'utterance', 'none'
  )
  looped = h
  for layer in range(CFG.num_layers):
    looped = nnx.merge(graphdef, jax.tree.map(lambda a, i=layer: a[i], state))(
      looped, time_emb, 1.0
    )
    np.testing.assert_allclose(pooled[layer], looped.mean(1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(scanned, looped, rtol=1e-4, atol=1e-5)


def test_zero_gate_skips_exactly_that_block(model):
  graphdef, state = nnx.split(model.blocks)
  h = jax.random.normal(jax.random.key(5), (2, 12, CFG.width))
  time_emb = jax.random.normal(jax.random.key(6), (2, CFG.width))
  gates = jnp.array([1.0, 0.0, 1.0])
  out, _ = run_blocks(model.blocks, h, time_emb, gates, None, 'none', 'none')
  block = lambda i: nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
  expected = block(2)(block(0)(h, time_emb, 1.0), time_emb, 1.0)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_remat_policies_do_not_change_values_or_gradients(model):
  x = inputs()
  graphdef, state = nnx.split(model)

  def loss(state, remat):
    m = nnx.merge(graphdef, state)
    m.cfg = ModelConfig(**{**CFG.__dict__, 'remat': remat})
    return jnp.square(m(**x)[0]).mean()

  base, base_grad = jax.value_and_grad(loss)(state, 'none')
  for policy in ('full', 'dots'):
    value, grad = jax.value_and_grad(loss)(state, policy)
    np.testing.assert_allclose(value, base, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, base_grad)


def test_interpolate_linear_matches_half_pixel_hand_case():
  x = jnp.array([[[0.0], [4.0]]])  # (B=1, N=2, C=1) -> 4 frames
  # source positions (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, 1.25, clamped to [0, 1]
  np.testing.assert_allclose(interpolate_linear(x, 4)[0, :, 0], [0.0, 1.0, 3.0, 4.0])


def test_token_embedding_is_unit_norm_per_frame_and_domain_specific(model):
  x = inputs()
  e = model.token_encoder(x['tokens'], x['domain'], 12)
  np.testing.assert_allclose(jnp.linalg.norm(e, axis=-1), 1.0, rtol=1e-5)
  e_swapped = model.token_encoder(x['tokens'], 1 - x['domain'], 12)
  assert not np.allclose(e, e_swapped)


def test_dropped_tokens_remove_token_information(model):
  x = inputs()
  other_tokens = (x['tokens'] + 1) % CFG.vocab_size
  drop = jnp.zeros(2)
  v1, _ = model(**x, token_keep=drop)
  v2, _ = model(**{**x, 'tokens': other_tokens}, token_keep=drop)
  np.testing.assert_allclose(v1, v2, atol=1e-6)
  v3, _ = model(**{**x, 'tokens': other_tokens})
  assert not np.allclose(v1, v3)


def test_dropout_is_deterministic_per_key_and_off_without_key(model):
  x = inputs()
  a, _ = model(**x, dropout_key=jax.random.key(0))
  b, _ = model(**x, dropout_key=jax.random.key(0))
  c, _ = model(**x, dropout_key=jax.random.key(1))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_dual_codebook_and_hidden_shapes():
  cfg = ModelConfig(**{**CFG.__dict__, 'num_codebooks': 2})
  net = AgRepaModel(cfg, (6, 5), nnx.Rngs(0))
  x = inputs(cfg)
  v, extras = net.backbone(**x, hidden='frame')
  assert v.shape == (2, 12, cfg.n_mels)
  assert extras['hidden'].shape == (cfg.num_layers, 2, 12, cfg.width)
  assert extras['token_embedding'].shape == (2, 12, cfg.token_dim)
  assert net.repa_heads(0, extras['hidden']).shape == (cfg.num_layers, 2, 12, 6)
  assert net.repa_heads(1, extras['hidden'].mean(2)).shape == (cfg.num_layers, 2, 5)


def test_zero_initialized_layers_make_fresh_blocks_identity():
  net = AgRepaModel(CFG, (6, 5), nnx.Rngs(0)).backbone
  h = jax.random.normal(jax.random.key(2), (2, 12, CFG.width))
  out, _ = run_blocks(
    net.blocks, h, jnp.ones((2, CFG.width)), jnp.ones(CFG.num_layers), None, 'none', 'none'
  )
  np.testing.assert_array_equal(out, h)


def test_per_domain_tables_give_one_token_two_embeddings_and_shared_tables_one():
  for tables, differs in (('per_domain', True), ('shared', False)):
    cfg = ModelConfig(**{**CFG.__dict__, 'token_tables': tables})
    encoder = AgRepaModel(cfg, (6, 5), nnx.Rngs(0)).backbone.token_encoder
    tokens = jnp.array([[[3, 7, 1]], [[3, 7, 1]]])
    streams = encoder.embed(tokens, jnp.array([0, 1]))
    assert encoder.embeddings[0].embedding.shape == ((2 if differs else 1) * CFG.vocab_size, 16)
    assert np.allclose(streams[0][0], streams[0][1]) != differs


def test_concat_fusion_projects_both_streams_per_domain_before_interpolation():
  cfg = ModelConfig(
    **{**CFG.__dict__, 'num_codebooks': 2, 'codebook_fusion': 'concat', 'second_vocab_size': 7}
  )
  encoder = randomize(AgRepaModel(cfg, (6, 5), nnx.Rngs(0)).backbone.token_encoder)
  assert encoder.domain_projection.shape == (2, 2 * cfg.token_dim, cfg.token_dim)
  assert encoder.merge is None and encoder.embeddings[1].embedding.shape == (7, cfg.token_dim)
  tokens = jnp.array([[[1, 2, 3], [4, 5, 6]], [[1, 2, 3], [4, 5, 6]]])
  domain = jnp.array([0, 1])
  main, second = encoder.embed(tokens, domain)
  np.testing.assert_array_equal(second[0], second[1])  # one table of second-stream labels
  projected = jnp.einsum(
    'bnd,bde->bne', jnp.concatenate([main, second], -1), encoder.domain_projection[...][domain]
  )
  expected = projected / jnp.linalg.norm(projected, axis=-1, keepdims=True)
  np.testing.assert_allclose(encoder(tokens, domain, 3), expected, rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='model.codebook_fusion'):
    ModelConfig(**{**CFG.__dict__, 'codebook_fusion': 'concat'})


def test_unknown_form_names_the_config_field():
  with pytest.raises(ValueError, match='model.time_embedding'):
    ModelConfig(**{**CFG.__dict__, 'time_embedding': 'sinusoid'})
  with pytest.raises(ValueError, match='bitc.form'):
    ModelConfig(**{**CFG.__dict__, 'bitc_form': 'plain'})


def test_official_time_embedding_reads_raw_t_with_width_features():
  cfg = ModelConfig(**{**CFG.__dict__, 'time_embedding': 'official'})
  dit = randomize(AgRepaModel(cfg, (6, 5), nnx.Rngs(0)).backbone)
  assert dit.time_mlp_in.kernel.shape == (cfg.width, 4 * cfg.width)
  assert dit.time_mlp_out.kernel.shape == (4 * cfg.width, cfg.width)
  t = jnp.array([0.0, 0.25])
  hidden = jax.nn.silu(dit.time_mlp_in(sinusoidal_features(t, cfg.width)))
  np.testing.assert_allclose(dit.time_embedding(t), dit.time_mlp_out(hidden), rtol=1e-6)


@pytest.mark.parametrize(
  'positions, shapes',
  [
    ('branch', [(2, 12, 32), (2, 12, 32)]),  # the attention and MLP branch outputs
    ('official', [(2, 4, 12, 12), (2, 12, 128), (2, 12, 32)]),  # probabilities, GELU, MLP
  ],
)
def test_dropout_positions(monkeypatch, positions, shapes):
  import agrepa_jax.model as model_lib

  seen = []
  original = model_lib.dropout
  monkeypatch.setattr(model_lib, 'dropout', lambda x, *a: seen.append(x.shape) or original(x, *a))
  block = DiTBlock(ModelConfig(**{**CFG.__dict__, 'dropout_positions': positions}), nnx.Rngs(1))
  h = jax.random.normal(jax.random.key(2), (2, 12, CFG.width))
  block(h, jnp.ones((2, CFG.width)), jnp.float32(1.0), dropout_key=jax.random.key(3))
  assert seen == shapes


def test_modulation_init_normal_has_the_official_scale():
  cfg = ModelConfig(**{**CFG.__dict__, 'width': 128, 'modulation_init': 'normal'})
  kernel = np.asarray(DiTBlock(cfg, nnx.Rngs(0)).modulation.kernel[...])
  assert abs(kernel.std() - 0.02) < 1e-3 and abs(kernel.mean()) < 1e-3


def test_official_bitc_heads_have_no_affine_terms_and_skip_dropped_clips():
  from agrepa_jax import losses

  heads = BitcHeads(4, (3, 2), nnx.Rngs(0), official=True)
  assert jax.tree.leaves(nnx.state(heads.norms)) == []
  assert heads.projections[0].bias is None
  e = jax.random.normal(jax.random.key(0), (3, 5, 4))
  teacher = (
    jax.random.normal(jax.random.key(1), (3, 3)),
    jax.random.normal(jax.random.key(2), (3, 2)),
  )
  domain = jnp.array([0, 0, 1])
  keep = jnp.array([1.0, 0.0, 1.0])
  pooled = e.mean(1)
  centered = pooled - pooled.mean(-1, keepdims=True)
  normed = centered / jnp.sqrt(centered.var(-1, keepdims=True) + 1e-5)
  distance = lambda d, rows: losses.cosine_distance(
    normed[rows] @ heads.projections[d].kernel[...], teacher[d][rows]
  )
  expected = (0.5 * distance(0, 0) + 1.0 * distance(1, 2)) / 3  # clip 1's tokens were dropped
  got = losses.bitc_loss(heads, e, teacher, domain, (0.5, 1.0), keep)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_frozen_token_conditioning_freezes_every_token_variable():
  cfg = ModelConfig(**{**CFG.__dict__, 'frozen_token_conditioning': True})
  model = AgRepaModel(cfg, (6, 5), nnx.Rngs(0))
  assert jax.tree.leaves(nnx.state(model.backbone.token_encoder, nnx.Param)) == []
  frozen = nnx.state(model.backbone.token_encoder, Frozen)
  assert len(jax.tree.leaves(frozen)) == 2  # the table and the projections
  np.testing.assert_array_equal(
    model.backbone.token_encoder.domain_projection[...], np.broadcast_to(np.eye(16), (2, 16, 16))
  )


def test_attention_with_lengths_equals_attention_on_the_unpadded_clip():
  q, k, v = (jax.random.normal(key, (2, 7, 2, 4)) for key in jax.random.split(jax.random.key(0), 3))
  out = attention(q, k, v, jnp.array([7, 4]))
  np.testing.assert_allclose(out[0], attention(q[:1], k[:1], v[:1], None)[0], rtol=1e-6)
  short = attention(q[1:, :4], k[1:, :4], v[1:, :4], None)[0]
  np.testing.assert_allclose(out[1, :4], short, rtol=1e-5, atol=1e-6)
  # the official form (dropout on the probabilities; none at rate 0) masks the same keys
  official = attention_with_probability_dropout(q, k, v, 0.0, jax.random.key(1), jnp.array([7, 4]))
  np.testing.assert_allclose(official, out, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('rng', ['hash', 'threefry', 'rbg'])
def test_probability_dropout_attention_gradient_equals_autodiff(rng):
  import agrepa_jax.model as model_lib

  q, k, v, weights = (
    jax.random.normal(key, (3, 9, 2, 4)) for key in jax.random.split(jax.random.key(0), 4)
  )
  lengths = jnp.array([9, 4, 0])
  key = model_lib.dropout_rng_key(jax.random.key(3), rng)

  def composed(q, k, v):  # the plain composition, differentiated by JAX
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / 2.0
    keys_valid = model_lib.valid_mask(jnp.maximum(lengths, 1), 9)[:, None, None, :]
    probs = jax.nn.softmax(jnp.where(keys_valid, logits, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.einsum('bhqk,bkhd->bqhd', model_lib.dropout(probs, 0.3, key, rng), v)

  def loss(attend):
    return lambda q, k, v: (attend(q, k, v) * weights).sum()

  written_out = lambda q, k, v: attention_with_probability_dropout(q, k, v, 0.3, key, lengths, rng)
  got = jax.value_and_grad(loss(written_out), (0, 1, 2))(q, k, v)
  expected = jax.value_and_grad(loss(composed), (0, 1, 2))(q, k, v)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_official_block_keeps_one_attention_and_one_mlp_sized_array_for_backward(capsys):
  """What the backward pass of an official-form block keeps: the attention probabilities (not the
  dropout mask or the dropped probabilities) and the MLP's input to the GELU (not the GELU's
  intermediates, its output, the masks or the dropped outputs)."""
  cfg = tiny_model_config(dropout_positions='official', dropout_rng='hash')
  graphdef, params = nnx.split(randomize(DiTBlock(cfg, nnx.Rngs(1))))
  h = jax.random.normal(jax.random.key(2), (2, 12, cfg.width))
  time_emb = jax.random.normal(jax.random.key(3), (2, cfg.width))
  block_sum = lambda params, h: nnx.merge(graphdef, params)(
    h, time_emb, 1.0, jax.random.key(4)
  ).sum()
  print_saved_residuals(block_sum, params, h)
  saved = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
  mlp_width = cfg.mlp_ratio * cfg.width
  assert saved.count(f'f32[2,{cfg.num_heads},12,12]') == 1
  assert saved.count(f'f32[2,12,{mlp_width}]') == 1
  assert not any(shape.startswith('bool') for shape in saved)


def test_utterance_pooling_averages_valid_frames_of_each_layer(model):
  graphdef, state = nnx.split(model.blocks)
  h = jax.random.normal(jax.random.key(5), (2, 12, CFG.width))
  time_emb = jax.random.normal(jax.random.key(6), (2, CFG.width))
  lengths = jnp.array([12, 5])
  _, pooled = run_blocks(
    model.blocks, h, time_emb, jnp.ones(CFG.num_layers), None, 'utterance', 'none', lengths
  )
  looped = h
  for layer in range(CFG.num_layers):
    block = nnx.merge(graphdef, jax.tree.map(lambda a, layer=layer: a[layer], state))
    looped = block(looped, time_emb, 1.0, None, lengths)
    np.testing.assert_allclose(pooled[layer, 0], looped[0].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(pooled[layer, 1], looped[1, :5].mean(0), rtol=1e-4, atol=1e-5)


def test_rbg_dropout_is_deterministic_per_key(model):
  x = inputs()
  graphdef, state = nnx.split(model)
  rbg = nnx.merge(graphdef, state)
  rbg.cfg = ModelConfig(**{**CFG.__dict__, 'dropout_rng': 'rbg'})
  a, _ = rbg(**x, dropout_key=jax.random.key(0))
  b, _ = rbg(**x, dropout_key=jax.random.key(0))
  c, _ = rbg(**x, dropout_key=jax.random.key(1))
  threefry, _ = model(**x, dropout_key=jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c) and not np.allclose(a, threefry)
  np.testing.assert_array_equal(rbg(**x)[0], model(**x)[0])  # evaluation draws nothing
  rbg.cfg = ModelConfig(**{**CFG.__dict__, 'dropout_rng': 'philox'})
  with pytest.raises(ValueError, match='model.dropout_rng'):
    rbg(**x, dropout_key=jax.random.key(0))


def test_gelu_is_the_exact_erf_gelu_with_its_gradient():
  x = jnp.linspace(-12.0, 12.0, 4001)
  np.testing.assert_allclose(ops.gelu(x), jax.nn.gelu(x, approximate=False), atol=2e-6)
  grad = jax.vmap(jax.grad(ops.gelu))(x)
  np.testing.assert_allclose(
    grad, jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=False)))(x), atol=2e-6
  )
  # Φ(1) = 0.8413447, φ(1) = 0.2419707: gelu(±1) = ±Φ(±1), gelu'(1) = Φ(1) + φ(1)
  np.testing.assert_allclose(ops.gelu(jnp.array([1.0, -1.0])), [0.8413447, -0.1586553], atol=1e-6)
  np.testing.assert_allclose(jax.grad(ops.gelu)(1.0), 0.8413447 + 0.2419707, atol=1e-6)
