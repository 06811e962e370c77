"""Checkpoints of a run: orbax save/restore of the train state, data position and config, falling
back past damaged checkpoints; stopping on SIGTERM/Ctrl-C; and restoring a trained model for
probing, sampling and evaluation (which therefore never import the trainer)."""

import dataclasses
import datetime
import logging
import os
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from agrepa_jax import console, files, sharding
from agrepa_jax import state as state_lib
from agrepa_jax import workdir as workdir_lib
from agrepa_jax.model import AgRepaModel
from agrepa_jax.state import TrainState

CONFIG_ITEM = 'config'  # the config a checkpoint belongs to (workdir.config_record), saved with it
DAMAGED_NAME = 'damaged_checkpoints'  # DIR/damaged_checkpoints/<step>-<time>: moved aside, kept


class NoUsableCheckpoint(console.RunError):
  exit_code = 7


def checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
  """Keeps the newest `config.keep_checkpoints` (the trainer saves only finite states, so the
  newest checkpoint is always a finite one) and removes checkpoints left half-written by a kill."""
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_checkpoints),
    cleanup_tmp_directories=True,  # safe: the trainer holds the workdir lock
    enable_async_checkpointing=config.async_checkpointing,
  )
  handlers = {
    'state': ocp.StandardCheckpointHandler(),
    'data': ocp.JsonCheckpointHandler(),
    CONFIG_ITEM: ocp.JsonCheckpointHandler(),
  }  # named, so that a checkpoint's metadata can be read before it is restored
  return ocp.CheckpointManager(
    checkpoint_directory(workdir), options=options, item_handlers=handlers
  )


def checkpoint_directory(workdir) -> epath.Path:
  """DIR/checkpoints as orbax wants it: absolute when local (Path.absolute would turn gs://b/r
  into a local path)."""
  return files.as_path(epath.Path(workdir) / 'checkpoints')


def data_position(step: int, global_batch_size: int) -> dict:
  """The data position of a checkpoint: global, so any number of hosts can resume from it."""
  return {'step': int(step), 'records_consumed': int(step) * global_batch_size}


def save_checkpoint(manager, step: int, state: TrainState, config, force=False):
  """Saves the train state, the data position and the config of the run (the reference a resumed
  run's config is judged against, whatever happens to DIR/config.json)."""
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_position(step, config.batch_size)),
      **{CONFIG_ITEM: ocp.args.JsonSave(workdir_lib.config_record(config))},
    ),
    force=force,
  )


def restore_checkpoint(manager, step: int, abstract: TrainState) -> tuple[TrainState, dict]:
  """The train state and the data position ({'step', 'records_consumed'}) of checkpoint `step`."""
  restored = manager.restore(
    step,
    args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore()),
  )
  return restored['state'], dict(restored['data'])


def saved_config(workdir: epath.Path, step: int) -> dict | None:
  """The config saved with checkpoint `step`; None for one saved before checkpoints carried it."""
  path = checkpoint_directory(workdir) / str(step) / CONFIG_ITEM
  if not path.exists():
    return None
  return dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(path, ocp.args.JsonRestore()))


def newest_saved_config(workdir: epath.Path) -> dict | None:
  """The config saved with the newest checkpoint whose config can be read (an unreadable one is
  damage that restore_newest reports); None without one."""
  for step in reversed(saved_steps(workdir)):
    try:
      return saved_config(workdir, step)
    except Exception:  # damage: restore_newest reports it with the checkpoint's step
      continue
  return None


