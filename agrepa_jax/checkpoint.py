"""Checkpoints of a run: orbax save/restore of the train state and data position, stopping on
SIGTERM/Ctrl-C, and restoring a trained model for probing, sampling and
evaluation (which therefore never import the trainer)."""

import dataclasses
import logging
import os
import signal

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from agrepa_jax import files, sharding
from agrepa_jax import state as state_lib
from agrepa_jax.model import AgRepaModel
from agrepa_jax.state import TrainState


def checkpoint_manager(workdir: epath.Path, config) -> ocp.CheckpointManager:
  """Keeps the newest `config.keep_checkpoints` (the trainer saves only finite states, so the
  newest checkpoint is always a finite one) and removes checkpoints left half-written by a kill."""
  options = ocp.CheckpointManagerOptions(
    preservation_policy=ocp.checkpoint_managers.LatestN(config.keep_checkpoints),
    cleanup_tmp_directories=True,  # safe: the trainer holds the workdir lock
    enable_async_checkpointing=config.async_checkpointing,
  )
  return ocp.CheckpointManager(checkpoint_directory(workdir), options=options)


def checkpoint_directory(workdir) -> epath.Path:
  """DIR/checkpoints as orbax wants it: absolute when local (Path.absolute would turn gs://b/r
  into a local path)."""
  return files.as_path(epath.Path(workdir) / 'checkpoints')


def data_position(step: int, global_batch_size: int) -> dict:
  """The data position of a checkpoint: global, so any number of hosts can resume from it."""
  return {'step': int(step), 'records_consumed': int(step) * global_batch_size}


def save_checkpoint(manager, step: int, state: TrainState, global_batch_size: int, force=False):
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=ocp.args.JsonSave(data_position(step, global_batch_size)),
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


def preemption_service_running() -> bool:
  """Whether JAX's preemption notifier owns SIGTERM (multi-process runs, jax.distributed)."""
  return jax.distributed.is_initialized() and jax.config.jax_enable_preemption_service


class StopRequest:
  """Stops every process after the same step on SIGTERM (preemption) or Ctrl-C.

  Checked every `check_every` steps, with no host sync in between. Multi-process runs go through
  JAX's preemption sync point (orbax's `reached_preemption`): JAX's notifier receives SIGTERM and
  tells every process, and a Ctrl-C is forwarded to it as SIGTERM. A single process sets a flag.
  Stopping between steps matters: the step donates the train state, so an exception raised inside
  it would leave no valid state to save. A second Ctrl-C interrupts at once, without saving.
  """

  def __init__(self, check_every: int):
    self.check_every = max(1, check_every)
    self.distributed = preemption_service_running()
    self.requested = False
    self._checks = 0  # the sync point protocol needs consecutive ids, the same on every process
    handled = (signal.SIGINT,) if self.distributed else (signal.SIGINT, signal.SIGTERM)
    self._previous = {s: signal.signal(s, self._handle) for s in handled}

  def _handle(self, signum, frame):
    logging.warning(
      '%s received: saving a checkpoint and stopping (a second Ctrl-C exits at once, unsaved)',
      signal.Signals(signum).name,
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if self.distributed:
      os.kill(os.getpid(), signal.SIGTERM)  # to JAX's preemption notifier
    else:
      self.requested = True

  def reached(self, step: int) -> bool:
    """Whether every process stops after `step` (always False between checks)."""
    if step % self.check_every:
      return False
    if not self.distributed:
      return self.requested
    self._checks += 1
    return ocp.multihost.reached_preemption(self._checks)

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
  """Opens the data and restores the model parameters of `step` (default: the latest checkpoint)."""
  from agrepa_jax.data import prepare

  step = checkpoint_step(workdir, step)  # before any data is built or read
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
  restored = ocp.PyTreeCheckpointer().restore(
    directory / str(step) / 'state',
    args=ocp.args.PyTreeRestore(
      item=abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True,
    ),
  )
  model = nnx.merge(graphdef, restored[(wanted - {'frozen'}).pop()], restored['frozen'])
  return TrainedRun(model, int(step), mesh, train_source, heldout_source, meta)
