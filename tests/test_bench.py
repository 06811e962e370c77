"""The train-step bench: its FLOP count, its profile summary, and the official PyTorch step it is
compared with."""

import dataclasses
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from agrepa_jax import flops, host_memory, losses, train
from agrepa_jax import model as model_lib
from agrepa_jax.state import TrainState
from tests.reference import official
from tests.reference.export import export_weights
from tests.test_reference import (
  BATCH,
  FRAMES,
  SINGLE,
  TEACHER_DIMS,
  TOKENS,
  make_batch,
  mels,
  official_lambdas,
  official_tokens,
  official_twin,
  random_model,
  relative_error,
  to_torch,
)

OFFICIAL_STEP = dataclasses.replace(SINGLE, dropout=0.0, frozen_token_conditioning=True)
OURS = dataclasses.replace(SINGLE, time_embedding='dit', time_freq_dim=16)
DUAL = dataclasses.replace(
  SINGLE, num_codebooks=2, codebook_fusion='concat', second_vocab_size=7, bitc_form='affine'
)
MERGE = dataclasses.replace(OURS, num_codebooks=2, codebook_fusion='merge')


def loss_config(bitc: bool, max_layers: int = 3) -> losses.LossConfig:
  return losses.LossConfig(
    flow=losses.FlowMatchingConfig(loss_on_prompt=True),
    bitc_weights=(0.5, 1.0) if bitc else None,
    granularity='utterance',
    domains=('speech', 'audio'),
    bitc_skips_dropped=True,
    max_layers=max_layers,
  )


def lambdas_of(num_layers: int) -> np.ndarray:
  lambdas = np.zeros((num_layers, 2), np.float32)
  lambdas[[0, 2], 0], lambdas[[0, 1], 1] = (0.334, 0.139), (0.278, 0.12)
  return lambdas


def test_jaxpr_count_multiplies_a_scan_body_by_its_length_as_unrolled_xla_does():
  def f(w, x, unroll):
    return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w, unroll=unroll)[0].sum()

  w, x = jnp.ones((5, 16, 16)), jnp.ones((3, 16))
  for fn in (f, jax.grad(f)):
    unrolled = jax.jit(fn, static_argnums=2).lower(w, x, True).cost_analysis()['flops']
    scanned = jax.jit(fn, static_argnums=2).lower(w, x, 1).cost_analysis()['flops']
    counted = flops.jaxpr_matmul_flops(jax.make_jaxpr(fn, static_argnums=2)(w, x, 1))
    assert scanned < unrolled / 2  # XLA counts the loop body once
    assert counted == pytest.approx(unrolled, rel=0.05)  # unrolled also counts the sums
  counted = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(f), static_argnums=2)(w, x, 1))
  assert counted == 3 * 5 * 2 * 3 * 16 * 16  # forward, and two backward products per layer


@pytest.mark.parametrize(
  'name, cfg, bitc, max_layers',
  [
    ('official_forms', SINGLE, True, 3),
    ('official_step', OFFICIAL_STEP, True, 2),
    ('our_forms', OURS, True, 1),
    ('dual_concat', DUAL, False, 3),
    ('two_codebooks_merged', MERGE, True, 2),
  ],
)
def test_hand_count_equals_the_dots_of_the_gradient(name, cfg, bitc, max_layers):
  model = random_model(cfg)
  batch = make_batch(cfg)
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  loss_cfg = loss_config(bitc, max_layers)
  lambdas = jnp.asarray(lambdas_of(cfg.num_layers))

  def loss(params):
    model = nnx.merge(graphdef, params, rest)
    parts = losses.compute_losses(model, batch, lambdas, jax.random.key(0), loss_cfg, train=True)
    return parts['loss']

  counted = flops.jaxpr_matmul_flops(jax.make_jaxpr(jax.grad(loss))(params))
  by_hand = flops.train_step_flops(
    cfg, BATCH, FRAMES, TOKENS, TEACHER_DIMS, repa_heads=max_layers, bitc=bitc
  )
  assert by_hand == counted


