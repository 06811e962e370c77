import csv
import json

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from agrepa_jax import checkpoint, config_base, selection, sharding
from agrepa_jax import state as state_lib
from agrepa_jax.data import spec
from agrepa_jax.model import BitcHeads, DiT, ModelConfig, RepaHeads
from agrepa_jax.probe import (
  REFERENCE_SCHEDULE,
  fog_a,
  lasp,
  probed_layers,
  scd,
  schedule_from_config,
)
from agrepa_jax.probe import batch as probe_batch
from agrepa_jax.probe.report import run_probe
from tests.helpers import fake_record, tiny_model_config, write_fake_store

CFG = tiny_model_config(num_layers=5)
FRAMES = 12


def make_dit(cfg=CFG, seed=0, scale=0.3):
  """A DiT with every parameter drawn from N(0, scale²), so zero-initialized layers hide nothing.

  Drawn in one jitted call: initializing eagerly costs a compilation per parameter shape.
  """
  graphdef, shapes = nnx.split(nnx.eval_shape(lambda: DiT(cfg, nnx.Rngs(0))))
  leaves, treedef = jax.tree.flatten(shapes)

  @jax.jit
  def draw(key):
    keys = jax.random.split(key, len(leaves))
    return [scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]

  return nnx.merge(graphdef, jax.tree.unflatten(treedef, draw(jax.random.key(seed))))


def make_batch(cfg=CFG, size=4, seed=1):
  k = jax.random.split(jax.random.key(seed), 2)
  return {
    'mel': jax.random.normal(k[0], (size, FRAMES, cfg.n_mels)),
    'tokens': jax.random.randint(k[1], (size, cfg.num_codebooks, 5), 0, cfg.vocab_size),
    'domain': jnp.arange(size) % 2,
    'num_samples': jnp.array([3000, 2000, 1000, 256 * FRAMES, 700, 2500][:size]),
  }


def looped_scores(dit, batch, t, noise, dropout_key):
  """Δ (L, B) from L+1 separate model calls, one gate mask each: FoG-A by its definition."""
  graphdef, state = nnx.split(dit)
  inputs = probe_batch.model_inputs(batch, t, noise, 0.15)
  lengths = probe_batch.valid_frames(batch['num_samples'], FRAMES).sum(1)
  forward = jax.jit(
    lambda state, gates: nnx.merge(graphdef, state)(
      **inputs, gates=gates, dropout_key=dropout_key, lengths=lengths
    )[0]
  )
  num_layers = dit.cfg.num_layers
  clean = np.asarray(forward(state, jnp.ones(num_layers)))
  valid = np.asarray(probe_batch.valid_frames(batch['num_samples'], FRAMES))[..., None]
  rms = lambda x: np.sqrt((np.square(x) * valid).sum((1, 2)))
  return np.stack(
    [
      rms(np.asarray(forward(state, 1.0 - jnp.eye(num_layers)[layer])) - clean) / rms(clean)
      for layer in range(num_layers)
    ]
  )


@pytest.mark.parametrize('num_layers', [1, 2, 3, 4, 5, 8])
def test_ablation_lanes_cover_every_continuation_in_full_lanes(num_layers):
  first, second = fog_a.ablation_lanes(num_layers)
  middle = fog_a.unpaired_ablation(num_layers)
  assert len(first) == (num_layers - 1) // 2 and all(first < second)
  alone = set() if middle is None else {middle}  # runs L/2 blocks without a partner
  assert set(first) | set(second) | alone == set(range(num_layers - 1))  # L-1 needs no block
  assert not alone & (set(first) | set(second))
  for a, b in zip(first, second):
    steps = list(range(a + 1, num_layers)) + list(
      range(b + 1, num_layers)
    )  # blocks each ablation still runs
    switch = num_layers - 1 - a
    scheduled = [a + 1 + s if s < switch else s for s in range(num_layers)]
    assert scheduled == steps


