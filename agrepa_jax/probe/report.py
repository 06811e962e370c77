"""Phase I of probe-then-intervene: probe a trained workdir and write DIR/probe/.

Files (layers 1-based everywhere):
- fog_a.csv: domain, layer, t, score — the per-domain mean FoG-A Δ (NaN for a domain without clips;
  0 for layers the schedule does not probe);
- lasp.csv: domain, layer, probe, measure, score — storage scores of the 'bitc', 'repa' and 'ridge'
  probes by the paper's 'cosine' and the 'centered' cosine (lasp.py);
- scd.json: the probe settings, clips per domain, the storage measure SCD ranks
  (config.probe.storage_measure), and per probe kind and domain the Spearman correlation, its
  p-value, the top-K overlap and both top-K lists;
- selection.json: the rule and settings, and per domain the selected layers and their λ
  (`selection.read_selection` turns it into the input of `selection.dense_lambdas`);
- fog_a_heatmap.png (layers × t, a panel per domain), storage_vs_contribution.png (a row per
  storage measure, a column per domain).
"""

import json
import logging

import jax
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from agrepa_jax import checkpoint, files, selection  # noqa: E402
from agrepa_jax.probe import fog_a, lasp, scd  # noqa: E402
from agrepa_jax.probe.batch import balanced_indices, stack_records  # noqa: E402


def plot_fog_a(table: np.ndarray, t_values, domains, path: epath.Path):
  figure, axes = plt.subplots(1, len(domains), figsize=(4 * len(domains), 5), squeeze=False)
  num_layers = table.shape[0]
  for d, (axis, domain) in enumerate(zip(axes[0], domains)):
    image = axis.imshow(
      table[:, :, d],
      aspect='auto',
      origin='lower',
      cmap='viridis',
      extent=(-0.5, len(t_values) - 0.5, 0.5, num_layers + 0.5),
    )
    axis.set_xticks(range(len(t_values)), [f'{t:g}' for t in t_values])
    axis.set_xlabel('t')
    axis.set_ylabel('layer')
    axis.yaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f'FoG-A Δ, {domain}')
    figure.colorbar(image, ax=axis)
  figure.tight_layout()
  files.save_figure(figure, path, dpi=120)
  plt.close(figure)


def plot_storage_vs_contribution(
  contribution: np.ndarray, storage: dict, domains, path: epath.Path
):
  """Contribution (left axis) and every probe's storage score (right axis) over layers: a row per
  storage measure, a column per domain; one legend below the panels."""
  measures = list(storage)
  figure, axes = plt.subplots(
    len(measures), len(domains), figsize=(5 * len(domains), 3.2 * len(measures)), squeeze=False
  )
  layers = np.arange(1, contribution.shape[0] + 1)
  for row, measure in zip(axes, measures):
    for d, (axis, domain) in enumerate(zip(row, domains)):
      axis.plot(layers, contribution[:, d], 'o-', color='tab:red', label='contribution (FoG-A Δ)')
      axis.set_xlabel('layer')
      axis.xaxis.set_major_locator(MaxNLocator(integer=True))
      axis.set_ylabel('FoG-A Δ', color='tab:red')
      twin = axis.twinx()
      for kind, scores in storage[measure].items():
        twin.plot(layers, scores[:, d], 's--', label=f'storage ({kind} probe)')
      twin.set_ylabel(f'storage ({measure})')
      axis.set_title(f'{domain}, storage = {measure}')
  handles = [h for ax in (axis, twin) for h in ax.get_legend_handles_labels()[0]]
  labels = [label for ax in (axis, twin) for label in ax.get_legend_handles_labels()[1]]
  figure.legend(handles, labels, loc='lower center', ncol=len(labels), fontsize='small')
  figure.tight_layout(rect=(0, 0.03 + 0.06 / len(measures), 1, 1))
  files.save_figure(figure, path, dpi=120)
  plt.close(figure)


def lasp_time(config, schedule) -> float:
  """probe.lasp_t, or the reference schedule's single t (0.8) under repa.quirks."""
  return schedule.t_values[0] if config.repa.quirks else config.probe.lasp_t


