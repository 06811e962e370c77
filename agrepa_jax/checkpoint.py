"""Checkpoints of a run: orbax save/restore of the train state and data position, the run's
config record, stopping on SIGTERM/Ctrl-C, and restoring a trained model for probing, sampling and
evaluation (which therefore never import the trainer)."""

import dataclasses
import json
import logging
import pathlib
import signal

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from agrepa_jax import sharding
from agrepa_jax import state as state_lib
from agrepa_jax.model import AgRepaModel
from agrepa_jax.state import TrainState


def checkpoint_manager(workdir: pathlib.Path, config, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints,
    create=create,
    enable_async_checkpointing=config.async_checkpointing,
  )
  # orbax needs an absolute path
  return ocp.CheckpointManager((workdir / 'checkpoints').absolute(), options=options)


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


class StopRequest:
  """Turns SIGTERM (preemption) and a first Ctrl-C into a flag the loop checks between steps.

  Stopping between steps matters: the step donates the train state, so an exception raised
  inside it would leave no valid state to save. A second Ctrl-C interrupts at once.
  """

  def __init__(self):
    self.requested = False
    self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

  def _handle(self, signum, frame):
    logging.warning('%s received: saving a checkpoint after this step', signal.Signals(signum).name)
    self.requested = True
    signal.signal(signal.SIGINT, signal.default_int_handler)

  def agreed(self) -> bool:
    """Whether any process was asked to stop: every process then stops after the same step."""
    if jax.process_count() == 1:
      return self.requested
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.int32(self.requested)).any())

  def restore(self):
    for s, handler in self._previous.items():
      signal.signal(s, handler)


def write_config(config, workdir: pathlib.Path):
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'config.json').write_text(json.dumps(config.to_dict(), indent=2, default=str))


@dataclasses.dataclass
class TrainedRun:
  """A trained workdir opened for probing, sampling or evaluation."""

  model: AgRepaModel
  step: int
  mesh: jax.sharding.Mesh
  train_source: object
  heldout_source: object
  meta: dict


def checkpoint_step(workdir: pathlib.Path, config, step: int | None = None) -> int:
  """`step`, or the latest checkpoint's step; a clear error if the workdir has no checkpoint."""
  missing = FileNotFoundError(
    f'no checkpoint in {workdir / "checkpoints"}: train this workdir first'
  )
  if not (workdir / 'checkpoints').is_dir():
    raise missing
  manager = checkpoint_manager(workdir, config, create=False)
  steps = manager.all_steps()
  manager.close()
  if step is None:
    if not steps:
      raise missing
    return max(steps)
  if step not in steps:
    raise FileNotFoundError(
      f'no checkpoint of step {step} in {workdir / "checkpoints"} (has {sorted(steps)})'
    )
  return step


def restore_trained(config, workdir: pathlib.Path, step: int | None = None) -> TrainedRun:
  """Opens the data and restores the model parameters of `step` (default: the latest checkpoint)."""
  from agrepa_jax.data import prepare

  step = checkpoint_step(workdir, config, step)  # before any data is built or read
  mesh = sharding.make_mesh(config.mesh)
  train_source, heldout_source, meta = prepare.prepare(config)
  teacher_dims = tuple(meta['teacher_dims'][d] for d in config.data.domains)
  tx, _ = state_lib.make_optimizer(config)
  graphdef, shapes, shardings = state_lib.sharded_shapes(config, teacher_dims, tx, mesh)
  directory = (workdir / 'checkpoints').absolute()
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
