import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from agrepa_jax import checkpoint, sharding, train
from agrepa_jax import state as state_lib
from agrepa_jax.data import pipeline, prepare
from tests.helpers import tiny_config, write_fake_cache


def dims(config):
  _, _, meta = prepare.prepare(config)
  return tuple(meta['teacher_dims'][d] for d in config.data.domains)


def first_batches(config, n):
  train_source, _, _ = prepare.prepare(config)
  iterator = iter(pipeline.training_dataset(train_source, config.batch_size, config.data.seed))
  return [next(iterator) for _ in range(n)]


def run_steps(config, mesh_axes, batches, lambdas):
  """Initializes on a mesh and runs the given batches; returns per-step losses and final params."""
  mesh = sharding.make_mesh(mesh_axes, jax.devices()[: int(np.prod(list(mesh_axes.values())))])
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, shardings = state_lib.sharded_init(config, dims(config), tx, mesh)
  step_cfg = train.StepConfig.from_config(config, prepare.prepare(config)[0].spec)
  step = train.jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh)
  history = []
  state = state.replace(lambdas=jnp.asarray(lambdas))
  for batch in batches:
    state, parts = step(state, sharding.global_batch(batch, mesh))
    history.append(jax.device_get(parts))
  return history, state, step


@pytest.fixture
def config(tmp_path):
  config = tiny_config(tmp_path / 'cache')
  write_fake_cache(config)
  return config


def test_train_step_on_8_devices_matches_one_device(config):
  from agrepa_jax import selection

  batches = first_batches(config, 3)
  lambdas = selection.lambdas_from_config(config)
  single, _, _ = run_steps(config, {'data': 1, 'fsdp': 1}, batches, lambdas)
  sharded, state, _ = run_steps(config, {'data': 4, 'fsdp': 2}, batches, lambdas)
  for a, b in zip(single, sharded):
    for key in ('loss', 'loss_fm', 'loss_repa', 'loss_bitc', 'grad_norm'):
      np.testing.assert_allclose(a[key], b[key], rtol=2e-5, err_msg=key)
  assert all(np.isfinite(a['loss']) and a['loss_repa'] > 0 and a['loss_bitc'] > 0 for a in single)
  # the stacked block kernels really are split over the fsdp axis
  qkv = state.params['backbone']['blocks']['qkv']['kernel'][...]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp', None)


def test_new_lambda_values_do_not_recompile_and_change_the_repa_loss(config):
  batches = first_batches(config, 1) * 3
  lambdas = [
    np.eye(3, 2, dtype=np.float32),
    np.full((3, 2), 0.3, np.float32),
    np.zeros((3, 2), np.float32),
  ]
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, shardings = state_lib.sharded_init(config, dims(config), tx, mesh)
  step = train.jit_train_step(
    graphdef, tx, schedule, train.StepConfig.from_config(config), shardings, mesh
  )
  repa = []
  for batch, lam in zip(batches, lambdas):
    state, parts = step(state.replace(lambdas=jnp.asarray(lam)), sharding.global_batch(batch, mesh))
    repa.append(float(parts['loss_repa']))
  assert step._cache_size() == 1
  assert repa[0] > 0 and repa[1] > 0 and repa[2] == 0.0


def test_frame_granularity_trains(config):
  config.repa.granularity = 'frame'
  config.data.teacher_frames = True
  write_fake_cache(config)
  history, _, _ = run_steps(
    config, {'data': 2, 'fsdp': 1}, first_batches(config, 2), np.full((3, 2), 0.5, np.float32)
  )
  assert all(np.isfinite(h['loss']) and h['loss_repa'] > 0 for h in history)


def read_losses(workdir):
  return {
    row['step']: row['loss']
    for row in map(json.loads, (workdir / 'metrics.jsonl').read_text().splitlines())
  }