def official_inputs(batch, inputs) -> dict:
  """Our draws (flow_matching_inputs) in the official layout."""
  return {
    't': to_torch(inputs['t']),
    'noise': mels(batch['mel'] - inputs['u']),
    'ref_mel': mels(inputs['ref_mel']),
    'kept': to_torch(inputs['token_keep']),
  }


def test_one_official_training_step_matches_ours():
  """Same weights and draws, dropout off: losses, gradient norm and every AdamW update agree."""
  cfg, learning_rate, weight_decay = OFFICIAL_STEP, 1e-3, 0.1
  model = random_model(cfg)
  reference = official_twin(model, cfg)  # OFFICIAL_STEP: dropout off
  before = {k: v.clone() for k, v in reference.state_dict().items()}

  batch = make_batch(cfg)
  lambdas = lambdas_of(cfg.num_layers)
  tx = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(learning_rate, weight_decay=weight_decay)
  )
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  rng = jax.random.key_data(jax.random.key(3))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    frozen=frozen,
    opt_state=tx.init(params),
    rng=rng,
    lambdas=jnp.asarray(lambdas),
    scores=jnp.zeros_like(lambdas),
    ema_params=None,
  )
  step_cfg = train.StepConfig(loss_config(bitc=True))
  new_state, parts = train.train_step(
    state, batch, graphdef=graphdef, tx=tx, schedule=lambda s: learning_rate, step_cfg=step_cfg
  )

  # train_step's draws: the sample half of the step key (losses.compute_losses)
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), 0)
  valid = jnp.full((BATCH,), FRAMES)
  inputs = losses.flow_matching_inputs(
    jax.random.split(key)[0], batch['mel'], valid, step_cfg.loss.flow
  )
  optimizer = torch.optim.AdamW(reference.parameters(), lr=learning_rate, weight_decay=weight_decay)
  official_batch = {
    'mel': mels(batch['mel']),
    'tokens': official_tokens(batch['tokens']),
    'domain': torch.from_numpy(np.array(batch['domain'])).long(),
    'teachers': [to_torch(batch['teacher'][d]) for d in step_cfg.loss.domains],
    'draws': official_inputs(batch, inputs),
  }
  expected, grad_norm = official.train_step(
    reference, optimizer, None, official_batch, official_lambdas(lambdas), (0.5, 1.0), None
  )
  for ours, theirs in (('loss_fm', 'fm'), ('loss_bitc', 'bitc'), ('loss_repa', 'repa')):
    assert relative_error(parts[ours], expected[theirs]) <= 1e-5, ours
  assert relative_error(parts['grad_norm'], grad_norm) <= 1e-5

  updated = official.FlowModel(reference.cfg)
  export_weights(nnx.merge(graphdef, new_state.params, new_state.frozen), updated)
  ours_after = updated.state_dict()
  trained = {name: p for name, p in reference.named_parameters() if p.grad is not None}
  assert len(trained) > 40  # blocks, heads of the selected layers, BiT-C, output
  compared = 0
  for name, parameter in trained.items():
    # Below |g| ≈ 1e-6 the first Adam step g / (|g| + 1e-8) is a ratio of rounding noise (the
    # key bias, which softmax ignores, has a zero gradient up to rounding): those entries are not
    # compared.
    clear = (parameter.grad.abs() > 1e-6).numpy()
    ours_update = (ours_after[name] - before[name]).numpy()[clear]
    official_update = (parameter.detach() - before[name]).numpy()[clear]
    assert relative_error(ours_update, official_update) <= 1e-4, name
    compared += clear.sum()
  assert compared > 0.95 * sum(p.numel() for p in trained.values())