def test_lane_layout_pads_less_than_a_chunk_per_device():
  assert fog_a.lane_layout(12, 1, 4) == (12, 4)
  assert fog_a.lane_layout(2, 1, 4) == (2, 2)
  assert fog_a.lane_layout(12, 8, 4) == (16, 2)
  assert fog_a.lane_layout(5, 2, 2) == (8, 2)


def test_probe_inputs_follow_the_documented_rules():
  batch = make_batch()
  noise = probe_batch.clip_noise(jax.random.key(0), 4, (FRAMES, CFG.n_mels))
  # noise of a clip depends on its position only, not on the batch it is drawn with
  np.testing.assert_array_equal(
    noise[:2], probe_batch.clip_noise(jax.random.key(0), 2, (FRAMES, CFG.n_mels))
  )
  inputs = probe_batch.model_inputs(batch, 0.25, noise, 0.3)
  np.testing.assert_allclose(inputs['x_t'], 0.75 * noise + 0.25 * batch['mel'], rtol=1e-6)
  # valid frames 12, 8, 4, 12 -> prompts of floor(0.3 * valid) = 3, 2, 1, 3 leading frames of x1
  prompt = np.arange(FRAMES)[None, :] < np.array([3, 2, 1, 3])[:, None]
  np.testing.assert_array_equal(inputs['ref_mel'], np.where(prompt[..., None], batch['mel'], 0.0))
  short = probe_batch.model_inputs(
    batch, 0.25, noise, 0.15
  )  # floor(0.15 * 4) = 0 -> at least one frame
  np.testing.assert_array_equal(np.asarray((short['ref_mel'] != 0).any(-1)).sum(1), [1, 1, 1, 1])
  no_prompt = probe_batch.model_inputs(batch, 0.25, noise, 0.0)
  np.testing.assert_array_equal(no_prompt['ref_mel'], 0.0)
  domains = np.array([0, 0, 0, 1, 1, 0, 1])
  chosen = probe_batch.balanced_indices(domains, 2, 5, seed=3)
  assert np.bincount(domains[chosen]).tolist() == [3, 2]
  np.testing.assert_array_equal(chosen, probe_batch.balanced_indices(domains, 2, 5, seed=3))


def test_block_that_is_identity_by_its_weights_scores_zero_at_every_t():
  dit, k = make_dit(), 2
  for layer in (dit.blocks.attn_out, dit.blocks.mlp_out):
    for param in (layer.kernel, layer.bias):
      param[...] = param[...].at[k].set(0.0)
  batch = make_batch()
  t_values = (0.1, 0.5, 0.9)
  table, counts = fog_a.fog_a_table(
    dit, batch, t_values, jax.random.key(0), num_domains=3, batch_size=2, chunk_size=1
  )
  assert table.shape == (CFG.num_layers, 3, 3)
  np.testing.assert_array_equal(counts, [2, 2, 0])
  assert np.isnan(table[..., 2]).all()  # a domain without clips
  np.testing.assert_allclose(table[k, :, :2], 0.0, atol=1e-6)
  assert (np.delete(table[..., :2], k, axis=0) > 1e-2).all()


