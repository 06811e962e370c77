"""The command line, run as a user runs it."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, devices=1, timeout=900):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  return subprocess.run([sys.executable, '-m', 'agrepa_jax.main', *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_fails_with_a_message_that_names_it(tmp_path):
  result = run_main('--config', 'configs/default.py', '--workdir', str(tmp_path), '--config.model.widht=64')
  assert result.returncode != 0
  assert 'widht' in result.stderr


def test_mesh_that_does_not_fit_the_devices_names_the_axes(tmp_path):
  result = run_main('--config', 'configs/paper_single.py', '--workdir', str(tmp_path), '--mode', 'aot',
                    '--config.mesh.fsdp=3', devices=8)
  assert result.returncode != 0
  assert 'mesh' in result.stderr and 'fsdp' in result.stderr


@pytest.mark.slow
def test_aot_compiles_the_paper_model_on_8_devices_without_allocating_it(tmp_path):
  result = run_main('--config', 'configs/paper_single.py', '--workdir', str(tmp_path), '--mode', 'aot', devices=8)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / 'aot.json').read_text())
  assert abs(report['params_backbone'] - 461e6) / 461e6 < 0.03
  assert abs(report['params_blocks'] - 453.4e6) < 0.05e6
  assert report['params_heads'] > 0 and report['devices'] == 8
  assert report['mesh'] == {'data': 1, 'fsdp': 8}
  # FSDP: each device holds about an eighth of params + Adam moments (565 M × 3 × 4 bytes / 8)
  total_params = report['params_backbone'] + report['params_heads']
  assert 0.9 < report['argument_bytes'] / (total_params * 12 / 8) < 1.2
  assert report['temp_bytes'] > 0
