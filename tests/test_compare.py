import csv

import ml_collections
import pytest

from agrepa_jax import compare, config_base, selection
from tests.helpers import tiny_config, write_fake_cache


def compare_config(tmp_path):
  config = tiny_config(
    tmp_path / 'cache', num_steps=4, log_every=1, eval_every=2, checkpoint_every=4
  )
  write_fake_cache(config)
  config.workflow = 'compare'
  config.compare = ml_collections.ConfigDict(
    dict(variants=('none', 'fixed:2', 'fog_a'), fixed_lambda=0.5, eval_clips=0)
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


@pytest.mark.slow
def test_compare_workflow_writes_one_row_per_variant(tmp_path):
  config = compare_config(tmp_path)
  rows = compare.run_compare(config, tmp_path / 'run')
  with open(tmp_path / 'run' / 'compare.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['variant'] for r in table] == ['none', 'fixed:2', 'fog_a']
  assert table[1]['layers'] == 'speech:2 audio:2'
  chosen = selection.read_selection(tmp_path / 'run' / 'phase1' / 'probe' / 'selection.json')
  assert table[2]['layers'] == ' '.join(
    f'{d}:{",".join(map(str, sorted(c)))}' for d, c in chosen.items()
  )
  assert all(len(r['curve']) == 2 and r['final_eval_loss_fm'] > 0 for r in rows)
  assert (tmp_path / 'run' / 'compare_curves.png').stat().st_size > 1000
  # the same initialization and data order: every variant starts from the same first loss_fm
  first_fm = {
    r['variant']: compare.metrics.read_metrics(
      tmp_path / 'run' / r['workdir'].split('/')[-1] / 'metrics.jsonl'
    )[0]['loss_fm']
    for r in rows
  }
  assert len(set(first_fm.values())) == 1, first_fm
