"""Training: the pure train and eval steps and the loop, read top to bottom (big_vision style).

The train state lives in state.py, the losses in losses.py, checkpoints in checkpoint.py.
"""

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from etils import epath
from flax import nnx

from agrepa_jax import config_checks, console, losses, metrics, selection, sharding
from agrepa_jax import state as state_lib
from agrepa_jax import workdir as workdir_lib
from agrepa_jax.data import spec as data_spec
from agrepa_jax.state import TrainState


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static settings of the train and eval steps."""

  loss: losses.LossConfig
  ema_decay: float = 0.0  # > 0: keep a moving average of the parameters for inference
  sharding_rules: tuple = ()  # mesh.rules: logical axes -> mesh axes, for activation constraints
  frame_shapes: tuple = ()  # stored teacher frames: (domain, F_d, C_d) of the packed batch key

  @classmethod
  def from_config(cls, config, batch_spec=None) -> 'StepConfig':
    frames = batch_spec.frame_shapes if batch_spec is not None else ()
    return cls(
      losses.LossConfig.from_config(config),
      config.optim.ema_decay,
      tuple(config.mesh.rules),
      frames,
    )


def with_stored_targets(batch, step_cfg: StepConfig):
  """The batch with its packed stored teacher frames as per-domain views (data.spec)."""
  if not step_cfg.frame_shapes or 'teacher_frames' not in batch:
    return batch
  frames = data_spec.unpack_frames(batch['teacher_frames'], step_cfg.frame_shapes)
  return {**batch, 'teacher_frames': frames}


def train_step(
  state: TrainState, batch, teacher_params=None, *, graphdef, tx, schedule, step_cfg, online=None
):
  """One optimization step. `state.lambdas` is an array input: new values never recompile.

  online (teachers.online): the frozen teachers (parameters `teacher_params`, never trained) first
  give the batch's targets from its audio (teachers/online.py).
  """
  batch = with_stored_targets(batch, step_cfg)
  if online is not None:
    batch = {**batch, **online.targets(teacher_params, batch)}
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen)
    parts = losses.compute_losses(model, batch, state.lambdas, key, step_cfg.loss, train=True)
    return parts['loss'], parts

  grads, parts = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = optax.incremental_update(params, ema_params, 1.0 - step_cfg.ema_decay)
  parts.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
  )
  return new_state, parts


def eval_step(
  state: TrainState, batch, key, teacher_params=None, *, graphdef, step_cfg, online=None
):
  """Held-out losses, dropout off, a fixed key: every evaluation draws the same t and noise."""
  batch = with_stored_targets(batch, step_cfg)
  if online is not None:  # held-out batches are in store order: every teacher sees every row
    batch = {**batch, **online.targets(teacher_params, batch, by_layout=False)}
  model = nnx.merge(graphdef, state.inference_params(), state.frozen)
  return losses.compute_losses(model, batch, state.lambdas, key, step_cfg.loss, train=False)


def jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh, online=None):
  """step(state, batch) -> (state, metrics); with `online` teachers step(state, batch, teacher
  params), the parameters replicated on the mesh."""
  step = functools.partial(
    train_step, graphdef=graphdef, tx=tx, schedule=schedule, step_cfg=step_cfg, online=online
  )
  teachers = () if online is None else (sharding.replicated(mesh),)
  return jax.jit(
    sharding.traced_with_rules(step, mesh, step_cfg.sharding_rules),
    in_shardings=(shardings, sharding.batch_sharding(mesh), *teachers),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
    compiler_options=step_compiler_options(mesh),
  )


def step_compiler_options(mesh) -> dict | None:
  """On CPU, XLA's memory-optimized scheduler. The default one starts independent work early to
  keep the cores busy, which for a train step means the backward pass's recomputations (the
  model's jax.checkpoint'ed parts, the attention's dropout mask) run as soon as the forward pass
  ends, and every layer's recomputed arrays are alive at once."""
  if mesh.devices.flat[0].platform != 'cpu':
    return None
  return {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}


def jit_eval_step(graphdef, step_cfg, shardings, mesh, online=None):
  step = functools.partial(eval_step, graphdef=graphdef, step_cfg=step_cfg, online=online)
  teachers = () if online is None else (sharding.replicated(mesh),)
  return jax.jit(
    sharding.traced_with_rules(step, mesh, step_cfg.sharding_rules),
    in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh), *teachers),
    out_shardings=sharding.replicated(mesh),
  )


