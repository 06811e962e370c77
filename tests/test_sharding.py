"""The sharding plan of the paper_single train step, read from its optimized HLO on 8 CPU devices.

The model is narrowed (width 256, 2 s clips, batch 40) so it compiles in about a minute; depth,
heads, teachers, REPA preset, remat and dtype are the paper's. Batch 40 and 188 frames appear in
no weight shape, so a collective whose shape holds either moves activations.
"""

import jax
import pytest

from agrepa_jax import aot, audio, config_base, sharding
from agrepa_jax import state as state_lib


def narrow_paper_single(fsdp: int):
  config = config_base.config_from_file('configs/paper_single.py')
  config.model.update(width=256, num_heads=4, token_dim=256, vocab_size=512)
  config.batch_size = 40
  config.data.clip_seconds = 2.0
  config.mesh.update(data=1, fsdp=fsdp, tensor=1)
  return config


def collectives(hlo: str) -> list[tuple[str, str, list[tuple[int, ...]]]]:
  """(computation, kind, result shapes) of every collective (aot.collectives without dtypes)."""
  return [(c, kind, [shape for _, shape in shapes]) for c, kind, shapes in aot.collectives(hlo)]


@pytest.fixture(scope='module')
def compiled_steps():
  """{fsdp: (compiled step, aot report)} for fsdp 2 (on 2 devices) and 8 (on all 8)."""
  return {
    fsdp: aot.compile_train_step(narrow_paper_single(fsdp), jax.devices()[:fsdp]) for fsdp in (2, 8)
  }


@pytest.mark.slow
def test_paper_single_step_moves_weights_only_one_layer_at_a_time(compiled_steps):
  config = narrow_paper_single(8)
  compiled, _ = compiled_steps[8]
  found = collectives(compiled.as_text())
  frames = audio.num_frames(round(config.data.clip_seconds * audio.SAMPLE_RATE))
  activation_sizes = {config.batch_size, config.batch_size // 8, frames}
  moving_activations = [c for c in found if any(activation_sizes & set(s) for s in c[2])]
  assert not moving_activations

  num_layers = config.model.num_layers
  _, shapes = state_lib.abstract_state(
    config, aot.teacher_dims_from_config(config), state_lib.make_optimizer(config)[0]
  )
  stacks = {
    tuple(x.shape)
    for x in jax.tree.leaves(shapes.params)
    if x.ndim >= 2 and x.shape[0] == num_layers
  }
  whole_stacks = [c for c in found if c[1] == 'all-gather' and stacks & set(c[2])]
  assert not whole_stacks
  # the depth scans gather each block's kernels, one layer per iteration
  in_loop = {s for computation, kind, shapes in found if computation == 'loop' for s in shapes}
  assert (config.model.width, 3 * config.model.width) in in_loop


@pytest.mark.slow
def test_per_device_memory_shrinks_with_fsdp(compiled_steps):
  (_, two), (_, eight) = compiled_steps[2], compiled_steps[8]
  for key in ('argument_bytes', 'temp_bytes'):
    # 1/4 of the parameters, optimizer state and batch per device, plus small replicated leaves
    assert 0.2 < eight[key] / two[key] < 0.32, (key, eight[key], two[key])


def test_rules_map_logical_axes_to_mesh_axes():
  sizes = {'data': 2, 'fsdp': 4, 'tensor': 1}
  rules = config_base.base_config().mesh.rules
  spec = lambda names, shape: sharding.logical_to_spec(names, shape, sizes, rules)
  assert spec(('layers', 'embed', 'mlp'), (24, 1024, 4096)) == jax.sharding.PartitionSpec(
    None, 'fsdp', None
  )
  # a (width, width) kernel takes fsdp once; the fallback rule shards the head output instead
  assert spec(('embed', 'hidden'), (64, 64)) == jax.sharding.PartitionSpec('fsdp', None)
  assert spec(('hidden', 'teacher'), (64, 768)) == jax.sharding.PartitionSpec('fsdp', None)
  # indivisible dimensions stay whole
  assert spec(('embed', 'mels'), (30, 100)) == jax.sharding.PartitionSpec(None, None)
  # tensor parallelism is a rule away
  assert sharding.logical_to_spec(
    ('embed', 'mlp'), (64, 256), {'data': 1, 'fsdp': 2, 'tensor': 4}, rules
  ) == jax.sharding.PartitionSpec('fsdp', 'tensor')
  assert spec(('batch', None, None), (8, 5, 3)) == jax.sharding.PartitionSpec(
    ('data', 'fsdp'), None, None
  )