def leaf_shapes(tree) -> dict[str, tuple]:
  """{'params.backbone.blocks.attn_out.kernel.value': shape, ...}: the same names for a train
  state and for the metadata tree orbax saved of it."""
  name = lambda key: str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
  return {
    '.'.join(map(name, path)): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def check_shapes(manager, step: int, abstract: TrainState):
  """Raises ConfigChanged when checkpoint `step` holds other arrays than `abstract` (a config change
  that no restore can bridge); an unreadable metadata file raises as damage."""
  metadata = manager.item_metadata(step)['state']
  if metadata is None:
    raise FileNotFoundError(f'checkpoint {step}: no metadata of its arrays (state/_METADATA)')
  stored, wanted = leaf_shapes(metadata), leaf_shapes(abstract)
  differ = [
    f'{k}: {stored.get(k, "absent")} saved, {wanted.get(k, "absent")} now'
    for k in sorted(set(stored) | set(wanted), key=lambda k: (not k.startswith('params.'), k))
    if stored.get(k) != wanted.get(k)
  ]
  if differ:
    raise workdir_lib.ConfigChanged(
      f'checkpoint {step} in {manager.directory} holds arrays of other shapes than this config '
      f'builds ({len(differ)} differ; first: {"; ".join(differ[:3])}); --allow_config_change '
      'covers only changes that keep every shape: use a new --workdir or restore the settings'
    )


def any_process(flag: bool) -> bool:
  """Whether `flag` is set on any process (all processes call this together)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def describe(error: BaseException) -> str:
  """One line: the exception's type and the first line of its message, at most 300 characters."""
  lines = str(error).strip().splitlines() or ['']
  return f'{type(error).__name__}: {lines[0][:300]}'


def newest_that_restores(steps, restore) -> tuple[int | None, object, list[tuple[int, str]]]:
  """(step, what `restore(step)` returned) of the first of `steps` that restores on every process,
  and the (step, reason) of each one before it that failed, reported; (None, None, failures) when
  none restores. Any exception but ConfigChanged (other shapes: not damage) counts as damage. All
  processes agree on the step, so that a file one host cannot read does not split the run."""
  failed = []
  for step in steps:
    try:
      restored, error = restore(step), None
    except workdir_lib.ConfigChanged:
      raise
    except Exception as e:  # any failure to read a checkpoint is damage
      restored, error = None, e
    if not any_process(error is not None):
      return step, restored, failed
    failed.append((step, describe(error) if error else 'failed on another process'))
    logging.warning('checkpoint %d cannot be restored: %s', step, failed[-1][1])
    logging.warning('checkpoint %d:', step, exc_info=error, extra={console.FILE_ONLY: True})
  return None, None, failed


def failure_lines(failed: list[tuple[int, str]]) -> str:
  return '\n'.join(f'  step {s}: {reason}' for s, reason in failed)


def move_aside(manager, steps: list[int]):
  """Moves the checkpoints of `steps` to DIR/damaged_checkpoints/<step>-<UTC time> (process 0)."""
  target = manager.directory.parent / DAMAGED_NAME
  stamp = datetime.datetime.now(datetime.UTC).strftime('%Y%m%dT%H%M%S')
  if jax.process_index() == 0:
    target.mkdir(parents=True, exist_ok=True)
    for step in steps:
      (manager.directory / str(step)).rename(target / f'{step}-{stamp}')
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices('damaged checkpoints moved')
  manager.reload()
  logging.warning('moved the checkpoints of steps %s to %s (never deleted)', steps, target)


def restore_newest(manager, abstract: TrainState) -> tuple[TrainState, dict, dict | None]:
  """(train state, data position, saved config) of the newest checkpoint that restores.

  Each checkpoint that fails (a truncated or missing file, unreadable metadata or JSON) is reported
  with its step and the reason; once an older one has restored, the failed ones are moved aside
  (move_aside). Raises ConfigChanged when a checkpoint holds arrays of other shapes, and
  NoUsableCheckpoint when none restores; neither moves anything (the next run must not silently
  start from step 0).
  """

  def restore(step):
    check_shapes(manager, step, abstract)
    state, position = restore_checkpoint(manager, step, abstract)
    return state, position, saved_config(manager.directory.parent, step)

  step, restored, failed = newest_that_restores(sorted(manager.all_steps(), reverse=True), restore)
  if step is None:
    raise NoUsableCheckpoint(
      f'no checkpoint in {manager.directory} can be restored:\n{failure_lines(failed)}\n'
      f'they are left in place; to train this workdir from step 0, move {manager.directory} aside'
    )
  if failed:
    move_aside(manager, [s for s, _ in failed])
  return restored


class StopRequest:
  """Stops every process after the same step on SIGTERM (preemption) or Ctrl-C.

  Checked every `check_every` steps, with no host sync in between. Multi-process runs go through
  JAX's preemption sync point (orbax's `reached_preemption`): JAX's notifier receives SIGTERM and
  tells every process, and a Ctrl-C is forwarded to it as SIGTERM. A single process sets a flag.
  Stopping between steps matters: the step donates the train state, so an exception raised inside
  it would leave no valid state to save. A second Ctrl-C interrupts at once, without saving.
  `preempted` tells a stop for SIGTERM (exit status 6, for a scheduler to requeue) from Ctrl-C.
  """

  def __init__(self, check_every: int):
    self.check_every = max(1, check_every)
    self.distributed = workdir_lib.preemption_service_running()
    self.requested = self.stopped = False
    self.received = None  # the first signal this process received
    self._checks = 0  # the sync point protocol needs consecutive ids, the same on every process
    handled = (signal.SIGINT,) if self.distributed else (signal.SIGINT, signal.SIGTERM)
    self._previous = {s: signal.signal(s, self._handle) for s in handled}

  def _handle(self, signum, frame):
    logging.warning(
      '%s received: saving a checkpoint and stopping (a second Ctrl-C exits at once, unsaved)',
      signal.Signals(signum).name,
    )
    self.received = self.received or signal.Signals(signum)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if self.distributed:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
    else:
      self.requested = True

  def reached(self, step: int) -> bool:
    """Whether every process stops after `step` (always False between checks)."""
    if step % self.check_every:
      return False
    if self.distributed:
      self._checks += 1
      self.stopped = ocp.multihost.reached_preemption(self._checks)
    else:
      self.stopped = self.requested
    return self.stopped

  @property
  def preempted(self) -> bool:
    """Whether the run stopped for SIGTERM (on multi-process runs: for JAX's preemption notice,
    unless this process received the Ctrl-C)."""
    return self.stopped and self.received != signal.SIGINT

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


@dataclasses.dataclass
class TrainedRun:
  """A trained workdir opened for probing, sampling or evaluation."""

  model: AgRepaModel
  step: int
  mesh: jax.sharding.Mesh
  train_source: object
  heldout_source: object
  meta: dict


def saved_steps(workdir: epath.Path) -> list[int]:
  """The steps of the finished checkpoints in `workdir` (none while one is still being written)."""
  directory = checkpoint_directory(workdir)
  return sorted(ocp.utils.checkpoint_steps(directory)) if directory.is_dir() else []


def checkpoint_step(workdir: epath.Path, step: int | None = None) -> int:
  """`step`, or the latest checkpoint's step; a clear error if the workdir has no checkpoint."""
  steps = saved_steps(workdir)
  if not steps:
    raise FileNotFoundError(f'no checkpoint in {workdir / "checkpoints"}: train this workdir first')
  if step is None:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(
      f'no checkpoint of step {step} in {workdir / "checkpoints"} (has {steps})'
    )
  return step


def restore_trained(config, workdir: epath.Path, step: int | None = None) -> TrainedRun:
  """Opens the data and restores the model parameters of `step` (default: the newest checkpoint
  that restores; a damaged newer one is reported with its step and reason, and left in place)."""
  from agrepa_jax.data import prepare

  chosen = checkpoint_step(workdir, step)  # before any data is built or read
  steps = [chosen] if step is not None else sorted(saved_steps(workdir), reverse=True)
  mesh = sharding.make_mesh(config.mesh)
  train_source, heldout_source, meta = prepare.prepare(config)
  teacher_dims = tuple(meta['teacher_dims'][d] for d in config.data.domains)
  tx, _ = state_lib.make_optimizer(config)
  graphdef, shapes, shardings = state_lib.sharded_shapes(config, teacher_dims, tx, mesh)
  directory = checkpoint_directory(workdir)
  # Only the model's variables: the optimizer state (2× the parameters for Adam) stays on disk.
  wanted = {'params' if shapes.ema_params is None else 'ema_params', 'frozen'}
  abstract = {
    k: state_lib.abstract_with_shardings(getattr(shapes, k), getattr(shardings, k)) for k in wanted
  }
  restore = lambda step: ocp.PyTreeCheckpointer().restore(
    directory / str(step) / 'state',
    args=ocp.args.PyTreeRestore(
      item=abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True,
    ),
  )
  restored_step, restored, failed = newest_that_restores(steps, restore)
  if restored_step is None:
    what = (
      f'checkpoint {chosen} in {directory} cannot be restored'
      if step is not None
      else f'no checkpoint in {directory} can be restored'
    )
    raise NoUsableCheckpoint(f'{what}:\n{failure_lines(failed)}')
  model = nnx.merge(graphdef, restored[(wanted - {'frozen'}).pop()], restored['frozen'])
  return TrainedRun(model, int(restored_step), mesh, train_source, heldout_source, meta)
