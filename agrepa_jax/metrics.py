"""Metric output for one run: metrics.jsonl, TensorBoard event files and PNG plots (process 0
only), in a local or object-store workdir (TensorBoard on gs:// needs the `gcs` extra)."""

import json
import logging
import os

import jax
from etils import epath

from agrepa_jax import files


class MetricWriter:
  """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

  def __init__(self, workdir: epath.Path, after_step: int | None = None):
    """With `after_step` (the step a run resumes from), rows logged past it before the run died
    are dropped."""
    self.enabled = jax.process_index() == 0
    self.path = workdir / 'metrics.jsonl'
    if self.enabled:
      if after_step is not None:
        kept = [row for row in read_metrics(self.path) if row['step'] <= after_step]
        files.write_atomic(self.path, ''.join(json.dumps(row) + '\n' for row in kept))
      from tensorboardX import SummaryWriter  # imports torch when installed: only where it writes

      self.tensorboard = SummaryWriter(os.fspath(workdir / 'tensorboard'))

  def write(self, step: int, scalars: dict):
    if not self.enabled:
      return
    row = {'step': int(step), **{k: float(v) for k, v in scalars.items()}}
    files.append_line(self.path, json.dumps(row))
    for name, value in row.items():
      if name != 'step':
        self.tensorboard.add_scalar(name, value, step)
    self.tensorboard.flush()

  def close(self):
    if self.enabled:
      self.tensorboard.close()


def read_metrics(path: epath.Path) -> list[dict]:
  """The rows of a metrics.jsonl; a last line torn by a kill mid-write is dropped with a warning."""
  if not path.exists():
    return []
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number < len(lines):
        raise ValueError(f'{path}, line {number}: not a JSON row ({e})') from e
      logging.warning('%s: dropping its last line, torn by an interrupted write: %r', path, line)
  return rows


def plot_loss_curves(
  metrics_path: epath.Path,
  png_path: epath.Path,
  names=('loss', 'loss_fm', 'loss_repa', 'loss_bitc', 'eval_loss_fm'),
):
  """One panel per loss present in metrics.jsonl, against step."""
  rows = read_metrics(metrics_path)
  present = [n for n in names if any(n in r for r in rows)]
  if not present:
    return
  # Imported here: matplotlib adds 27 MB and 0.4 s to every process that imports this module,
  # and most never plot (hosts other than 0, benchmarks). Figure needs no pyplot backend.
  from matplotlib.figure import Figure

  fig = Figure(figsize=(4 * len(present), 3.2))
  axes = fig.subplots(1, len(present), squeeze=False)
  for ax, name in zip(axes[0], present):
    points = [(r['step'], r[name]) for r in rows if name in r]
    ax.plot(*zip(*points), marker='.' if len(points) < 30 else None)
    ax.set_title(name)
    ax.set_xlabel('step')
    ax.grid(alpha=0.3)
  fig.tight_layout()
  files.save_figure(fig, png_path, dpi=100)
