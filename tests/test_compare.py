import csv

import ml_collections
import numpy as np
import pytest
from scipy import stats

from agrepa_jax import compare, config_base, selection
from tests.helpers import tiny_config, write_fake_cache


def compare_config(tmp_path):
  config = tiny_config(
    tmp_path / 'cache', num_steps=4, log_every=1, eval_every=2, checkpoint_every=4
  )
  write_fake_cache(config)
  config.workflow = 'compare'
  config.compare = ml_collections.ConfigDict(
    dict(variants=('none', 'fixed:2', 'fog_a'), fixed_lambda=0.5, eval_clips=0, num_seeds=2)
  )
  config.probe.update(num_clips=8, t_values=(0.3, 0.7), top_k=2, batch_size=8)
  return config


def test_variant_configs_differ_only_in_their_alignment(tmp_path):
  config = compare_config(tmp_path)
  none, fixed, ag = (
    config_base.variant_config(config, v, 'sel.json') for v in ('none', 'fixed:2', 'fog_a')
  )
  assert (
    none.repa.selection == 'none'
    and fixed.repa.layers.speech == [2]
    and fixed.repa.lambdas.audio == [0.5]
  )
  assert ag.repa.selection == 'fog_a' and ag.repa.selection_file == 'sel.json'
  for variant in (none, fixed, ag):
    assert variant.seed == config.seed and variant.data.to_dict() == config.data.to_dict()
    assert variant.model.to_dict() == config.model.to_dict()
  with pytest.raises(ValueError, match='fixed:<layer>'):
    config_base.variant_config(config, 'deep')


def test_seed_configs_move_initialization_and_data_order_together(tmp_path):
  config = compare_config(tmp_path)
  second = compare.seed_config(config, 1)
  assert second.seed == config.seed + 1 and second.data.order_seed == second.seed
  assert second.data.seed == config.data.seed  # the same corpus, cache and tokenizer
  variants = [config_base.variant_config(second, v, 's.json') for v in ('none', 'fixed:2')]
  assert all(v.seed == second.seed and v.data.order_seed == second.seed for v in variants)


def test_a_stopped_run_stops_the_workflow_before_the_probe(tmp_path, monkeypatch):
  """SIGTERM saves Phase I early and train_and_evaluate returns: no probe of the unfinished model,
  no Phase II, no comparison files; rerunning resumes."""
  config = compare_config(tmp_path)
  calls = []

  def stopped_early(config, workdir, allow_config_change=False):
    calls.append(workdir)
    return ml_collections.ConfigDict({'step': config.num_steps - 2})

  monkeypatch.setattr(compare.train, 'train_and_evaluate', stopped_early)
  result = compare.run_compare(config, tmp_path / 'run')
  assert result == {'runs': [], 'summary': []} and len(calls) == 1
  assert not (tmp_path / 'run' / 'seed0' / 'phase1' / 'probe').exists()
  assert not (tmp_path / 'run' / 'compare.csv').exists()


def test_paired_interval_by_hand():
  mean, low, high = compare.paired_interval([1.0, 2.0, 3.0])
  half = stats.t.ppf(0.975, 2) * 1.0 / np.sqrt(3)  # sd 1, n 3: 4.303 / √3 = 2.484
  assert mean == 2.0 and low == pytest.approx(2.0 - half) and high == pytest.approx(2.0 + half)
  assert half == pytest.approx(2.4841, abs=1e-4)
  assert np.isnan(compare.paired_interval([0.5])[1])


def fake_run(variant, seed, loss, fad=float('nan')):
  return {'variant': variant, 'seed': seed, 'final_eval_loss_fm': loss, 'fad': fad, 'wer': 0.9}


