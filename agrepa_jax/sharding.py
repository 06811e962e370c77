"""The device mesh and the sharding rules: batch over (data, fsdp); parameters FSDP-style."""

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp')
# Leaves under these names carry a leading layer axis that the depth scan walks; it is not sharded.
STACKED_SCOPES = ('blocks', 'per_domain')


def mesh_shape(axis_sizes: dict, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes; one axis may be -1, meaning all remaining devices."""
  sizes = [int(axis_sizes[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(
        f'mesh: {num_devices} devices do not divide by {known} ({dict(zip(MESH_AXES, sizes))})'
      )
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f'mesh: axis sizes {dict(zip(MESH_AXES, sizes))} need {int(np.prod(sizes))} devices, '
      f'{num_devices} are present'
    )
  return tuple(sizes)


def make_mesh(axis_sizes: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(axis_sizes, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, stacked: bool, min_size: int = 2**14) -> P:
  """Shards the largest divisible axis (never a stacked layer axis) over `fsdp`; small leaves replicate."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  candidates = [i for i in range(1 if stacked else 0, len(shape)) if shape[i] % fsdp_size == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: shape[i])
  return P(*[('fsdp' if i == axis else None) for i in range(len(shape))])


def _path_names(path) -> list[str]:
  return [str(getattr(k, 'key', getattr(k, 'name', getattr(k, 'idx', k)))) for k in path]


def tree_shardings(tree, mesh: Mesh, min_size: int = 2**14):
  """NamedShardings for every array leaf of `tree` (parameters, optimizer state, ...).

  Leaves with fewer than `min_size` elements are replicated: sharding them saves little memory and
  costs a collective each.
  """
  fsdp_size = mesh.shape['fsdp']

  def rule(path, leaf):
    stacked = any(name in STACKED_SCOPES for name in _path_names(path))
    return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size, stacked, min_size))

  return jax.tree_util.tree_map_with_path(rule, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(MESH_AXES))  # the batch is split over every axis


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh):
  """Assembles this host's numpy batch into globally sharded arrays (leading axis = batch)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )
