"""Two JAX processes × 4 CPU devices train exactly like one process × 8, and resume like it.

Each run goes through launch/local_multiprocess.py (a local coordinator, one OS process per JAX
process), as a multi-host job would.
"""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from agrepa_jax import metrics
from tests.helpers import tiny_config, write_fake_cache

REPOSITORY = pathlib.Path(__file__).resolve().parents[1]
LAUNCHER = REPOSITORY / 'launch' / 'local_multiprocess.py'
NUM_STEPS = 12
OVERRIDES = {
  'log_every': 1,
  'eval_every': 0,
  'checkpoint_every': 100,
  'optim.schedule_steps': NUM_STEPS,  # the same learning rates whether a run stops early or not
  'mesh.data': -1,
  'mesh.fsdp': 2,
}


def write_config_file(tmp_path: pathlib.Path) -> pathlib.Path:
  """A config file that the launched processes load: the tiny test config over a fake cache."""
  write_fake_cache(tiny_config(tmp_path / 'cache'))
  path = tmp_path / 'tiny.py'
  path.write_text(
    'import pathlib\n'
    'from tests.helpers import tiny_config\n\n\n'
    'def get_config():\n'
    f'  return tiny_config(pathlib.Path({str(tmp_path / "cache")!r}), **{OVERRIDES!r})\n'
  )
  return path


def train(config_file, workdir, processes: int, num_steps: int, *overrides: str):
  """Runs (or resumes) training to `num_steps` with `processes` × (8 / processes) CPU devices."""
  env = {
    **os.environ,
    'PYTHONPATH': str(REPOSITORY),
    'XLA_FLAGS': '',
    'JAX_PLATFORMS': 'cpu',
    # no compilation cache: gloo gives up when one process reaches the first collective 30 s
    # before the other, as happens when only one of them finds its step in a cache
    'JAX_ENABLE_COMPILATION_CACHE': 'false',
  }
  command = [
    sys.executable,
    str(LAUNCHER),
    f'--processes={processes}',
    f'--devices_per_process={8 // processes}',
    f'--log_dir={workdir}/launcher',
    '--',
    f'--config={config_file}',
    f'--workdir={workdir}',
    f'--config.num_steps={num_steps}',
    *overrides,
  ]
  result = subprocess.run(command, env=env, cwd=REPOSITORY, timeout=600)
  logs = '\n'.join(p.read_text()[-20000:] for p in sorted((workdir / 'launcher').glob('*.log')))
  assert result.returncode == 0, logs


def losses(workdir) -> dict[int, tuple[float, float]]:
  rows = metrics.read_metrics(workdir / 'metrics.jsonl')
  return {row['step']: (row['loss'], row['grad_norm']) for row in rows}


def heldout_losses(workdir) -> dict[int, float]:
  rows = metrics.read_metrics(workdir / 'metrics.jsonl')
  return {row['step']: row['eval_loss'] for row in rows if 'eval_loss' in row}


@pytest.mark.slow
def test_two_and_four_processes_train_evaluate_and_resume_like_one(tmp_path):
  config_file = write_config_file(tmp_path)
  evaluate = f'--config.eval_every={NUM_STEPS // 2}'
  train(config_file, tmp_path / 'one', 1, NUM_STEPS, evaluate)
  train(config_file, tmp_path / 'two', 2, NUM_STEPS // 2, evaluate)
  assert (tmp_path / 'two' / 'checkpoints' / str(NUM_STEPS // 2)).is_dir()
  train(config_file, tmp_path / 'two', 2, NUM_STEPS, evaluate)  # resumes at step 6
  train(config_file, tmp_path / 'four', 4, NUM_STEPS // 2, evaluate)

  one, two = losses(tmp_path / 'one'), losses(tmp_path / 'two')
  assert sorted(one) == sorted(two) == list(range(1, NUM_STEPS + 1))
  np.testing.assert_allclose(
    [two[s] for s in sorted(two)], [one[s] for s in sorted(one)], rtol=1e-5
  )
  assert one[NUM_STEPS][0] < one[1][0]  # it trains
  # held-out batches hold the same records in the same rows on any number of processes
  held_out = {n: heldout_losses(tmp_path / n) for n in ('one', 'two', 'four')}
  assert sorted(held_out['one']) == sorted(held_out['two']) == [NUM_STEPS // 2, NUM_STEPS]
  for n in ('two', 'four'):
    for step, value in held_out[n].items():
      np.testing.assert_allclose(value, held_out['one'][step], rtol=1e-5, err_msg=f'{n} {step}')


@pytest.mark.slow
def test_online_teachers_on_two_processes_train_like_one(tmp_path):
  """teachers.online on the embedded corpus with Whisper tiny.en: the replicated teacher and the
  per-domain rows of each process give the losses of one process."""
  overrides = [
    '--config.teachers.online=True',
    f'--config.data.cache_dir={tmp_path / "cache"}',
    '--config.data.num_speech=24',
    '--config.data.num_audio=24',
    '--config.data.tokenizer_clips=16',
    *[f'--config.{k}={v}' for k, v in OVERRIDES.items()],
  ]
  for processes in (1, 2):
    train('configs/default.py', tmp_path / str(processes), processes, 4, *overrides)
  one, two = losses(tmp_path / '1'), losses(tmp_path / '2')
  assert sorted(one) == sorted(two) == [1, 2, 3, 4]
  np.testing.assert_allclose([two[s] for s in two], [one[s] for s in two], rtol=1e-5)
  rows = metrics.read_metrics(tmp_path / '2' / 'metrics.jsonl')
  assert all(row['loss_repa'] > 0 for row in rows)  # the online targets reach the REPA loss
