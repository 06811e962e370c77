"""`--mode aot --topology`: the train step compiled by libtpu for a real TPU topology on this host.

The compile needs libtpu (pip install -e '.[tpu]'; the test extra does not install it): skipped
without it. Reading the collectives of an optimized module needs nothing.
"""

import importlib.util
import json

import pytest

from agrepa_jax import aot, console, flops
from tests.helpers import TEACHER_DIMS, tiny_config

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec('libtpu') is None, reason="libtpu is not installed (the 'tpu' extra)"
)

HLO = """\
%region_body.1 (arg: (s32[], bf16[24,1024,3072])) -> (s32[], bf16[24,1024,3072]) {
  %all-gather-start.3 = (bf16[128,3072]{1,0}, bf16[1024,3072]{1,0}) all-gather-start(%p)
  %all-gather-done.3 = bf16[1024,3072]{1,0} all-gather-done(%all-gather-start.3)
  %get-tuple-element.9 = f32[1024] get-tuple-element(%all-reduce.2), index=0
}

ENTRY %main.7 (p: f32[64,938,100]) -> f32[] {
  %all-reduce.2 = (f32[1024]{0:T(1024)}, f32[]{:T(128)}) all-reduce(%a, %b), channel_id=2
  %reduce-scatter.5 = f32[8,938,100]{2,1,0} reduce-scatter(%p), dimensions={0}
}
"""


def test_collectives_are_read_off_the_optimized_module():
  assert aot.collectives(HLO) == [
    ('loop', 'all-gather', [('bf16', (128, 3072)), ('bf16', (1024, 3072))]),
    ('entry', 'all-reduce', [('f32', (1024,)), ('f32', ())]),
    ('entry', 'reduce-scatter', [('f32', (8, 938, 100))]),
  ]
  report = aot.collective_report(HLO, [8, 64, 938])
  assert report['by_kind']['all-gather'] == {
    'count': 1,
    'in_loops': 1,
    'largest': 'bf16[1024,3072]',
    'largest_bytes': 1024 * 3072 * 2,
  }
  assert report['by_kind']['all-reduce']['largest_bytes'] == 4096
  assert report['moving_activations'] == ['reduce-scatter f32[8, 938, 100]']


def test_a_topology_without_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(console.UsageError, match=r'v5e:2x2.*\.\[tpu\]'):
    aot.topology_devices('v5e:2x2')


@pytest.fixture
def libtpu(monkeypatch):
  """libtpu for compiling only: a test process beside this one may hold its lockfile."""
  monkeypatch.setenv('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')


@needs_libtpu
@pytest.mark.usefixtures('libtpu')
def test_a_tiny_step_compiles_for_a_v5e_slice(tmp_path):
  config = tiny_config(tmp_path / 'cache')
  for domain, dim in TEACHER_DIMS.items():
    config.teachers[domain].dim = dim
  report = aot.run(config, tmp_path, topology='v5e:2x2')
  assert json.loads((tmp_path / 'aot.json').read_text()) == report
  assert (report['platform'], report['device_kind'], report['devices']) == ('tpu', 'TPU v5 lite', 4)
  assert report['topology'] == 'v5e:2x2' and report['mesh'] == {'data': 4, 'fsdp': 1, 'tensor': 1}
  assert report['peak_bytes'] == (
    report['argument_bytes'] + report['output_bytes'] - report['alias_bytes'] + report['temp_bytes']
  )
  assert 0 < report['peak_bytes'] < report['hbm_bytes'] == 16e9 and report['fits']
  assert report['roofline_step_seconds'] == pytest.approx(
    report['flops_per_step'] / 4 / flops.CHIPS['TPU v5 lite'].peak_flops
  )
  # data parallel: the gradients are all-reduced, nothing of the batch's shape moves
  assert report['collectives']['by_kind']['all-reduce']['count'] > 0
  assert report['collectives']['moving_activations'] == []


@needs_libtpu
@pytest.mark.usefixtures('libtpu')
def test_an_unknown_topology_is_named():
  with pytest.raises(console.UsageError, match='v9z:2x2'):
    aot.topology_devices('v9z:2x2')