def test_bench_prints_both_frameworks_and_their_ratio(capsys):
  from bench import train_step

  train_step.main(['--configs', 'tiny', '--steps', '1', '--rounds', '2', '--profile'])
  (line,) = capsys.readouterr().out.strip().splitlines()
  result = json.loads(line)
  # the CPU runtime's thunks, costliest first: the step's fusions and matrix products
  assert 0 < len(result['profile']) <= 10
  seconds = [op['seconds_per_step'] for op in result['profile']]
  assert seconds == sorted(seconds, reverse=True) and seconds[-1] > 0
  # HLO instructions (dot.61, ynn_fusion.91, while.3: which lead varies run to run on a shared
  # CPU), not the framework's or the runtime's spans (PjitFunction(step), ThunkExecutor::Execute)
  names = [op['op'] for op in result['profile']]
  assert all(re.fullmatch(r'[a-z][\w.$-]*', name) for name in names), names
  assert result['torch_over_jax'] == pytest.approx(
    result['torch_step_seconds'] / result['step_seconds'], rel=0.01
  )
  assert len(result['step_seconds_per_round']) == len(result['torch_step_seconds_per_round']) == 2
  assert result['flops_per_step'] > result['xla_cost_analysis_flops_per_device'] > 0
  for framework in ('jax', 'torch'):
    assert result[f'{framework}_peak_rss_bytes'] > result[f'{framework}_baseline_rss_bytes'] > 0
    assert result[f'{framework}_step_rss_bytes'] == (
      result[f'{framework}_peak_rss_bytes'] - result[f'{framework}_rss_before_steps_bytes']
    )
  # the second JAX worker loads the step from the compilation cache the first one wrote
  assert result['jax_cached_compile_seconds'] < result['compile_seconds']
  assert result['jax_cached_peak_rss_bytes'] > result['jax_cached_rss_before_steps_bytes'] > 0
  assert 0 < result['fraction_of_matmul'] and 0 < result['fog_a_fraction'] < 1
  if host_memory.huge_pages_supported():  # the JAX worker runs as main.py does
    assert 'glibc.malloc.hugetlb=1' in result['jax_glibc_tunables'].split(':')


