"""Phase I of probe-then-intervene: probe a trained workdir and write DIR/probe/.

Files (layers 1-based everywhere):
- fog_a.csv: domain, layer, t, score — the per-domain mean FoG-A Δ (NaN for a domain without clips;
  0 for layers the schedule does not probe);
- lasp.csv: domain, layer, probe, score — storage scores of the 'bitc', 'repa' and 'ridge' probes;
- scd.json: the probe settings, clips per domain, and per probe kind and domain the Spearman
  correlation, its p-value, the top-K overlap and both top-K lists;
- selection.json: the rule and settings, and per domain the selected layers and their λ
  (`selection.read_selection` turns it into the input of `selection.dense_lambdas`);
- fog_a_heatmap.png (layers × t, a panel per domain), storage_vs_contribution.png.
"""

import csv
import json
import logging
import pathlib

import jax
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from agrepa_jax import checkpoint, selection  # noqa: E402
from agrepa_jax.probe import fog_a, lasp, probed_layers, scd, schedule_from_config  # noqa: E402
from agrepa_jax.probe.batch import balanced_indices, stack_records  # noqa: E402


def write_csv(path: pathlib.Path, header: tuple[str, ...], rows):
  with path.open('w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def plot_fog_a(table: np.ndarray, t_values, domains, path: pathlib.Path):
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
  figure.savefig(path, dpi=120)
  plt.close(figure)


def plot_storage_vs_contribution(
  contribution: np.ndarray, storage: dict, domains, path: pathlib.Path
):
  figure, axes = plt.subplots(1, len(domains), figsize=(5 * len(domains), 4), squeeze=False)
  layers = np.arange(1, contribution.shape[0] + 1)
  for d, (axis, domain) in enumerate(zip(axes[0], domains)):
    axis.plot(layers, contribution[:, d], 'o-', color='tab:red', label='contribution (FoG-A)')
    axis.set_xlabel('layer')
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_ylabel('contribution (FoG-A Δ)', color='tab:red')
    twin = axis.twinx()
    for kind, scores in storage.items():
      twin.plot(layers, scores[:, d], 's--', label=f'storage ({kind})')
    twin.set_ylabel('storage (cosine to teacher)')
    axis.set_title(domain)
    lines = axis.get_legend_handles_labels()
    twin_lines = twin.get_legend_handles_labels()
    axis.legend(lines[0] + twin_lines[0], lines[1] + twin_lines[1], fontsize='small', loc='best')
  figure.tight_layout()
  figure.savefig(path, dpi=120)
  plt.close(figure)


def run_probe(config, workdir: pathlib.Path) -> dict:
  """Probes the checkpoint `config.probe.checkpoint_step` (-1: latest) of `workdir`; writes workdir/probe/."""
  probe = config.probe
  schedule = schedule_from_config(config)
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
  )
  eligible = probed_layers(table.shape[0], schedule)
  table[~eligible] = 0.0
  contribution = selection.layer_scores(table, schedule.t_values, probe.selection_t)
  storage = lasp.storage_scores(
    run.model,
    batch,
    domains,
    key,
    t=probe.lasp_t,
    prompt_fraction=probe.prompt_fraction,
    batch_size=probe.batch_size,
    fit_fraction=probe.ridge_fit_fraction,
    ridge_alpha=probe.ridge_alpha,
    noise_std=config.flow.noise_std,
  )
  dissociation = {
    kind: scd.scd_report(scores, contribution, domains, probe.top_k, eligible)
    for kind, scores in storage.items()
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
    'scd': dissociation,
    'selection': chosen,
  }
  if jax.process_index() == 0:
    write_outputs(workdir / 'probe', results, schedule, probe, domains)
  return results


def write_outputs(out: pathlib.Path, results: dict, schedule, probe, domains):
  out.mkdir(parents=True, exist_ok=True)
  table, t_values = results['fog_a'], schedule.t_values
  write_csv(
    out / 'fog_a.csv',
    ('domain', 'layer', 't', 'score'),
    [
      (domain, layer + 1, t, float(table[layer, j, d]))
      for d, domain in enumerate(domains)
      for layer in range(table.shape[0])
      for j, t in enumerate(t_values)
    ],
  )
  write_csv(
    out / 'lasp.csv',
    ('domain', 'layer', 'probe', 'score'),
    [
      (domain, layer + 1, kind, float(scores[layer, d]))
      for kind, scores in results['storage'].items()
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
    json.dumps(
      {**settings, 'clips_per_domain': clips, 'lasp_t': probe.lasp_t, 'probes': results['scd']},
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