def online_teachers(config, spec, mesh):
  """(OnlineTeachers, (teacher parameters on the mesh,)) with teachers.online, else (None, ())."""
  if not config.teachers.online:
    return None, ()
  from agrepa_jax.data import prepare
  from agrepa_jax.teachers import online as online_lib

  online, params = online_lib.online_teachers(config, spec, prepare.load_teachers(config))
  online.check_batch(config.batch_size, mesh)
  return online, (online_lib.replicate(params, mesh),)


class NonFiniteTraining(console.RunError):
  exit_code = 5


def track_nonfinite(first_bad, step, loss, grad_norm):
  """The first step whose loss or gradient norm was not finite (0: none yet); stays on device."""
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  return jnp.where((first_bad == 0) & ~finite, step, first_bad)


def check_finite(first_bad: int, step: int, manager):
  """Raises NonFiniteTraining, naming the steps lost and the checkpoint to go back to."""
  if not first_bad:
    return
  latest = manager.latest_step()
  last_good = (
    f'step {latest} in {manager.directory}' if latest is not None else 'none (nothing was saved)'
  )
  lost = f'steps {first_bad}-{step} were' if step > first_bad else f'step {step} was'
  raise NonFiniteTraining(
    f'non-finite loss or gradients from step {first_bad} (found after step {step}); {lost} not '
    f'saved. Last good checkpoint: {last_good}. '
    'Lower optim.learning_rate or raise optim.grad_clip, then rerun to resume from it.'
  )


def train_and_evaluate(config, workdir: epath.Path, allow_config_change: bool = False):
  """Trains (or resumes) the run in `workdir`; returns the final train state.

  Holds `workdir` for the run (workdir.WorkdirLocked if another run holds it), checks the config
  against the one stored with its checkpoints (workdir.ConfigChanged, unless
  `allow_config_change`), and stops with NonFiniteTraining when the loss or gradients stop being
  finite, saving nothing after the last finite checkpoint. A stop for SIGTERM raises
  console.Preempted once its checkpoint is saved.
  """
  config_checks.check(config)
  workdir.mkdir(parents=True, exist_ok=True)
  with workdir_lib.exclusive(workdir) as signals:
    return _train_and_evaluate(config, workdir, allow_config_change, signals)