def test_summary_pairs_seeds_and_picks_the_best_fixed_layer():
  variants = ('none', 'fixed:1', 'fixed:2', 'fog_a')
  losses = {
    'none': [0.60, 0.50, 0.55],
    'fixed:1': [0.58, 0.48, 0.54],  # always 0.01–0.02 below none: separated despite the seed spread
    'fixed:2': [0.59, 0.52, 0.56],
    'fog_a': [0.61, 0.47, 0.55],
  }
  runs = [fake_run(v, s, x) for v, xs in losses.items() for s, x in zip((0, 1, 2), xs)]
  assert compare.best_fixed_variant(runs, variants) == 'fixed:1'
  summary = {(r['variant'], r['metric']): r for r in compare.summarize(runs, variants)}
  fixed = summary['fixed:1', 'final_eval_loss_fm']
  diffs = np.array([-0.02, -0.02, -0.01])
  assert fixed['mean'] == pytest.approx(np.mean(losses['fixed:1']))
  assert fixed['std'] == pytest.approx(np.std(losses['fixed:1'], ddof=1))
  assert fixed['vs_none'] == pytest.approx(diffs.mean())
  half = stats.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
  assert fixed['vs_none_high'] == pytest.approx(diffs.mean() + half)
  assert fixed['vs_none_high'] < 0
  ag = summary['fog_a', 'final_eval_loss_fm']
  assert ag['vs_best_fixed'] == pytest.approx(np.mean([0.03, -0.01, 0.01]))
  assert ag['vs_best_fixed_low'] < 0 < ag['vs_best_fixed_high']  # cannot separate
  assert summary['none', 'final_eval_loss_fm']['vs_none'] == 0.0
  wer = summary['fog_a', 'wer']
  assert wer['std'] == 0.0 and wer['vs_none'] == 0.0  # the same WER everywhere separates nothing
  assert np.isnan(summary['fog_a', 'fad']['mean'])  # not evaluated


@pytest.mark.slow
def test_compare_workflow_writes_the_summary_over_seeds(tmp_path):
  config = compare_config(tmp_path)
  result = compare.run_compare(config, tmp_path / 'run')
  runs = result['runs']
  with open(tmp_path / 'run' / 'compare_runs.csv') as f:
    table = list(csv.DictReader(f))
  assert [(r['seed'], r['variant']) for r in table] == [
    (s, v) for s in ('0', '1') for v in ('none', 'fixed:2', 'fog_a')
  ]
  assert table[1]['layers'] == 'speech:2 audio:2'
  chosen = selection.read_selection(
    tmp_path / 'run' / 'seed0' / 'phase1' / 'probe' / 'selection.json'
  )
  assert table[2]['layers'] == ' '.join(
    f'{d}:{",".join(map(str, sorted(c)))}' for d, c in chosen.items()
  )
  assert all(len(r['curve']) == 2 and r['final_eval_loss_fm'] > 0 for r in runs)
  with open(tmp_path / 'run' / 'compare.csv') as f:
    summary = list(csv.DictReader(f))
  assert len(summary) == 3 * len(compare.METRICS) and {r['seeds'] for r in summary} == {'2'}
  assert {r['best_fixed'] for r in summary} == {'fixed:2'}
  page = (tmp_path / 'run' / 'compare.html').read_text()
  assert 'seed1/phase1/probe/fog_a_heatmap.png' in page and 'compare_curves.png' in page
  assert (tmp_path / 'run' / 'compare_curves.png').stat().st_size > 1000
  # Within a seed every variant starts from the same initialization and data order (the same
  # first loss_fm); across seeds they differ.
  first_fm = {
    (r['seed'], r['variant']): compare.metrics.read_metrics(
      tmp_path / 'run' / f'seed{r["seed"]}' / r['workdir'].split('/')[-1] / 'metrics.jsonl'
    )[0]['loss_fm']
    for r in runs
  }
  per_seed = [{v for (s, _), v in first_fm.items() if s == seed} for seed in (0, 1)]
  assert all(len(values) == 1 for values in per_seed), first_fm
  assert per_seed[0] != per_seed[1]