def test_resume_from_checkpoint_reproduces_the_next_losses_exactly(config, tmp_path):
  config.num_steps, config.log_every, config.checkpoint_every = 8, 1, 4
  config.optim.schedule_steps = 8  # the schedule must not depend on where the first run stops
  straight = tmp_path / 'straight'
  train.train_and_evaluate(config, straight)

  resumed = tmp_path / 'resumed'
  config.num_steps = 4
  train.train_and_evaluate(config, resumed)
  config.num_steps = 8
  train.train_and_evaluate(config, resumed)

  a, b = read_losses(straight), read_losses(resumed)
  assert sorted(a) == sorted(b) == list(range(1, 9))
  for step in range(5, 9):
    assert a[step] == b[step], (step, a[step], b[step])
  for name in ('loss_curves.png', 'tensorboard'):
    assert (resumed / name).exists()
  row = json.loads((resumed / 'metrics.jsonl').read_text().splitlines()[-1])
  assert {
    'step',
    'loss',
    'loss_fm',
    'loss_repa',
    'loss_bitc',
    'grad_norm',
    'lr',
    'steps_per_sec',
    'eval_loss_fm',
  } <= set(row)


def test_training_reduces_the_flow_matching_loss(config, tmp_path):
  config.num_steps, config.log_every, config.eval_every = 60, 10, 60
  config.optim.update(learning_rate=3e-3, pct_start=0.1)
  workdir = tmp_path / 'run'
  train.train_and_evaluate(config, workdir)
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert rows[-1]['loss_fm'] < 0.8 * rows[0]['loss_fm']
  assert np.isfinite(rows[-1]['eval_loss_fm'])


def test_online_fog_a_reselects_layers_without_recompiling(config, tmp_path):
  config.repa.update(selection='fog_a', probe_every=2)
  config.probe.update(num_clips=4, t_values=(0.3, 0.7), top_k=2, batch_size=4)
  config.num_steps, config.log_every, config.eval_every = 6, 2, 0
  workdir = tmp_path / 'online'
  calls = []
  original = train.jit_train_step

  def counting(*args, **kwargs):
    step = original(*args, **kwargs)
    calls.append(step)
    return step

  train.jit_train_step = counting
  try:
    state = train.train_and_evaluate(config, workdir)
  finally:
    train.jit_train_step = original
  assert calls[0]._cache_size() == 1
  lambdas, scores = np.asarray(state.lambdas), np.asarray(state.scores)
  assert ((lambdas > 0).sum(0) == 2).all()  # top-2 layers per domain
  for d in range(2):  # λ ∝ the moving-average FoG-A score, normalized to probe.lambda_total
    chosen = lambdas[:, d] > 0
    np.testing.assert_allclose(
      lambdas[chosen, d], 0.5 * scores[chosen, d] / scores[chosen, d].sum(), rtol=1e-5
    )
    assert scores[chosen, d].min() >= scores[~chosen, d].max()
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = {k for row in rows for k in row if k.startswith('lambda/')}
  assert len(logged) >= 4 and rows[-1]['loss_repa'] > 0


def test_measure_only_records_the_cumulative_fog_a_selection_and_trains_without_repa(
  config, tmp_path
):
  """The reference code's Phase I (repa.quirks): FoG-A measured every probe_every steps, λ left at
  0, and online_selection.json holds the raw cumulative-mean scores of the top layers."""
  from agrepa_jax import compare, selection

  config.repa.update(selection='none', measure_only=True, quirks=True, probe_every=2)
  config.probe.update(top_k=1, batch_size=2)
  config.num_steps, config.log_every, config.eval_every = 4, 1, 0
  workdir = tmp_path / 'phase1'
  state = train.train_and_evaluate(config, workdir)
  assert not np.asarray(state.lambdas).any()
  rows = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['loss_repa'] for r in rows] == [0.0] * 4
  path = compare.phase_one_selection(config, workdir)
  record = json.loads(path.read_text())
  assert (record['step'], record['measurements']) == (4, 2)
  scores = np.asarray(state.scores)
  chosen = selection.dense_lambdas(
    selection.read_selection(path), config.model.num_layers, config.data.domains
  )
  for d in range(len(config.data.domains)):
    layer = np.flatnonzero(chosen[:, d])
    assert len(layer) == 1 and layer[0] % 2 == 0  # an odd (1-based) layer, the reference's
    assert chosen[layer[0], d] == pytest.approx(scores[layer[0], d], rel=1e-6)  # raw λ
    assert scores[layer[0], d] == scores[::2, d].max()
  config.repa.probe_every = 5
  with pytest.raises(ValueError, match='lower repa.probe_every'):
    compare.phase_one_selection(config, tmp_path / 'never_measured')