def _train_and_evaluate(
  config, workdir: epath.Path, allow_config_change: bool, signals: workdir_lib.SignalsRaise
) -> TrainState:
  # Imported here, so that a process that only runs the steps (aot, bench) does not hold orbax
  # (24 MB resident) or the data pipeline.
  from agrepa_jax import checkpoint
  from agrepa_jax.data import pipeline, prepare

  # Nothing is written to the workdir until the checkpoint is restored and every check passed.
  resumes = bool(checkpoint.saved_steps(workdir))
  checked = checkpoint.newest_saved_config(workdir)
  changes = workdir_lib.check_config(config, workdir, checked, resumes, allow_config_change)

  # ----- Mesh and data -----
  mesh = sharding.make_mesh(config.mesh)
  train_source, heldout_source, meta = prepare.prepare(config)
  signals.raise_received()
  domains = tuple(config.data.domains)
  teacher_dims = tuple(meta['teacher_dims'][d] for d in domains)
  eval_batches = pipeline.evaluation_batches(heldout_source, config.batch_size, config.eval_batches)
  if config.eval_every and not eval_batches:
    logging.warning(
      'no held-out clips: held-out evaluation is off (data.heldout_fraction=%s)',
      config.data.heldout_fraction,
    )

  # ----- Model, optimizer and the jitted steps -----
  tx, schedule = state_lib.make_optimizer(config)
  step_cfg = StepConfig.from_config(config, train_source.spec)
  graphdef, shapes, shardings = state_lib.sharded_shapes(config, teacher_dims, tx, mesh)
  online, teacher_params = online_teachers(config, train_source.spec, mesh)
  train_step_fn = jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh, online)
  eval_step_fn = jit_eval_step(graphdef, step_cfg, shardings, mesh, online)
  console.log_start_summary(config, meta, mesh, shapes)

  # ----- Initialize, or resume from the last checkpoint -----
  manager = checkpoint.checkpoint_manager(workdir, config)
  records_consumed = 0
  if manager.latest_step() is None:
    state = state_lib.initialize(config, teacher_dims, tx, shardings)
  else:
    abstract = state_lib.abstract_with_shardings(shapes, shardings)
    state, position, saved = checkpoint.restore_newest(manager, abstract)
    if saved != checked:  # fell back to an older checkpoint, of another config
      changes = workdir_lib.check_config(config, workdir, saved, resumes, allow_config_change)
    records_consumed = position['records_consumed']
    logging.info('resumed from step %d', int(state.step))
    if not selection.measures_online(config):  # fixed λ follow the config, not the checkpoint
      lambdas = selection.lambdas_from_config(config)
      state = state.replace(lambdas=jax.device_put(lambdas, sharding.replicated(mesh)))
  signals.raise_received()
  workdir_lib.record_config(config, workdir, changes, resumes)
  data_iterator = iter(
    pipeline.training_dataset(
      train_source,
      config.batch_size,
      config.data.order_seed if config.data.order_seed >= 0 else config.data.seed,
      tuple(config.data.domain_weights),
      start_step=records_consumed // config.batch_size,
      crop=config.data.crop,
      num_workers=config.data.num_workers,
    )
  )
  online_fog_a = None
  if selection.probes_during_training(config):
    from agrepa_jax.probe import online as online_probe

    online_fog_a = online_probe.OnlineFogA(config, heldout_source)

  # ----- The loop -----
  start_step = int(state.step)
  writer = metrics.MetricWriter(workdir, after_step=start_step)
  signals.raise_received()
  stop = checkpoint.StopRequest(config.stop_check_every)
  progress = tqdm.tqdm(
    total=config.num_steps,
    initial=start_step,
    desc='train',
    unit='step',
    disable=jax.process_index() != 0,
    dynamic_ncols=True,
  )
  eval_key = jax.random.key_data(jax.random.key(config.seed + 2))
  track = jax.jit(track_nonfinite)
  first_bad = jax.device_put(np.int32(0), sharding.replicated(mesh))

  def evaluate():
    parts = [
      jax.device_get(eval_step_fn(state, sharding.global_batch(b, mesh), eval_key, *teacher_params))
      for b in eval_batches
    ]
    return {f'eval_{k}': float(np.mean([p[k] for p in parts])) for k in ('loss', 'loss_fm')}

  def save_final():
    if state.step.is_deleted():  # an error inside the donated step: no consistent state to save
      logging.error(
        'the train state was lost inside a step; the run resumes from step %s',
        manager.latest_step(),
      )
    elif int(first_bad):
      logging.error('the train state is not finite: not saved')
    elif manager.latest_step() != int(state.step):
      checkpoint.save_checkpoint(manager, int(state.step), state, config, force=True)

  last_log, last_step, step = time.perf_counter(), start_step, start_step
  try:
    for step in range(start_step + 1, config.num_steps + 1):
      batch = sharding.global_batch(next(data_iterator), mesh)
      state, parts = train_step_fn(state, batch, *teacher_params)
      first_bad = track(first_bad, state.step, parts['loss'], parts['grad_norm'])
      progress.update(1)
      if online_fog_a and step % config.repa.probe_every == 0:
        state = online_fog_a.reselect(state, graphdef, mesh)
        if jax.process_index() == 0:
          online_fog_a.write_latest(workdir / selection.ONLINE_SELECTION)
      is_last = step == config.num_steps
      evaluates = eval_batches and config.eval_every and (step % config.eval_every == 0 or is_last)
      if evaluates or step % config.log_every == 0 or is_last:
        scalars, bad = jax.device_get((parts, first_bad))
        now = time.perf_counter()
        scalars['steps_per_sec'] = (step - last_step) / (now - last_log)
        scalars.update(selection.lambda_scalars(jax.device_get(state.lambdas), domains))
        last_log, last_step = now, step
        progress.set_postfix(
          loss=f'{scalars["loss"]:.4f}',
          fm=f'{scalars["loss_fm"]:.4f}',
          steps_per_s=f'{scalars["steps_per_sec"]:.2f}',
        )
        if evaluates and not bad:
          scalars.update(evaluate())
          last_log = time.perf_counter()  # throughput counts training steps only
          console.log_evaluation(step, scalars)
        writer.write(step, scalars)
        check_finite(int(bad), step, manager)
      if step % config.checkpoint_every == 0:
        check_finite(int(first_bad), step, manager)
        checkpoint.save_checkpoint(manager, step, state, config)
      if stop.reached(step):
        logging.info('stopping after step %d', step)
        break
    check_finite(int(first_bad), step, manager)
  except KeyboardInterrupt:
    logging.warning('interrupted: not saved; the run resumes from step %s', manager.latest_step())
    raise
  except NonFiniteTraining:
    raise
  except Exception:
    save_final()
    raise
  else:
    save_final()
  finally:
    progress.close()
    stop.restore()
    manager.wait_until_finished()
    manager.close()
    writer.close()

  if stop.preempted:
    raise console.Preempted(
      f'stopped by SIGTERM after saving step {step}: the same command resumes from it'
    )

  # ----- Figures -----
  if jax.process_index() == 0:
    metrics.plot_loss_curves(workdir / 'metrics.jsonl', workdir / 'loss_curves.png')
  return state
