"""The code is formatted and lint-clean under the project's ruff settings (pyproject.toml)."""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('command', [['check'], ['format', '--check']], ids=['lint', 'format'])
def test_ruff_is_clean(command):
  result = subprocess.run(
    [sys.executable, '-m', 'ruff', *command, '.'], cwd=ROOT, capture_output=True, text=True
  )
  assert result.returncode == 0, result.stdout + result.stderr