def run_probe(config, workdir: epath.Path) -> dict:
  """Probes the checkpoint `config.probe.checkpoint_step` (-1: latest) of `workdir`; writes
  workdir/probe/."""
  probe = config.probe
  if probe.storage_measure not in lasp.MEASURES:
    raise ValueError(
      f'probe.storage_measure {probe.storage_measure!r}: expected one of {lasp.MEASURES}'
    )
  schedule = selection.schedule_from_config(config)
  run = checkpoint.restore_trained(
    config, workdir, None if probe.checkpoint_step < 0 else probe.checkpoint_step
  )
  domains = tuple(config.data.domains)
  source = run.heldout_source
  indices = balanced_indices(
    np.asarray(source.arrays['domain']), len(domains), schedule.num_clips, probe.seed
  )
  batch = stack_records([source[int(i)] for i in indices], domains)
  key = jax.random.key(probe.seed)
  logging.info('probe: step %d, %d held-out clips, t=%s', run.step, len(indices), schedule.t_values)

  table, counts = fog_a.fog_a_table(
    run.model.backbone,
    batch,
    schedule.t_values,
    key,
    num_domains=len(domains),
    batch_size=probe.batch_size,
    chunk_size=probe.chunk_size,
    mesh=run.mesh,
    prompt_fraction=probe.prompt_fraction,
    dropout=schedule.dropout,
    clean_input=schedule.clean_input,
    progress=jax.process_index() == 0,
    noise_std=config.flow.noise_std,
    mask_padding=config.model.mask_padding,
  )
  eligible = selection.probed_layers(table.shape[0], schedule)
  table[~eligible] = 0.0
  contribution = selection.layer_scores(table, schedule.t_values, probe.selection_t)
  lasp_t = lasp_time(config, schedule)
  storage = lasp.storage_scores(
    run.model,
    batch,
    domains,
    key,
    lasp.training_teacher_means(run.train_source, domains),
    t=lasp_t,
    prompt_fraction=probe.prompt_fraction,
    batch_size=probe.batch_size,
    fit_fraction=probe.ridge_fit_fraction,
    ridge_alpha=probe.ridge_alpha,
    noise_std=config.flow.noise_std,
    quirks=config.repa.quirks,
  )
  dissociation = {
    kind: scd.scd_report(scores, contribution, domains, probe.top_k, eligible)
    for kind, scores in storage[probe.storage_measure].items()
  }
  chosen = selection.select_layers(
    contribution,
    domains,
    top_k=probe.top_k,
    rule=schedule.lambda_rule,
    total=probe.lambda_total,
    temperature=probe.softmax_temperature,
    eligible=eligible,
  )
  results = {
    'step': run.step,
    'fog_a': table,
    'clips_per_domain': counts,
    'contribution': contribution,
    'storage': storage,
    'lasp_t': lasp_t,
    'scd': dissociation,
    'selection': chosen,
  }
  if jax.process_index() == 0:
    write_outputs(workdir / 'probe', results, schedule, probe, domains)
  return results


def write_outputs(out: epath.Path, results: dict, schedule, probe, domains):
  out.mkdir(parents=True, exist_ok=True)
  table, t_values = results['fog_a'], schedule.t_values
  files.write_csv(
    out / 'fog_a.csv',
    ('domain', 'layer', 't', 'score'),
    [
      (domain, layer + 1, t, float(table[layer, j, d]))
      for d, domain in enumerate(domains)
      for layer in range(table.shape[0])
      for j, t in enumerate(t_values)
    ],
  )
  files.write_csv(
    out / 'lasp.csv',
    ('domain', 'layer', 'probe', 'measure', 'score'),
    [
      (domain, layer + 1, kind, measure, float(scores[layer, d]))
      for measure, by_probe in results['storage'].items()
      for kind, scores in by_probe.items()
      for d, domain in enumerate(domains)
      for layer in range(scores.shape[0])
    ],
  )
  settings = {
    'step': results['step'],
    't_values': list(t_values),
    'selection_t': probe.selection_t,
    'num_clips': schedule.num_clips,
    'dropout': schedule.dropout,
    'odd_layers_only': schedule.odd_layers_only,
    'top_k': probe.top_k,
  }
  clips = {domain: int(n) for domain, n in zip(domains, results['clips_per_domain'])}
  (out / 'scd.json').write_text(
    files.json_text(
      {
        **settings,
        'clips_per_domain': clips,
        'lasp_t': results['lasp_t'],
        'storage_measure': probe.storage_measure,
        'probes': results['scd'],
      },
      indent=2,
    )
  )
  (out / 'selection.json').write_text(
    json.dumps(
      selection.selection_json(
        results['selection'],
        rule=schedule.lambda_rule,
        lambda_total=probe.lambda_total,
        softmax_temperature=probe.softmax_temperature,
        **settings,
      ),
      indent=2,
    )
  )
  plot_fog_a(table, t_values, domains, out / 'fog_a_heatmap.png')
  plot_storage_vs_contribution(
    results['contribution'], results['storage'], domains, out / 'storage_vs_contribution.png'
  )
