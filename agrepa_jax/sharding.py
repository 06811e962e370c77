"""The device mesh and the sharding plan, stated by rules (docs/scaling.md).

Every parameter carries logical axis names where the model creates it ('layers', 'embed', 'mlp',
...). The config's `mesh.rules` maps each logical name to mesh axes, MaxText style, so data
parallelism, FSDP and tensor parallelism are config choices. Activations are constrained at block
boundaries through the same rules ('batch' → ('data', 'fsdp')), so XLA never splits them by width.
"""

import contextlib
import contextvars
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ('data', 'fsdp', 'tensor')
BATCH_AXES = ('data', 'fsdp')  # the input batch is split over these (the 'batch' rule's default)
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

_ACTIVATION_RULES: contextvars.ContextVar[tuple | None] = contextvars.ContextVar(
  'activation_rules', default=None
)


def mesh_shape(axis_sizes: dict, num_devices: int) -> tuple[int, ...]:
  """Resolves the configured axis sizes (absent = 1); one axis may be -1: all remaining devices."""
  sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
  named = dict(zip(MESH_AXES, sizes))
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh: at most one axis may be -1, got {named}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'mesh: {num_devices} devices do not divide by {known} ({named})')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ValueError(
      f'mesh: axis sizes {named} need {int(np.prod(sizes))} devices, {num_devices} are present'
    )
  return tuple(sizes)


def make_mesh(axis_sizes: dict, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(axis_sizes, len(devices))
  return jax.make_mesh(
    shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
  )


def _as_tuple(axes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(names: Sequence[str | None], shape, mesh_sizes: dict, rules: Rules) -> P:
  """The PartitionSpec of an array with logical axis `names` under `rules`.

  Each dimension takes the first rule for its name whose mesh axes are all present, unused by an
  earlier dimension and divide the dimension; otherwise it is replicated. A name may have several
  rules (fallbacks), e.g. ('embed', 'fsdp') then ('hidden', 'fsdp') for a (width, width) kernel.
  """
  if len(names) != len(shape):
    raise ValueError(f'logical axes {tuple(names)} do not match an array of shape {tuple(shape)}')
  used, spec = set(), []
  for name, size in zip(names, shape):
    choice = None
    for rule_name, axes in rules:
      axes = _as_tuple(axes)
      if rule_name != name or not axes or used & set(axes):
        continue
      if (
        all(a in mesh_sizes for a in axes)
        and size % int(np.prod([mesh_sizes[a] for a in axes])) == 0
      ):
        choice = axes
        break
    # size-1 mesh axes shard nothing; leaving them out keeps specs readable and comparable
    choice = tuple(a for a in choice or () if mesh_sizes[a] > 1)
    used |= set(choice)
    spec.append(None if not choice else choice[0] if len(choice) == 1 else choice)
  return P(*spec)


def _logical_names(leaf) -> tuple | None:
  if isinstance(leaf, nnx.Variable):
    return leaf.get_metadata().get('out_sharding')
  return None


def tree_shardings(tree, mesh: Mesh, rules: Rules, min_size: int = 2**14):
  """NamedShardings for every array leaf of `tree` (parameters, optimizer state, ...).

  A leaf follows its variable's logical axis names; leaves without names and leaves with fewer
  than `min_size` elements are replicated (sharding them saves little and costs a collective each).
  """
  sizes = dict(mesh.shape)

  def rule(leaf):
    names = _logical_names(leaf)
    shape = tuple(leaf.shape)
    if names is None or int(np.prod(shape, dtype=np.int64)) < min_size:
      spec = P()
    else:
      spec = logical_to_spec(names, shape, sizes, rules)
    sharding = NamedSharding(mesh, spec)
    return leaf.replace(sharding) if isinstance(leaf, nnx.Variable) else sharding

  return jax.tree.map(rule, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: Rules):
  """While tracing inside this context, `constrain` pins activations to `mesh` by `rules`."""
  token = _ACTIVATION_RULES.set(tuple(rules))
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _ACTIVATION_RULES.reset(token)


def traced_with_rules(fn, mesh: Mesh, rules: Rules):
  """`fn` whose tracing happens inside `activation_rules(mesh, rules)` (wrap it before jax.jit)."""

  def traced(*args, **kwargs):
    with activation_rules(mesh, rules):
      return fn(*args, **kwargs)

  # keeps the step's name in HLO dumps and profiles (fn is often a functools.partial)
  traced.__name__ = getattr(fn, '__name__', getattr(getattr(fn, 'func', None), '__name__', 'step'))
  return traced


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Pins activation `x` to the sharding its logical axis `names` get; outside
  `activation_rules` (single-device code, probes, sampling) it returns `x` unchanged."""
  rules = _ACTIVATION_RULES.get()
  if not rules:
    return x
  mesh = jax.sharding.get_abstract_mesh()
  return jax.lax.with_sharding_constraint(
    x, logical_to_spec(names, x.shape, dict(mesh.shape), rules)
  )


def constrain_batch(x: jax.Array) -> jax.Array:
  """`constrain` for an activation whose leading axis is the batch; its other axes stay whole."""
  return constrain(x, ('batch',) + (None,) * (x.ndim - 1))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch, mesh: Mesh):
  """Assembles this host's numpy batch into globally sharded arrays (leading axis = batch)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
  )


def sync_processes(name: str) -> None:
  """Waits until every process of a multi-process job reaches this point (a no-op alone)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