def test_profile_summary_reads_the_device_ops_of_a_trace():
  """A GPU trace's shape: the device's 'XLA Ops' line wins over its streams' kernels and the
  host's threads; times are per step, shares of the ops' total."""
  from bench import train_step

  def span(pid, tid, name, dur, ts=0):
    return {'ph': 'X', 'pid': pid, 'tid': tid, 'name': name, 'ts': ts, 'dur': dur}

  trace = {
    'traceEvents': [
      {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/device:GPU:0'}},
      {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/host:CPU'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 7, 'args': {'name': 'XLA Ops'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 8, 'args': {'name': 'Stream #13'}},
      {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 9, 'args': {'name': 'tf_XLAClient'}},
      span(1, 7, 'fusion.3', 200),
      span(1, 7, 'custom-call.1', 600, ts=300),
      span(1, 7, 'fusion.3', 200, ts=900),
      span(1, 8, 'sm90_xmma_gemm', 5000),
      span(2, 9, 'thunk', 9000),
    ]
  }
  loop = [span(2, 9, 'while.1', 1000), span(2, 9, 'fusion.2', 300, ts=100)]
  assert train_step.self_times(loop) == [('while.1', 700), ('fusion.2', 300)]
  assert train_step.costliest_ops(trace, steps=2, top=1) == [
    {'op': 'custom-call.1', 'seconds_per_step': 0.0003, 'share': 0.6}
  ]
  assert [op['op'] for op in train_step.costliest_ops(trace, steps=2)] == [
    'custom-call.1',
    'fusion.3',
  ]
  # without an 'XLA Ops' line: the device's kernels, not its module spans
  kernels = [e for e in trace['traceEvents'] if e.get('tid') != 7]
  kernels.append(
    {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 6, 'args': {'name': 'XLA Modules'}}
  )
  kernels.append(span(1, 6, 'jit_train_step', 9999))
  assert train_step.costliest_ops({'traceEvents': kernels}, steps=1) == [
    {'op': 'sm90_xmma_gemm', 'seconds_per_step': 0.005, 'share': 1.0}
  ]


@pytest.mark.parametrize('rng', ['threefry', 'hash'])
def test_unrolled_depth_scan_computes_the_same_step(rng):
  """model.scan_unroll (a CPU speed setting) changes nothing but the program's shape."""
  cfg = dataclasses.replace(OURS, dropout_rng=rng, dropout=0.3)
  batch = make_batch(cfg)
  lambdas = jnp.asarray(lambdas_of(cfg.num_layers))
  results = []
  for unroll in (False, True):
    model = random_model(dataclasses.replace(cfg, scan_unroll=unroll))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, graphdef=graphdef, rest=rest):
      model = nnx.merge(graphdef, params, rest)
      key = jax.random.key(0)
      return losses.compute_losses(model, batch, lambdas, key, loss_config(True), True)['loss']

    results.append(jax.value_and_grad(loss)(params))
  (loss_scan, grads_scan), (loss_unrolled, grads_unrolled) = results
  np.testing.assert_allclose(loss_unrolled, loss_scan, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_unrolled), jax.tree.leaves(grads_scan)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_hash_dropout_keeps_the_rate_and_differs_by_key():
  x = jnp.ones((64, 100, 37))
  first = model_lib.dropout(x, 0.2, jax.random.key(1), 'hash')
  again = model_lib.dropout(x, 0.2, jax.random.key(1), 'hash')
  other = model_lib.dropout(x, 0.2, jax.random.key(2), 'hash')
  kept = np.asarray(first) != 0
  np.testing.assert_array_equal(first, again)
  assert abs(kept.mean() - 0.8) < 0.005  # 236 800 draws: σ ≈ 0.0008
  assert abs(float(first.mean()) - 1.0) < 0.01
  assert abs((kept == (np.asarray(other) != 0)).mean() - (0.8**2 + 0.2**2)) < 0.005  # independent
  for axis in range(3):  # no position is favoured along any axis
    assert np.abs(kept.mean(axis=tuple(a for a in range(3) if a != axis)) - 0.8).max() < 0.1


def test_step_bytes_counts_what_a_block_keeps_and_the_probability_traffic():
  from bench import step_bytes, train_step

  config = train_step.bench_config('tiny', 'official', [])  # 2 blocks × 32, 2 heads, 47 frames
  probabilities = 8 * 2 * 47 * 47 * 4  # (B, H, T, T) float32
  kept = step_bytes.block_residuals(config)
  (attention,) = [r for r in kept if r['array'] == 'f32[8,2,47,47]']  # the probabilities alone
  assert attention['bytes'] == probabilities
  assert '_probability_dropout_attention_forward' in attention['from']
  assert [r['bytes'] for r in kept] == sorted((r['bytes'] for r in kept), reverse=True)
  # the largest: the MLP's pre-activation (B, T, 4 · width), the output of mlp_in
  assert (kept[0]['array'], kept[0]['bytes']) == ('f32[8,47,128]', 8 * 47 * 128 * 4)
  assert 'Linear.__call__' in kept[0]['from']
  for remat, passes in (('none', 17), ('full', 23)):
    moved = step_bytes.probability_bytes(step_bytes.with_model(config, remat=remat))
    assert moved == {
      'passes_per_layer': passes,
      'bytes_per_layer': passes * probabilities,
      'bytes': 2 * passes * probabilities,
    }
  branch = step_bytes.with_model(config, dropout_positions='branch')
  assert step_bytes.probability_bytes(branch)['bytes'] == 0


def test_attention_bench_tells_a_mask_that_ignores_its_key():
  import jax.numpy as jnp

  from bench import attention

  b, t, h, d = 2, 16, 2, 8
  q = jnp.ones((b, t, h, d), jnp.bfloat16)
  inputs = (q, q, q, jnp.array([16, 9]), jnp.ones((b, t, h, d), jnp.float32))
  official = attention.measure(attention.forms(0.2)['official_hash'], inputs, steps=1)
  assert not official['same_output_for_two_keys'] and official['temp_bytes'] > 0
  static = attention.measure(lambda q, k, v, lengths, key: q * 2, inputs, steps=1)
  assert static['same_output_for_two_keys']
