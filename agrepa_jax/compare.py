"""Probe-then-intervene over seeds: Phase I baseline, FoG-A probe, Phase II variants, comparison.

For each of compare.num_seeds seeds (config.seed + i) the whole workflow runs once: every variant
of that seed starts from the same initialization and sees the same data order (both follow the
seed; data.order_seed), trains for the same number of steps, and differs only in its REPA
selection:
  none         no hidden-state alignment (BiT-C only): the Phase I run itself
  fixed:<l>    REPA on layer l (1-based) in every domain, λ = compare.fixed_lambda
  fog_a        AG-REPA: the layers and λ that the probe of this seed's Phase I selected
Outputs in DIR: seed<s>/<variant>/ (the runs), compare_runs.csv (one row per run), compare.csv
(per variant and metric the mean ± std over seeds and the paired differences against no REPA and
against the best fixed layer, with 95% t intervals), compare_curves.png and compare.html.
"""

import html
import json
import logging
import math

import matplotlib
import numpy as np
from etils import epath
from scipy import stats

matplotlib.use('Agg')
import jax  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402

from agrepa_jax import config_base, files, metrics, selection, sharding, train  # noqa: E402

PHASE_ONE = 'none'
# Metrics compared across variants; lower is better for each.
METRICS = {
  'final_eval_loss_fm': 'held-out FM loss (final)',
  'fad': 'FAD (generated vs resynthesized, all clips)',
  'wer': 'WER of generated speech',
}
CONFIDENCE = 0.95
RUN_COLUMNS = (
  'variant',
  'seed',
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
SUMMARY_COLUMNS = (
  'variant',
  'metric',
  'seeds',
  'mean',
  'std',
  'vs_none',
  'vs_none_low',
  'vs_none_high',
  'best_fixed',
  'vs_best_fixed',
  'vs_best_fixed_low',
  'vs_best_fixed_high',
  'per_seed',
)


def eval_curve(workdir: epath.Path) -> list[tuple[int, float]]:
  return [
    (r['step'], r['eval_loss_fm'])
    for r in metrics.read_metrics(workdir / 'metrics.jsonl')
    if 'eval_loss_fm' in r
  ]


def seed_config(config, index: int):
  """`config` for the index-th seed: initialization, per-step draws and data order all move."""
  config = config.copy_and_resolve_references()
  config.unlock()
  config.seed = config.seed + index
  config.data.order_seed = config.seed
  config.lock()
  return config


def run_compare(config, workdir: epath.Path, allow_config_change: bool = False) -> dict:
  """Runs (or resumes) every seed's workflow in `workdir` and writes the comparison files;
  `allow_config_change` is passed to every run (train.train_and_evaluate).

  Returns {'runs': one row per (seed, variant), 'summary': one row per (variant, metric)}.
  """
  workdir = files.as_path(workdir)
  runs = []
  for index in range(config.compare.num_seeds):
    seeded = seed_config(config, index)
    logging.info('compare: seed %d (%d of %d)', seeded.seed, index + 1, config.compare.num_seeds)
    rows = run_seed(seeded, workdir / f'seed{seeded.seed}', allow_config_change)
    if rows is None:
      logging.warning('compare: stopped before the end; the same command resumes it')
      return {'runs': runs, 'summary': []}
    runs += rows
  summary = summarize(runs, tuple(config.compare.variants))
  if jax.process_index() == 0:
    files.write_csv(workdir / 'compare_runs.csv', RUN_COLUMNS, runs)
    files.write_csv(workdir / 'compare.csv', SUMMARY_COLUMNS, summary)
    plot_curves(runs, tuple(config.compare.variants), workdir / 'compare_curves.png')
    (workdir / 'compare.html').write_text(report_html(runs, summary, workdir))
  return {'runs': runs, 'summary': summary}


def trained_to_the_end(config, workdir: epath.Path, allow_config_change: bool) -> bool:
  """Trains (or resumes) one run; False when it stopped early (SIGTERM or Ctrl-C saved it)."""
  state = train.train_and_evaluate(config, workdir, allow_config_change)
  return int(state.step) >= config.num_steps


def run_seed(config, workdir: epath.Path, allow_config_change: bool = False) -> list[dict] | None:
  """Phase I, its probe and the Phase II variants of one seed; one row per variant.

  None when a run stopped early: nothing after it runs (no probe of an unfinished Phase I), and
  the same command resumes there.
  """
  workdirs = {PHASE_ONE: workdir / 'phase1'}
  logging.info('compare: Phase I (no hidden-state alignment)')
  phase_one = config_base.variant_config(config, PHASE_ONE)
  if not trained_to_the_end(phase_one, workdirs[PHASE_ONE], allow_config_change):
    return None
  probe_file = workdirs[PHASE_ONE] / 'probe' / 'selection.json'
  if not probe_file.exists():
    from agrepa_jax.probe import report

    report.run_probe(phase_one, workdirs[PHASE_ONE])
    sharding.sync_processes('probe-written')  # process 0 wrote it; every process reads it
  selection_file = phase_one_selection(config, workdirs[PHASE_ONE])
  for variant in config.compare.variants:
    if variant == PHASE_ONE:
      continue
    logging.info('compare: Phase II variant %s', variant)
    workdirs[variant] = workdir / variant.replace(':', '')
    variant_cfg = config_base.variant_config(config, variant, str(selection_file))
    if not trained_to_the_end(variant_cfg, workdirs[variant], allow_config_change):
      return None
  if config.compare.eval_clips:
    for variant, variant_dir in workdirs.items():
      evaluate_variant(
        config_base.variant_config(config, variant, str(selection_file)),
        variant_dir,
        config.compare.eval_clips,
      )
  return [
    comparison_row(variant, workdirs[variant]) | {'seed': config.seed}
    for variant in config.compare.variants
  ]


def phase_one_selection(config, phase_one_dir: epath.Path) -> epath.Path:
  """The selection Phase II uses: the probe of the final Phase I model, or with repa.quirks (as the
  reference code) the cumulative mean of every FoG-A measurement made during Phase I."""
  if not config.repa.quirks:
    return phase_one_dir / 'probe' / 'selection.json'
  path = phase_one_dir / selection.ONLINE_SELECTION
  if not path.exists():
    raise ValueError(
      f'{path} is missing: with repa.quirks Phase I measures FoG-A every repa.probe_every '
      f'({config.repa.probe_every}) steps, and it made no measurement in num_steps '
      f'({config.num_steps}); lower repa.probe_every'
    )
  return path


def evaluate_variant(config, workdir: epath.Path, num_clips: int):
  """FAD, WER and mel L1 of the variant's final checkpoint on `num_clips` held-out clips (once)."""
  if (workdir / 'eval.json').exists():
    return
  from agrepa_jax.generation import evaluate

  config.unlock()
  config.eval.num_clips = num_clips
  config.lock()
  evaluate.run_eval(config, workdir)


def eval_metrics(workdir: epath.Path) -> dict:
  """fad (first embedding, all clips), wer of generated and of the original speech, mel_l1, from
  eval.json; NaN for each when the variant was not evaluated."""
  nan = float('nan')
  if not (workdir / 'eval.json').exists():
    return {'fad': nan, 'wer': nan, 'wer_real': nan, 'mel_l1': nan}
  scores = json.loads((workdir / 'eval.json').read_text())['metrics']
  fad = sorted(k for k in scores if k.startswith('fad/') and k.endswith('/all'))
  return {
    'fad': scores[fad[0]] if fad else nan,
    'wer': scores.get('wer/generated', nan),
    'wer_real': scores.get('wer/original', nan),
    'mel_l1': scores.get('mel_l1/all', nan),
  }


def comparison_row(variant: str, workdir: epath.Path) -> dict:
  run_config = json.loads((workdir / 'config.json').read_text())
  lambdas = {}
  if variant == 'fog_a':
    lambdas = selection.read_selection(epath.Path(run_config['repa']['selection_file']))
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


# ----------------------------------------------------------------------------------- statistics


def paired_interval(differences, confidence: float = CONFIDENCE) -> tuple[float, float, float]:
  """Mean of paired differences (one per seed) and its two-sided Student-t interval; the interval
  is NaN with fewer than two seeds."""
  differences = np.asarray(differences, np.float64)
  mean = float(differences.mean())
  if len(differences) < 2:
    return mean, float('nan'), float('nan')
  half = stats.t.ppf((1 + confidence) / 2, len(differences) - 1) * stats.sem(differences)
  return mean, mean - half, mean + half


def seed_table(runs: list[dict], variants, metric: str) -> tuple[list[int], np.ndarray]:
  """The seeds and a (variants, seeds) array of `metric`, NaN where a run is missing."""
  seeds = sorted({r['seed'] for r in runs})
  table = np.full((len(variants), len(seeds)), np.nan)
  for r in runs:
    table[variants.index(r['variant']), seeds.index(r['seed'])] = r[metric]
  return seeds, table


def best_fixed_variant(runs: list[dict], variants) -> str | None:
  """The fixed-layer variant with the lowest mean final held-out FM loss over seeds."""
  fixed = [v for v in variants if v.startswith('fixed:')]
  if not fixed:
    return None
  _, table = seed_table(runs, variants, 'final_eval_loss_fm')
  means = np.array([table[variants.index(v)].mean() for v in fixed])
  return fixed[int(np.argmin(np.where(np.isnan(means), np.inf, means)))]


def summarize(runs: list[dict], variants) -> list[dict]:
  """Per variant and metric: mean, std (ddof 1) over seeds and the paired differences (variant −
  baseline, seed by seed) against 'none' and the best fixed layer, with their 95% intervals."""
  best = best_fixed_variant(runs, variants)
  rows = []
  for metric in METRICS:
    seeds, table = seed_table(runs, variants, metric)
    for v, variant in enumerate(variants):
      values = table[v]
      row = {
        'variant': variant,
        'metric': metric,
        'seeds': len(seeds),
        'mean': float(values.mean()),
        'std': float(values.std(ddof=1)) if len(values) > 1 else float('nan'),
        'best_fixed': best or '',
        'per_seed': ' '.join(f'{s}:{x:.4f}' for s, x in zip(seeds, values)),
      }
      for name, baseline in (('vs_none', PHASE_ONE), ('vs_best_fixed', best)):
        if baseline in variants:
          diff = paired_interval(values - table[variants.index(baseline)])
          row |= dict(zip((name, f'{name}_low', f'{name}_high'), diff))
      rows.append(row)
  return rows


# ------------------------------------------------------------------------------------- outputs


def plot_curves(runs: list[dict], variants, path: epath.Path):
  """Left: held-out FM loss over steps, the mean over seeds (thick) and each seed (thin). Right:
  the final loss of every run, a seed's variants joined, so that the seed noise is visible."""
  figure, (curves, finals) = plt.subplots(
    1, 2, figsize=(12, 4.2), gridspec_kw={'width_ratios': (3, 2)}
  )
  colors = {v: f'C{i}' for i, v in enumerate(variants)}
  for variant in variants:
    per_seed = [r['curve'] for r in runs if r['variant'] == variant and r['curve']]
    for curve in per_seed:
      curves.plot(*zip(*curve), color=colors[variant], lw=0.7, alpha=0.35)
    if per_seed and len({len(c) for c in per_seed}) == 1:
      steps = [s for s, _ in per_seed[0]]
      mean = np.mean([[v for _, v in c] for c in per_seed], axis=0)
      curves.plot(steps, mean, color=colors[variant], lw=2, marker='.', label=variant)
  curves.set_xlabel('step')
  curves.set_ylabel('held-out FM loss')
  curves.grid(alpha=0.3)
  seeds, table = seed_table(runs, variants, 'final_eval_loss_fm')
  x = np.arange(len(variants))
  for finals_of_seed in table.T:
    finals.plot(x, finals_of_seed, color='0.6', lw=0.8, zorder=1)
    finals.scatter(x, finals_of_seed, c=[colors[v] for v in variants], zorder=2, s=25)
  finals.errorbar(
    x + 0.15,
    np.nanmean(table, 1),
    yerr=np.nanstd(table, 1, ddof=min(1, len(seeds) - 1)),
    fmt='_',
    color='k',
    capsize=4,
    label='mean ± std',
  )
  finals.set_xticks(x, variants, rotation=30)
  finals.set_ylabel('final held-out FM loss')
  finals.set_title(f'{len(seeds)} seeds; grey lines join one seed', fontsize=9)
  finals.grid(alpha=0.3, axis='y')
  figure.legend(loc='lower center', ncol=len(variants) + 1, fontsize='small')
  figure.tight_layout(rect=(0, 0.07, 1, 1))
  files.save_figure(figure, path, dpi=100)
  plt.close(figure)


def format_number(value: float, digits: int = 4) -> str:
  return '–' if math.isnan(value) else f'{value:.{digits}f}'


def difference_cell(row: dict, name: str) -> str:
  """'mean [low, high]', bold where the interval excludes 0 (the seeds separate the two)."""
  if name not in row:
    return '–'
  mean, low, high = row[name], row[f'{name}_low'], row[f'{name}_high']
  text = f'{format_number(mean)} [{format_number(low)}, {format_number(high)}]'
  return f'<b>{text}</b>' if low > 0 or high < 0 else text


def report_html(runs: list[dict], summary: list[dict], workdir: epath.Path) -> str:
  """compare.html: the summary table, the curves, and each seed's FoG-A heatmap, storage vs
  contribution (SCD) figure and selected layers; image paths relative to `workdir`."""
  best = summary[0]['best_fixed'] if summary else ''
  table_rows = '\n'.join(
    f'<tr><td>{html.escape(r["variant"])}</td><td>{html.escape(METRICS[r["metric"]])}</td>'
    f'<td>{format_number(r["mean"])} ± {format_number(r["std"])}</td>'
    f'<td>{difference_cell(r, "vs_none")}</td><td>{difference_cell(r, "vs_best_fixed")}</td>'
    f'<td>{html.escape(r["per_seed"])}</td></tr>'
    for r in summary
  )
  seeds = sorted({r['seed'] for r in runs})
  probes = []
  for seed in seeds:
    probe_dir = f'seed{seed}/phase1/probe'
    fog_a_layers = next(
      (r['layers'] for r in runs if r['seed'] == seed and r['variant'] == 'fog_a'), '-'
    )
    scd_file = workdir / probe_dir / 'scd.json'
    measure = json.loads(scd_file.read_text())['storage_measure'] if scd_file.exists() else ''
    probes.append(
      f'<h3>Seed {seed}: FoG-A selected {html.escape(fog_a_layers)}</h3>'
      f'<img src="{probe_dir}/fog_a_heatmap.png" style="max-width:45%">'
      f'<img src="{probe_dir}/storage_vs_contribution.png" style="max-width:54%">'
      f'<p>SCD ranks the {html.escape(measure)} storage score ({probe_dir}/scd.json).</p>'
    )
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>agrepa_jax comparison</title>
<style>body{{font-family:sans-serif;margin:8px}} table{{border-collapse:collapse}}
td,th{{border-bottom:1px solid #ccc;padding:3px 8px;text-align:left}}</style></head><body>
<h1>Probe-then-intervene over {len(seeds)} seeds</h1>
<p>Mean ± std over seeds; differences are paired (variant − baseline, seed by seed) with a
{CONFIDENCE:.0%} Student-t interval, bold where it excludes 0. Lower is better for every metric.
Best fixed layer (lowest mean FM loss): <b>{html.escape(best or '–')}</b>.</p>
<table><tr><th>variant</th><th>metric</th><th>mean ± std</th><th>vs none</th>
<th>vs best fixed</th><th>per seed</th></tr>
{table_rows}
</table>
<h2>Held-out FM loss</h2><img src="compare_curves.png" style="max-width:100%">
<h2>Phase I probes</h2>
{''.join(probes)}
</body></html>
"""
