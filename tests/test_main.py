"""The command line, run as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main_env(devices=1):
  return {
    **os.environ,
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
    'JAX_PLATFORMS': 'cpu',
  }


def run_main(*args, devices=1, timeout=900):
  return subprocess.run(
    [sys.executable, '-m', 'agrepa_jax.main', *args],
    cwd=REPO,
    env=main_env(devices),
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def test_mesh_that_does_not_fit_the_devices_names_the_axes(tmp_path):
  result = run_main(
    '--config',
    'configs/paper_single.py',
    '--workdir',
    str(tmp_path),
    '--mode',
    'aot',
    '--config.mesh.fsdp=3',
    devices=8,
  )
  assert result.returncode != 0
  assert 'mesh' in result.stderr and 'fsdp' in result.stderr


@pytest.mark.slow
def test_aot_compiles_the_paper_model_on_8_devices_without_allocating_it(tmp_path):
  result = run_main(
    '--config', 'configs/paper_single.py', '--workdir', str(tmp_path), '--mode', 'aot', devices=8
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'aot.json').read_text())
  assert abs(report['params_backbone'] - 473.6e6) / 473.6e6 < 0.01  # official forms (fidelity.md)
  assert abs(report['params_blocks'] - 453.4e6) < 0.05e6
  assert report['params_heads'] > 0 and report['devices'] == 8
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'tensor': 1}
  # FSDP: each device holds about an eighth of params + Adam moments (565 M × 3 × 4 bytes / 8)
  total_params = report['params_backbone'] + report['params_heads']
  assert 0.9 < report['argument_bytes'] / (total_params * 12 / 8) < 1.2
  assert report['temp_bytes'] > 0


TINY_CONFIG = """
from tests.helpers import tiny_config


def get_config():
  config = tiny_config({cache_dir!r})
  config.num_steps = {num_steps}
  config.checkpoint_every = {checkpoint_every}
  config.async_checkpointing = True
  return config