def test_parameter_ema_follows_the_update_rule_and_serves_evaluation(config):
  config.optim.ema_decay = 0.5
  batches = first_batches(config, 2)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, shardings = state_lib.sharded_init(config, dims(config), tx, mesh)
  step = train.jit_train_step(
    graphdef, tx, schedule, train.StepConfig.from_config(config), shardings, mesh
  )
  leaf = lambda tree: np.asarray(tree['backbone']['output_projection']['kernel'][...])
  initial = leaf(state.params)
  state, _ = step(state, sharding.global_batch(batches[0], mesh))
  after_one = leaf(state.params)
  np.testing.assert_allclose(
    leaf(state.ema_params), 0.5 * initial + 0.5 * after_one, rtol=1e-6, atol=1e-7
  )
  assert not np.allclose(leaf(state.inference_params()), after_one)


def token_encoder_arrays(graphdef, state):
  """The token projections and the first embedding table of a train state."""
  encoder = nnx.merge(graphdef, state.params, state.frozen).backbone.token_encoder
  return np.asarray(encoder.domain_projection[...]), np.asarray(
    encoder.embeddings[0].embedding[...]
  )


def test_frozen_token_conditioning_quirk_never_trains_tables_or_projections(config):
  batches = first_batches(config, 1)
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  encoders = {}
  for frozen in (False, True):
    config.model.frozen_token_conditioning = frozen
    tx, schedule = state_lib.make_optimizer(config)
    graphdef, state, shardings = state_lib.sharded_init(config, dims(config), tx, mesh)
    step = train.jit_train_step(
      graphdef, tx, schedule, train.StepConfig.from_config(config), shardings, mesh
    )
    before = token_encoder_arrays(graphdef, state)
    state, _ = step(state, sharding.global_batch(batches[0], mesh))
    encoders[frozen] = (before, token_encoder_arrays(graphdef, state))
  (projection, table), (projection_after, table_after) = encoders[True]
  np.testing.assert_array_equal(projection, np.broadcast_to(np.eye(16), (2, 16, 16)))
  np.testing.assert_array_equal(projection_after, projection)  # no gradient, no weight decay
  np.testing.assert_array_equal(table_after, table)
  (projection, table), (projection_after, table_after) = encoders[False]
  assert not np.allclose(projection_after, projection)
  assert not np.allclose(table_after, table)


@pytest.mark.parametrize('ema_decay', [0.0, 0.9])
def test_restore_trained_gives_the_final_inference_parameters(config, tmp_path, ema_decay):
  config.num_steps, config.eval_every, config.optim.ema_decay = 2, 0, ema_decay
  state = train.train_and_evaluate(config, tmp_path / 'run')
  run = checkpoint.restore_trained(config, tmp_path / 'run')
  restored = nnx.state(run.model, nnx.Param)
  expected = state.inference_params()
  assert run.step == 2
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, expected
  )
  with pytest.raises(FileNotFoundError, match='train this workdir first'):
    checkpoint.restore_trained(config, tmp_path / 'empty')
  assert not (tmp_path / 'empty' / 'checkpoints').exists()


def test_inference_modes_restore_the_newest_checkpoint_that_restores(config, tmp_path, caplog):
  config.num_steps, config.eval_every, config.checkpoint_every = 4, 0, 2
  train.train_and_evaluate(config, tmp_path / 'run')
  (tmp_path / 'run' / 'checkpoints' / '4' / 'state' / '_METADATA').unlink()  # damaged
  run = checkpoint.restore_trained(config, tmp_path / 'run')
  assert run.step == 2 and 'checkpoint 4 cannot be restored' in caplog.text
  assert (tmp_path / 'run' / 'checkpoints' / '4').is_dir()  # reported, left in place
  with pytest.raises(
    checkpoint.NoUsableCheckpoint, match='checkpoint 4 in .* cannot be restored:\n  step 4: '
  ):
    checkpoint.restore_trained(config, tmp_path / 'run', step=4)
