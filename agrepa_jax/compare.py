"""Probe-then-intervene on one command: Phase I baseline, FoG-A probe, Phase II variants, comparison.

Every variant starts from the same initialization and sees the same data order (both follow the
seeds), trains for the same number of steps, and differs only in its REPA selection:
  none         no hidden-state alignment (BiT-C only) — the Phase I run itself
  fixed:<l>    REPA on layer l (1-based) in every domain, λ = compare.fixed_lambda
  fog_a      AG-REPA: the layers and λ that the probe of Phase I selected
"""

import csv
import json
import logging
import pathlib

import matplotlib

matplotlib.use('Agg')
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from agrepa_jax import config_base, metrics, selection, train  # noqa: E402
from agrepa_jax.data import cache  # noqa: E402

PHASE_ONE = 'none'


def eval_curve(workdir: pathlib.Path) -> list[tuple[int, float]]:
  return [
    (r['step'], r['eval_loss_fm'])
    for r in metrics.read_metrics(workdir / 'metrics.jsonl')
    if 'eval_loss_fm' in r
  ]


def run_compare(config, workdir: pathlib.Path, allow_config_change: bool = False) -> list[dict]:
  """Runs (or resumes) the whole workflow in `workdir`; writes compare.csv and compare_curves.png."""
  workdirs = {PHASE_ONE: workdir / 'phase1'}
  logging.info('compare: Phase I (no hidden-state alignment)')
  phase_one = config_base.variant_config(config, PHASE_ONE)
  train.train_and_evaluate(phase_one, workdirs[PHASE_ONE], allow_config_change)
  selection_file = workdirs[PHASE_ONE] / 'probe' / 'selection.json'
  if not selection_file.exists():
    from agrepa_jax.probe import report

    report.run_probe(phase_one, workdirs[PHASE_ONE])
    cache.sync_processes('probe-written')  # process 0 wrote selection.json; every process reads it
  for variant in config.compare.variants:
    if variant == PHASE_ONE:
      continue
    logging.info('compare: Phase II variant %s', variant)
    workdirs[variant] = workdir / variant.replace(':', '')
    variant_cfg = config_base.variant_config(config, variant, str(selection_file))
    train.train_and_evaluate(variant_cfg, workdirs[variant], allow_config_change)
  if config.compare.eval_clips:
    for variant, variant_dir in workdirs.items():
      evaluate_variant(
        config_base.variant_config(config, variant, str(selection_file)),
        variant_dir,
        config.compare.eval_clips,
      )
  rows = [comparison_row(variant, workdirs[variant]) for variant in config.compare.variants]
  if jax.process_index() == 0:
    write_comparison(rows, workdir)
  return rows


def evaluate_variant(config, workdir: pathlib.Path, num_clips: int):
  """FAD, WER and mel L1 of the variant's final checkpoint on `num_clips` held-out clips (once)."""
  if (workdir / 'eval.json').exists():
    return
  from agrepa_jax.generation import evaluate

  config.unlock()
  config.eval.num_clips = num_clips
  config.lock()
  evaluate.run_eval(config, workdir)


def eval_metrics(workdir: pathlib.Path) -> dict:
  """fad (first embedding, all clips), wer of generated and of the original speech, mel_l1, from eval.json."""
  if not (workdir / 'eval.json').exists():
    return {}
  scores = json.loads((workdir / 'eval.json').read_text())['metrics']
  fad = sorted(k for k in scores if k.startswith('fad/') and k.endswith('/all'))
  return {
    'fad': scores[fad[0]] if fad else float('nan'),
    'wer': scores.get('wer/generated', float('nan')),
    'wer_real': scores.get('wer/original', float('nan')),
    'mel_l1': scores.get('mel_l1/all', float('nan')),
  }


def comparison_row(variant: str, workdir: pathlib.Path) -> dict:
  run_config = (
    json.loads((workdir / 'config.json').read_text())
    if (workdir / 'config.json').exists()
    else None
  )
  lambdas = {}
  if variant == 'fog_a':
    lambdas = selection.read_selection(pathlib.Path(run_config['repa']['selection_file']))
  elif variant != PHASE_ONE:
    lambdas = {
      d: dict(zip(run_config['repa']['layers'][d], run_config['repa']['lambdas'][d]))
      for d in run_config['data']['domains']
    }
  curve = eval_curve(workdir)
  return {
    'variant': variant,
    'layers': ' '.join(f'{d}:{",".join(map(str, sorted(c)))}' for d, c in lambdas.items()) or '-',
    'lambdas': ' '.join(
      f'{d}:{",".join(f"{v:.3f}" for _, v in sorted(c.items()))}' for d, c in lambdas.items()
    )
    or '-',
    'final_eval_loss_fm': curve[-1][1] if curve else float('nan'),
    'eval_loss_fm_curve': ' '.join(f'{s}:{v:.4f}' for s, v in curve),
    'workdir': str(workdir),
    'curve': curve,
    **eval_metrics(workdir),
  }


def write_comparison(rows: list[dict], workdir: pathlib.Path):
  columns = (
    'variant',
    'layers',
    'lambdas',
    'final_eval_loss_fm',
    'fad',
    'wer',
    'wer_real',
    'mel_l1',
    'eval_loss_fm_curve',
    'workdir',
  )
  with (workdir / 'compare.csv').open('w', newline='') as f:
    writer = csv.DictWriter(f, columns, extrasaction='ignore')
    writer.writeheader()
    writer.writerows(rows)
  fig, ax = plt.subplots(figsize=(6, 4))
  for row in rows:
    if row['curve']:
      ax.plot(
        *zip(*row['curve']), marker='.', label=f'{row["variant"]} ({row["final_eval_loss_fm"]:.4f})'
      )
  ax.set_xlabel('step')
  ax.set_ylabel('held-out FM loss')
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(workdir / 'compare_curves.png', dpi=100)
  plt.close(fig)