"""


def tiny_config_file(tmp_path, num_steps, checkpoint_every=3):
  from tests.helpers import tiny_config, write_fake_cache

  write_fake_cache(tiny_config(tmp_path / 'cache'))
  path = tmp_path / f'tiny_{num_steps}.py'
  path.write_text(
    TINY_CONFIG.format(
      cache_dir=str(tmp_path / 'cache'), num_steps=num_steps, checkpoint_every=checkpoint_every
    )
  )
  return str(path)


def metric_rows(workdir):
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def run_main_in(directory, *args, devices=1):
  return subprocess.run(
    [sys.executable, '-m', 'agrepa_jax.main', *args],
    cwd=directory,
    env={**main_env(devices), 'PYTHONPATH': REPO},
    capture_output=True,
    text=True,
    timeout=900,
  )


@pytest.mark.slow
def test_train_writes_the_workdir_and_a_rerun_trains_further(tmp_path):
  workdir = tmp_path / 'run'
  # a relative --workdir, as in the README (orbax itself needs absolute paths)
  cache = tmp_path / 'compiled'
  result = run_main_in(
    tmp_path,
    '--config',
    tiny_config_file(tmp_path, 4),
    '--workdir',
    'run',
    '--compilation_cache',
    str(cache),
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert any(cache.iterdir())  # the compiled train step, for the next run of this program
  config = json.loads((workdir / 'config.json').read_text())
  assert config['num_steps'] == 4 and config['model']['width'] == 32
  assert [r['step'] for r in metric_rows(workdir)] == [2, 3, 4]  # log every 2, evaluate every 3
  assert (workdir / 'loss_curves.png').stat().st_size > 1000
  assert any(p.name.startswith('events.out.tfevents') for p in (workdir / 'tensorboard').iterdir())
  assert sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit()) == [
    3,
    4,
  ]

  result = run_main('--config', tiny_config_file(tmp_path, 6), '--workdir', str(workdir))
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'resumed from step 4' in result.stderr
  assert [r['step'] for r in metric_rows(workdir)] == [2, 3, 4, 6]


def start_main(*args):
  return subprocess.Popen(
    [sys.executable, '-m', 'agrepa_jax.main', *args],
    cwd=REPO,
    env=main_env(),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def wait_for(condition, seconds=600):
  deadline = time.time() + seconds
  while time.time() < deadline and not condition():
    time.sleep(0.1)


@pytest.mark.slow
def test_sigterm_in_start_up_or_training_exits_6_unlocked_and_the_run_resumes(tmp_path):
  workdir = tmp_path / 'run'
  no_scheduled_checkpoints = tiny_config_file(tmp_path, 100000, checkpoint_every=10**6)
  arguments = ('--config', no_scheduled_checkpoints, '--workdir', str(workdir))
  process = start_main(*arguments)
  wait_for(lambda: (workdir / 'lock.json').exists())  # held: start-up has begun
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 6, stderr[-3000:]
  assert 'SIGTERM received outside the training steps' in stderr and 'Traceback' not in stderr
  assert not (workdir / 'lock.json').exists() and not (workdir / 'checkpoints').exists()

  process = start_main(*arguments)
  wait_for(lambda: (workdir / 'metrics.jsonl').exists() and len(metric_rows(workdir)) >= 2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=300)
  assert process.returncode == 6, stderr[-3000:]  # preempted: a scheduler requeues it
  steps = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert len(steps) == 1 and steps[0] >= 2  # the one checkpoint is the one saved at the stop
  stopped_at = steps[0]
  assert f'stopped by SIGTERM after saving step {stopped_at}' in stderr
  assert not (workdir / 'lock.json').exists()
  result = run_main(
    '--config', tiny_config_file(tmp_path, stopped_at + 2), '--workdir', str(workdir)
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'resumed from step {stopped_at}' in result.stderr


@pytest.mark.slow
def test_features_mode_builds_a_cache_that_training_reads_without_recomputing(tmp_path):
  small = [
    '--config.data.cache_dir=' + str(tmp_path / 'cache'),
    '--config.data.num_speech=6',
    '--config.data.num_audio=6',
    '--config.data.clip_seconds=1.8',
    '--config.data.chunk_size=4',
    '--config.data.heldout_fraction=0.25',
    '--config.model.vocab_size=8',
    '--config.batch_size=4',
    '--config.eval_every=0',
  ]
  result = run_main(
    '--config',
    'configs/default.py',
    '--workdir',
    str(tmp_path / 'run'),
    '--mode',
    'features',
    *small,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'run' / 'features.json').read_text())
  assert sum(report['num_clips'].values()) == 12 and report['teacher_dims'] == {
    'speech': 384,
    'audio': 384,
  }
  assert report['this_run']['computed'] == 2 and report['this_run']['clips'] == 12  # 2 shards
  result = run_main(
    '--config',
    'configs/default.py',
    '--workdir',
    str(tmp_path / 'run'),
    '--config.num_steps=2',
    '--config.log_every=1',
    *small,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'features (decode' not in result.stderr  # nothing recomputed
  assert [r['step'] for r in metric_rows(tmp_path / 'run')] == [1, 2]

  # the other modes on this short-trained embedded-default workdir
  workdir = tmp_path / 'run'
  result = run_main(
    '--config',
    'configs/default.py',
    '--workdir',
    str(workdir),
    '--mode',
    'probe',
    '--config.probe.num_clips=2',
    '--config.probe.t_values=(0.5,)',
    *small,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert {'fog_a.csv', 'lasp.csv', 'scd.json', 'selection.json', 'fog_a_heatmap.png'} <= {
    p.name for p in (workdir / 'probe').iterdir()
  }
  result = run_main(
    '--config',
    'configs/default.py',
    '--workdir',
    str(workdir),
    '--mode',
    'sample',
    '--config.sample.num_clips=2',
    '--config.sample.num_points=4',
    *small,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  samples = {p.name for p in (workdir / 'samples').iterdir()}
  assert 'index.html' in samples and sum(name.endswith('_generated.wav') for name in samples) == 2
  assert 'griffin-lim' in (workdir / 'samples' / 'index.html').read_text()
  result = run_main(
    '--config',
    'configs/default.py',
    '--workdir',
    str(workdir),
    '--mode',
    'eval',
    '--config.eval.num_clips=3',
    '--config.sample.num_points=4',
    *small,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((workdir / 'eval.json').read_text())
  assert {'mel_l1/all', 'wer/generated', 'wer/original'} <= set(report['metrics'])
  assert any(k.startswith('fad/whisper-tiny.en/') for k in report['metrics'])