def test_prefix_shared_scores_equal_one_ablation_at_a_time():
  num_layers = 4  # even: one lane, and the middle ablation runs alone
  cfg = ModelConfig(**{**CFG.__dict__, 'num_layers': num_layers})
  dit, batch = make_dit(cfg), make_batch(cfg)
  noise = probe_batch.clip_noise(jax.random.key(2), 4, (FRAMES, cfg.n_mels))
  dropout_key = jax.random.key(3)  # training mode, as in the reference schedule
  expected = looped_scores(dit, batch, 0.7, noise, dropout_key)
  shared = fog_a.clip_scores(dit, batch, 0.7, noise, dropout_key=dropout_key, chunk_size=2)
  naive = fog_a.naive_clip_scores(dit, batch, 0.7, noise, dropout_key=dropout_key)
  assert shared.shape == (num_layers, 4)
  np.testing.assert_allclose(shared, expected, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(naive, expected, rtol=2e-5, atol=1e-6)
  assert expected.min() > 1e-2


# 6: 2 lanes and the middle ablation alone; 7: 3 lanes, so chunks of 2 pad a fourth
@pytest.mark.parametrize('num_layers', [6, 7])
def test_sharding_lanes_and_chunk_size_do_not_change_scores(num_layers):
  cfg = ModelConfig(**{**CFG.__dict__, 'num_layers': num_layers})
  dit, batch = make_dit(cfg), make_batch(cfg)
  noise = probe_batch.clip_noise(jax.random.key(4), 4, (FRAMES, cfg.n_mels))
  reference = fog_a.naive_clip_scores(dit, batch, 0.3, noise)
  eight = jax.make_mesh((4, 2), ('data', 'fsdp'), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  for chunk_size, mesh in [(1, None), (2, None), (1, eight)]:
    scores = fog_a.clip_scores(dit, batch, 0.3, noise, chunk_size=chunk_size, mesh=mesh)
    np.testing.assert_allclose(
      scores, reference, rtol=2e-5, atol=1e-6, err_msg=f'chunk {chunk_size}'
    )


def test_domain_means_and_nan_for_absent_domains():
  means, counts = fog_a.domain_means(np.array([[1.0, 2.0, 4.0]]), np.array([0, 0, 2]), 3)
  np.testing.assert_array_equal(counts, [2, 0, 1])
  np.testing.assert_allclose(means, [[1.5, np.nan, 4.0]])


def test_top_k_and_lambda_rules_on_a_hand_table():
  scores = np.array([[0.30, 0.1], [0.05, np.nan], [0.20, 0.4], [0.10, 0.4], [0.25, 0.2]])
  np.testing.assert_array_equal(selection.top_k_layers(scores[:, 0], 3), [0, 4, 2])
  np.testing.assert_array_equal(
    selection.top_k_layers(scores[:, 1], 3), [2, 3, 4]
  )  # NaN out, ties shallow first
  odd = probed_layers(5, REFERENCE_SCHEDULE)
  np.testing.assert_array_equal(odd, [True, False, True, False, True])
  np.testing.assert_array_equal(selection.top_k_layers(scores[:, 1], 3, odd), [2, 4, 0])

  raw = selection.select_layers(scores, ('speech', 'audio'), top_k=2)
  assert raw == {'speech': {1: 0.30, 5: 0.25}, 'audio': {3: 0.4, 4: 0.4}}
  normalized = selection.select_layers(
    scores, ('speech', 'audio'), top_k=2, rule='normalized', total=1.1
  )
  np.testing.assert_allclose(list(normalized['speech'].values()), [0.6, 0.5])
  softmax = selection.select_layers(
    scores, ('speech',), top_k=2, rule='softmax', total=2.0, temperature=0.05
  )
  e = np.exp(1.0)  # exp((0.30 - 0.25) / 0.05)
  np.testing.assert_allclose(list(softmax['speech'].values()), [2 * e / (e + 1), 2 / (e + 1)])
  lambdas = selection.dense_lambdas(raw, 5, ('speech', 'audio'))
  np.testing.assert_allclose(lambdas[:, 0], [0.30, 0, 0, 0, 0.25])
  with pytest.raises(ValueError, match='lambda_rule'):
    selection.layer_lambdas(np.ones(2), 'cubic', 1.0, 1.0)
  assert selection.select_layers(np.full((3, 1), np.nan), ('speech',), top_k=2) == {'speech': {}}


def test_layer_scores_and_ema():
  table = np.arange(12, dtype=float).reshape(2, 3, 2)
  np.testing.assert_allclose(selection.layer_scores(table, (0.1, 0.5, 0.9), -1), table.mean(1))
  np.testing.assert_allclose(selection.layer_scores(table, (0.1, 0.5, 0.9), 0.5), table[:, 1])
  with pytest.raises(ValueError, match='selection_t'):
    selection.layer_scores(table, (0.1, 0.5), 0.8)
  np.testing.assert_allclose(
    selection.ema_update(np.array([1.0, 0.0]), np.array([0.0, 1.0]), 0.75), [0.75, 0.25]
  )
  np.testing.assert_allclose(selection.ema_update(None, np.array([0.5]), 0.9), [0.5])


def test_spearman_and_top_k_overlap_known_cases():
  rising = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
  same = scd.dissociation(rising, 2 * rising, k=3)
  assert same['spearman'] == pytest.approx(1.0) and same['top_k_overlap'] == 1.0
  assert same['storage_top'] == [6, 5, 4]
  opposite = scd.dissociation(rising, rising[::-1], k=3)
  assert opposite['spearman'] == pytest.approx(-1.0) and opposite['top_k_overlap'] == 0.0
  # storage ranks 6 > 5 > 4 > ..., contribution ranks 1 > 5 > 2: one shared layer of three
  partial = scd.dissociation(rising, np.array([0.9, 0.5, 0.1, 0.2, 0.6, 0.3]), k=3)
  assert partial['top_k_overlap'] == pytest.approx(1 / 3)
  assert partial['spearman'] == pytest.approx(1 - 6 * (25 + 4 + 4 + 4 + 0 + 9) / (6 * 35))
  report = scd.scd_report(
    np.stack([rising, rising], 1),
    np.stack([rising, rising[::-1]], 1),
    ('speech', 'audio'),
    k=2,
    eligible=np.array([True, False] * 3),
  )
  assert report['speech']['contribution_top'] == [5, 3]  # 1-based model layers, odd only
  assert report['audio']['spearman'] == pytest.approx(-1.0)


def test_ridge_probe_recovers_a_linear_teacher_and_the_centered_score_separates_layers():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(2, 40, 6))
  mixing = rng.normal(size=(6, 3))
  unit = features / np.linalg.norm(features, axis=-1, keepdims=True)
  offset = np.array([20.0, -10.0, 5.0])  # a large shared mean, as teacher targets have
  targets = [
    unit[1] @ mixing + offset,
    rng.normal(size=(40, 2)),
  ]  # layer 2 stores domain 0's teacher linearly
  domains = np.zeros(40, np.int64)
  scores = lasp.ridge_scores(features, targets, domains, fit_fraction=0.5, alpha=1e-6)
  assert scores['centered'][1, 0] > 0.999 and scores['centered'][0, 0] < 0.6
  assert (scores['cosine'][:, 0] > 0.98).all()  # the mean alone: every layer looks the same
  assert all(np.isnan(s[:, 1]).all() for s in scores.values())  # no clip of domain 1


def test_centered_cosine_removes_the_given_mean_by_hand():
  mean = np.array([10.0, 0.0])
  prediction = mean + np.array([[1.0, 0.0], [0.0, 2.0]])
  target = mean + np.array([[3.0, 0.0], [0.0, -1.0]])
  got = lasp.cosine_measures(prediction, target, mean)
  assert got['centered'] == pytest.approx((1.0 + -1.0) / 2)  # cos 0° and cos 180°
  raw = [(11 * 13) / (11 * 13), (100 - 2) / (np.hypot(10, 2) * np.hypot(10, 1))]
  assert got['cosine'] == pytest.approx(np.mean(raw))
  # Predicting the training mean itself stores nothing: centered 0, raw cosine near 1.
  only_mean = lasp.cosine_measures(np.broadcast_to(mean, target.shape), target, mean)
  assert only_mean['centered'] == 0.0 and only_mean['cosine'] > 0.95


def test_head_scores_apply_the_trained_heads_and_the_bitc_quirk():
  rng = np.random.default_rng(1)
  heads = RepaHeads(CFG.num_layers, CFG.width, (6, 5), nnx.Rngs(0))
  pooled = rng.normal(size=(CFG.num_layers, 4, CFG.width)).astype(np.float32)
  head_targets = [rng.normal(size=(4, 6)), rng.normal(size=(4, 5))]
  means = [rng.normal(size=6), rng.normal(size=5)]
  clip_domains = np.array([0, 1, 0, 1])
  got = lasp.repa_head_scores(heads, pooled, head_targets, clip_domains, means)
  prediction = np.asarray(heads(1, jnp.asarray(pooled[:, 1::2])))
  target = head_targets[1][1::2][None]
  np.testing.assert_allclose(got['cosine'][:, 1], lasp.mean_cosine(prediction, target), rtol=1e-5)
  np.testing.assert_allclose(
    got['centered'][:, 1],
    lasp.mean_cosine(prediction - means[1], target - means[1]),
    rtol=1e-5,
  )

  bitc = BitcHeads(CFG.width, (6, 5), nnx.Rngs(1))
  unit = pooled[:, 0::2] / np.linalg.norm(pooled[:, 0::2], axis=-1, keepdims=True)
  kernel = np.asarray(bitc.projections[0].kernel[...])
  bias = np.asarray(bitc.projections[0].bias[...])
  mean, var = unit.mean(-1, keepdims=True), unit.var(-1, keepdims=True)
  normalized = (unit - mean) / np.sqrt(var + 1e-6)
  target = head_targets[0][0::2][None]
  for quirk, projected in ((False, normalized @ kernel + bias), (True, -(unit @ kernel + bias))):
    got = lasp.bitc_head_scores(bitc, pooled, head_targets, clip_domains, means, quirk=quirk)
    np.testing.assert_allclose(
      got['cosine'][:, 0], lasp.mean_cosine(projected, target), rtol=1e-4, atol=1e-6
    )


def test_lasp_quirk_reads_the_clean_mel_whatever_the_noise():
  dit, batch = make_dit(), make_batch()
  pooled = lambda seed, clean: lasp.pooled_hidden(
    dit, batch, 0.8, jax.random.key(seed), batch_size=4, clean_input=clean
  )
  np.testing.assert_allclose(pooled(0, True), pooled(1, True), rtol=1e-6)
  assert np.abs(pooled(0, False) - pooled(1, False)).max() > 1e-3


class FakeSplit:
  """The part of a FeatureSplit that training_teacher_means reads: domains and stored records."""

  def __init__(self, domain, teacher):
    self.domain, self.teacher = np.asarray(domain), teacher

  def indices_of_domain(self, d):
    return np.flatnonzero(self.domain == d)

  def record(self, i):
    name = ('speech', 'audio')[int(self.domain[i])]
    return {'teacher': self.teacher[name][i]}


def test_training_teacher_means_average_each_domains_training_rows():
  speech = np.array([[1.0, 2.0], [0, 0], [3.0, 4.0], [0, 0], [0, 0]])
  audio = np.array([[0.0], [1.0], [0.0], [2.0], [6.0]])
  split = FakeSplit([0, 1, 0, 1, 1], {'speech': speech, 'audio': audio})
  means = lasp.training_teacher_means(split, ('speech', 'audio'))
  np.testing.assert_allclose(means[0], [2.0, 3.0])
  np.testing.assert_allclose(means[1], [3.0])
  strided = lasp.training_teacher_means(split, ('speech', 'audio'), max_clips=2)
  np.testing.assert_allclose(strided[1], [3.5])  # clips 1 and 4 of the audio rows 1, 3, 4
  with pytest.raises(ValueError, match="no 'audio' clip"):
    lasp.training_teacher_means(FakeSplit(np.zeros(5), split.teacher), ('speech', 'audio'))


def test_reference_schedule_from_config():
  config = config_base.base_config()
  schedule = schedule_from_config(config)
  assert schedule.t_values == (0.1, 0.3, 0.5, 0.7, 0.9) and schedule.lambda_rule == 'normalized'
  assert not schedule.dropout and not schedule.odd_layers_only
  config.repa.quirks = True
  assert schedule_from_config(config) == REFERENCE_SCHEDULE
  assert REFERENCE_SCHEDULE.t_values == (0.8,) and REFERENCE_SCHEDULE.num_clips == 2
  assert (
    REFERENCE_SCHEDULE.dropout
    and REFERENCE_SCHEDULE.odd_layers_only
    and REFERENCE_SCHEDULE.lambda_rule == 'raw'
  )


def tiny_run_config(tmp_path):
  config = config_base.base_config()
  config.model.update(
    num_layers=3, width=32, num_heads=4, token_dim=32, vocab_size=11, time_freq_dim=16
  )
  config.data.cache_dir = str(tmp_path / 'cache')
  config.data.clip_seconds = 0.16  # 16 mel frames
  config.async_checkpointing = False
  config.batch_size = 8
  config.probe.update(num_clips=6, batch_size=4, t_values=(0.3, 0.7), chunk_size=1, top_k=2)
  return config


def write_fake_cache(config, clips_per_split=8):
  """A finished feature store of random mels, tokens and teacher targets where `prepare` looks."""
  rng = np.random.default_rng(0)
  dims = {'speech': 6, 'audio': 5}
  batch_spec = spec.batch_spec(config, dims)
  frames, tokens = batch_spec.num_frames, batch_spec.num_tokens
  splits = {
    split: [
      fake_record(
        batch_spec,
        f'{split}{i}',
        i % 2,
        rng.normal(size=(frames, 100)),
        rng.integers(0, 11, (1, tokens)),
        rng.integers(1000, frames * 256),
        rng,
      )
      for i in range(clips_per_split)
    ]
    for split in ('train', 'heldout')
  }
  write_fake_store(config, splits, dims)
  return dims


@pytest.mark.slow
def test_run_probe_writes_the_documented_files(tmp_path):
  config = tiny_run_config(tmp_path)
  dims = write_fake_cache(config)
  tx, _ = state_lib.make_optimizer(config)
  mesh = sharding.make_mesh(config.mesh)
  _, state, _ = state_lib.sharded_init(config, (dims['speech'], dims['audio']), tx, mesh)
  noisy = jax.tree.map(
    lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), state.params
  )
  manager = checkpoint.checkpoint_manager(tmp_path / 'run', config)
  manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state.replace(params=noisy))))
  manager.wait_until_finished()
  manager.close()

  results = run_probe(config, tmp_path / 'run')
  out = tmp_path / 'run' / 'probe'
  read = lambda name: list(csv.DictReader((out / name).open()))
  fog = read('fog_a.csv')
  assert list(fog[0]) == ['domain', 'layer', 't', 'score']
  assert len(fog) == 2 * 3 * 2 and {r['layer'] for r in fog} == {'1', '2', '3'}
  assert all(float(r['score']) > 0 for r in fog)
  lasp_rows = read('lasp.csv')
  assert list(lasp_rows[0]) == ['domain', 'layer', 'probe', 'measure', 'score']
  assert len(lasp_rows) == 2 * 2 * 3 * 3 and {r['probe'] for r in lasp_rows} == {
    'bitc',
    'repa',
    'ridge',
  }
  assert {r['measure'] for r in lasp_rows} == {'cosine', 'centered'}
  reject = lambda constant: pytest.fail(f'scd.json holds {constant}, which is not JSON')
  report = json.loads((out / 'scd.json').read_text(), parse_constant=reject)
  assert report['storage_measure'] == 'centered'
  centered = results['storage']['centered']['ridge'][:, 1]
  assert report['probes']['ridge']['audio']['spearman'] == pytest.approx(
    scd.dissociation(centered, results['contribution'][:, 1], k=2)['spearman']
  )
  assert report['clips_per_domain'] == {'speech': 3, 'audio': 3} and report['step'] == 5
  assert set(report['probes']['ridge']['audio']) >= {'spearman', 'top_k_overlap'}
  chosen = selection.read_selection(out / 'selection.json')
  assert json.loads((out / 'selection.json').read_text())['rule'] == 'normalized'
  assert chosen == results['selection'] and all(len(layers) == 2 for layers in chosen.values())
  assert all(
    sum(layers.values()) == pytest.approx(0.5) for layers in chosen.values()
  )  # probe.lambda_total
  assert selection.dense_lambdas(chosen, 3, ('speech', 'audio')).shape == (3, 2)
  assert (out / 'fog_a_heatmap.png').stat().st_size > 0 and (
    out / 'storage_vs_contribution.png'
  ).exists()
