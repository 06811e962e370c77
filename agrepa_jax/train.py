"""Training: the train state, the pure step functions, and the loop (big_vision style, linear)."""

import dataclasses
import functools
import json
import logging
import pathlib
import signal
import time

import flax
import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm
from flax import nnx

from agrepa_jax import audio, losses, metrics, selection, sharding
from agrepa_jax.model import AgRepaModel, ModelConfig


class Frozen(nnx.Variable):
  """A model variable the optimizer never touches (the reference-quirk token projection)."""


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming reproduces every draw
  lambdas: (
    jax.Array
  )  # (L, domains) alignment weights in force: an input of the step, never a constant
  scores: (
    jax.Array
  )  # (L, domains) moving average of FoG-A scores re-measured in training (else zeros)
  ema_params: nnx.State | None  # moving average of params (optim.ema_decay > 0), else None

  def inference_params(self) -> nnx.State:
    """The parameters that evaluation, probing and sampling use: the moving average when kept."""
    return self.params if self.ema_params is None else self.ema_params


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """The static settings of the train and eval steps."""

  flow: losses.FlowMatchingConfig
  bitc_weights: tuple[float, ...] | None  # None: no BiT-C loss
  hidden: str  # 'none' (no REPA), 'pooled' (utterance), 'frames' (frame granularity)
  domains: tuple[str, ...]  # order of the λ columns and heads; batches key teacher targets by name
  ema_decay: float = (
    0.0  # > 0: keep a moving average of the parameters for evaluation and inference
  )

  @classmethod
  def from_config(cls, config) -> 'StepConfig':
    flow_fields = {f.name for f in dataclasses.fields(losses.FlowMatchingConfig)}
    flow = losses.FlowMatchingConfig(**{k: v for k, v in config.flow.items() if k in flow_fields})
    bitc = (
      tuple(config.bitc.weights[d] for d in config.data.domains) if config.bitc.enabled else None
    )
    if config.repa.selection == 'none':
      hidden = 'none'
    elif config.repa.granularity == 'frame' and not config.data.teacher_frames:
      raise ValueError(
        "repa.granularity='frame' needs teacher frame features: set data.teacher_frames=True"
      )
    elif config.repa.granularity in ('utterance', 'frame'):
      hidden = {'utterance': 'pooled', 'frame': 'frames'}[config.repa.granularity]
    else:
      raise ValueError(
        f"repa.granularity={config.repa.granularity!r}: expected 'utterance' or 'frame'"
      )
    return cls(flow, bitc, hidden, tuple(config.data.domains), config.optim.ema_decay)


def make_model(config, teacher_dims: tuple[int, ...], seed) -> AgRepaModel:
  if config.model.n_mels != audio.N_MELS:
    raise ValueError(
      f'model.n_mels={config.model.n_mels}: the target representation has {audio.N_MELS} mel bands'
    )
  cfg = ModelConfig.from_config({**config.model, 'num_domains': len(config.data.domains)})
  model = AgRepaModel(cfg, teacher_dims, nnx.Rngs(params=jax.random.key(seed)))
  if cfg.frozen_token_projection:
    projection = model.backbone.token_encoder.domain_projection
    model.backbone.token_encoder.domain_projection = Frozen(projection[...])
  return model


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping and a one-cycle (or constant) learning-rate schedule."""
  opt = config.optim
  total = opt.schedule_steps if opt.schedule_steps > 0 else config.num_steps
  if opt.schedule == 'onecycle':
    schedule = optax.cosine_onecycle_schedule(
      total, opt.learning_rate, opt.pct_start, opt.div_factor, opt.final_div_factor
    )
  elif opt.schedule == 'constant':
    schedule = optax.constant_schedule(opt.learning_rate)
  else:
    raise ValueError(f"optim.schedule={opt.schedule!r}: expected 'onecycle' or 'constant'")
  tx = optax.chain(
    optax.clip_by_global_norm(opt.grad_clip),
    optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay),
  )
  return tx, schedule


def init_state(config, teacher_dims, tx, seed) -> tuple[nnx.GraphDef, TrainState]:
  model = make_model(config, teacher_dims, seed)
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  lambdas = jnp.asarray(selection.lambdas_from_config(config))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    frozen=frozen,
    opt_state=tx.init(params),
    rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 1)),
    lambdas=lambdas,
    scores=jnp.zeros_like(lambdas),
    ema_params=jax.tree.map(jnp.copy, params) if config.optim.ema_decay > 0 else None,
  )
  return graphdef, state


def abstract_state(config, teacher_dims, tx):
  """(graphdef, TrainState of ShapeDtypeStructs) without allocating any parameter."""
  graphdef = None

  def init(seed):
    nonlocal graphdef
    graphdef, state = init_state(config, teacher_dims, tx, seed)
    return state

  shapes = jax.eval_shape(init, 0)
  return graphdef, shapes


def sharded_init(config, teacher_dims, tx, mesh):
  """Initializes the train state directly into its shardings (no host-side full copy)."""
  graphdef, shapes, shardings = sharded_shapes(config, teacher_dims, tx, mesh)
  return graphdef, initialize(config, teacher_dims, tx, shardings), shardings


def sharded_shapes(config, teacher_dims, tx, mesh):
  """(graphdef, abstract train state, its shardings) on `mesh`."""
  graphdef, shapes = abstract_state(config, teacher_dims, tx)
  return graphdef, shapes, state_shardings(shapes, mesh, config.mesh.fsdp_min_size)


def initialize(config, teacher_dims, tx, shardings) -> TrainState:
  init = jax.jit(
    lambda seed: init_state(config, teacher_dims, tx, seed)[1],
    static_argnums=0,
    out_shardings=shardings,
  )
  return init(config.seed)


def state_shardings(shapes: TrainState, mesh, min_size: int):
  tree = functools.partial(sharding.tree_shardings, mesh=mesh, min_size=min_size)
  return shapes.replace(
    step=sharding.replicated(mesh),
    rng=sharding.replicated(mesh),
    lambdas=sharding.replicated(mesh),
    scores=sharding.replicated(mesh),
    params=tree(shapes.params),
    frozen=tree(shapes.frozen),
    opt_state=tree(shapes.opt_state),
    ema_params=tree(shapes.ema_params),
  )


def compute_losses(model: AgRepaModel, batch, lambdas, key, step_cfg: StepConfig, train: bool):
  """All losses of one batch. `key` draws t, noise, prompts, CFG drops (and dropout if training)."""
  mel = batch['mel']
  batch_size, num_frames, _ = mel.shape
  valid = losses.frame_mask(batch['num_samples'], num_frames, audio.HOP_LENGTH)
  sample_key, dropout_key = jax.random.split(key)
  inputs = losses.flow_matching_inputs(sample_key, mel, valid.sum(1), step_cfg.flow)
  velocity, extras = model.backbone(
    inputs['x_t'],
    inputs['t'],
    batch['tokens'],
    inputs['ref_mel'],
    batch['domain'],
    token_keep=inputs['token_keep'],
    dropout_key=dropout_key if train else None,
    hidden=step_cfg.hidden,
  )
  out = {'loss_fm': losses.flow_matching_loss(velocity, inputs['u'], inputs['loss_weights'])}
  teacher = tuple(batch['teacher'][d] for d in step_cfg.domains)
  out['loss_bitc'] = (
    losses.bitc_loss(
      model.bitc_heads, extras['token_embedding'], teacher, batch['domain'], step_cfg.bitc_weights
    )
    if step_cfg.bitc_weights
    else jnp.zeros(())
  )
  if step_cfg.hidden == 'none':
    out['loss_repa'] = jnp.zeros(())
  else:
    targets = (
      tuple(batch['teacher_frames'][d] for d in step_cfg.domains)
      if step_cfg.hidden == 'frames'
      else teacher
    )
    out['loss_repa'] = losses.repa_loss(
      model.repa_heads, extras['hidden'], targets, batch['domain'], lambdas, valid
    )
  out['loss'] = out['loss_fm'] + out['loss_bitc'] + out['loss_repa']
  return out


def train_step(state: TrainState, batch, *, graphdef, tx, schedule, step_cfg: StepConfig):
  """One optimization step. `state.lambdas` is an array input: new values never recompile."""
  key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

  def loss_fn(params):
    model = nnx.merge(graphdef, params, state.frozen)
    parts = compute_losses(model, batch, state.lambdas, key, step_cfg, train=True)
    return parts['loss'], parts

  grads, parts = jax.grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema_params = state.ema_params
  if ema_params is not None:
    ema_params = optax.incremental_update(params, ema_params, 1.0 - step_cfg.ema_decay)
  parts.update(grad_norm=optax.tree.norm(grads), lr=schedule(state.step))
  return state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema_params
  ), parts


def eval_step(state: TrainState, batch, key, *, graphdef, step_cfg: StepConfig):
  """Held-out losses with dropout off and a fixed key, so every evaluation draws the same t and noise."""
  model = nnx.merge(graphdef, state.inference_params(), state.frozen)
  return compute_losses(model, batch, state.lambdas, key, step_cfg, train=False)


def jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh):
  step = functools.partial(
    train_step, graphdef=graphdef, tx=tx, schedule=schedule, step_cfg=step_cfg
  )
  return jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharding(mesh)),
    out_shardings=(shardings, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def jit_eval_step(graphdef, step_cfg, shardings, mesh):
  step = functools.partial(eval_step, graphdef=graphdef, step_cfg=step_cfg)
  return jax.jit(
    step,
    in_shardings=(shardings, sharding.batch_sharding(mesh), sharding.replicated(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def checkpoint_manager(workdir: pathlib.Path, config, create: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
    max_to_keep=config.keep_checkpoints,
    create=create,
    enable_async_checkpointing=config.async_checkpointing,
  )
  # orbax needs an absolute path
  return ocp.CheckpointManager((workdir / 'checkpoints').absolute(), options=options)


def save_checkpoint(manager, step: int, state: TrainState, data_iterator, force=False):
  manager.save(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
    ),
    force=force,
  )


def restore_checkpoint(manager, step: int, abstract: TrainState, data_iterator) -> TrainState:
  restored = manager.restore(
    step,
    args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract),
      data=grain.checkpoint.CheckpointRestore(data_iterator),
    ),
  )
  return restored['state']


def abstract_with_shardings(shapes, shardings):
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


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


def train_and_evaluate(config, workdir: pathlib.Path):
  """Trains (or resumes) the run in `workdir`; returns the final train state."""
  from agrepa_jax.data import pipeline, prepare

  workdir.mkdir(parents=True, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  train_source, heldout_source, meta = prepare.prepare(config)
  domains = tuple(config.data.domains)
  teacher_dims = tuple(meta['teacher_dims'][d] for d in domains)
  logging.info(
    'data: %s clips in %s; mesh %s', meta['num_clips'], meta['directory'], dict(mesh.shape)
  )

  tx, schedule = make_optimizer(config)
  step_cfg = StepConfig.from_config(config)
  graphdef, shapes, shardings = sharded_shapes(config, teacher_dims, tx, mesh)
  train_step_fn = jit_train_step(graphdef, tx, schedule, step_cfg, shardings, mesh)
  eval_step_fn = jit_eval_step(graphdef, step_cfg, shardings, mesh)

  data_iterator = iter(
    pipeline.training_dataset(
      train_source, config.batch_size, config.data.seed, tuple(config.data.domain_weights)
    )
  )
  eval_batches = pipeline.evaluation_batches(heldout_source, config.batch_size, config.eval_batches)
  if config.eval_every and not eval_batches:
    logging.warning(
      'no held-out clips: held-out evaluation is off (data.heldout_fraction=%s)',
      config.data.heldout_fraction,
    )
  manager = checkpoint_manager(workdir, config)
  if manager.latest_step() is None:
    state = initialize(config, teacher_dims, tx, shardings)
  else:
    state = restore_checkpoint(
      manager, manager.latest_step(), abstract_with_shardings(shapes, shardings), data_iterator
    )
    logging.info('resumed from step %d', int(state.step))
    if not selection.measures_online(config):  # fixed λ follow the config, not the checkpoint
      state = state.replace(
        lambdas=jax.device_put(selection.lambdas_from_config(config), sharding.replicated(mesh))
      )
  online_fog_a = (
    selection.OnlineFogA(config, heldout_source) if selection.measures_online(config) else None
  )
  start_step = int(state.step)
  writer = metrics.MetricWriter(workdir, after_step=start_step)
  stop = StopRequest()
  progress = tqdm.tqdm(
    total=config.num_steps,
    initial=start_step,
    desc='train',
    unit='step',
    disable=jax.process_index() != 0,
    dynamic_ncols=True,
  )
  eval_key = jax.random.key_data(jax.random.key(config.seed + 2))

  def evaluate():
    parts = [
      jax.device_get(eval_step_fn(state, sharding.global_batch(b, mesh), eval_key))
      for b in eval_batches
    ]
    return {f'eval_{k}': float(np.mean([p[k] for p in parts])) for k in ('loss', 'loss_fm')}

  last_log, last_step, step = time.perf_counter(), start_step, start_step
  try:
    for step in range(start_step + 1, config.num_steps + 1):
      state, parts = train_step_fn(state, sharding.global_batch(next(data_iterator), mesh))
      progress.update(1)
      if online_fog_a and step % config.repa.probe_every == 0:
        state = reselect_layers(state, online_fog_a, graphdef, mesh)
      evaluates = (
        eval_batches
        and config.eval_every
        and (step % config.eval_every == 0 or step == config.num_steps)
      )
      if evaluates or step % config.log_every == 0 or step == config.num_steps:
        scalars = jax.device_get(parts)
        now = time.perf_counter()
        scalars['steps_per_sec'] = (step - last_step) / (now - last_log)
        scalars.update(selection.lambda_scalars(jax.device_get(state.lambdas), config.data.domains))
        last_log, last_step = now, step
        progress.set_postfix(
          loss=f'{scalars["loss"]:.4f}',
          fm=f'{scalars["loss_fm"]:.4f}',
          steps_per_s=f'{scalars["steps_per_sec"]:.2f}',
        )
        if evaluates:
          scalars.update(evaluate())
          last_log = time.perf_counter()  # throughput counts training steps only
        writer.write(step, scalars)
      if step % config.checkpoint_every == 0:
        save_checkpoint(manager, step, state, data_iterator)
      if stop.agreed() or manager.reached_preemption(step):
        break
  finally:
    progress.close()
    stop.restore()
    if state.step.is_deleted():  # an error inside the donated step: no consistent state to save
      logging.error(
        'the train state was lost inside a step; the run resumes from step %s',
        manager.latest_step(),
      )
    elif manager.latest_step() != int(state.step):
      save_checkpoint(manager, int(state.step), state, data_iterator, force=True)
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if jax.process_index() == 0:
    metrics.plot_loss_curves(workdir / 'metrics.jsonl', workdir / 'loss_curves.png')
  return state


def reselect_layers(state: TrainState, online_fog_a, graphdef, mesh) -> TrainState:
  """Measures FoG-A on the current model and puts the new λ and score average into the state."""
  model = nnx.merge(graphdef, state.params, state.frozen)
  scores = online_fog_a.measure(model.backbone, int(state.step), mesh)
  previous = np.asarray(jax.device_get(state.scores))
  lambdas, averaged = online_fog_a.update(scores, previous if previous.any() else None)
  put = lambda x: jax.device_put(np.asarray(x, np.float32), sharding.replicated(mesh))
  return state.replace(lambdas=put(lambdas), scores=put(averaged))


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


def restore_trained(config, workdir: pathlib.Path, step: int | None = None) -> TrainedRun:
  """Opens the data and restores the model parameters of `step` (default: the latest checkpoint)."""
  from agrepa_jax.data import prepare

  mesh = sharding.make_mesh(config.mesh)
  train_source, heldout_source, meta = prepare.prepare(config)
  teacher_dims = tuple(meta['teacher_dims'][d] for d in config.data.domains)
  tx, _ = make_optimizer(config)
  graphdef, shapes, shardings = sharded_shapes(config, teacher_dims, tx, mesh)
  if not (workdir / 'checkpoints').is_dir():
    raise FileNotFoundError(f'no checkpoint in {workdir / "checkpoints"}: train this workdir first')
  manager = checkpoint_manager(workdir, config, create=False)
  step = manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {workdir / "checkpoints"}: train this workdir first')
  manager.close()
  # Only the model's variables: the optimizer state (2× the parameters for Adam) stays on disk.
  wanted = {'params' if shapes.ema_params is None else 'ema_params', 'frozen'}
  abstract = {k: abstract_with_shardings(getattr(shapes, k), getattr(shardings, k)) for k in wanted}
  restored = ocp.PyTreeCheckpointer().restore(
    manager.directory / str(step) / 'state',
    args=ocp.args.PyTreeRestore(
      item=abstract,
      restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=True,
    ),
  )
  model = nnx.merge(graphdef, restored[(wanted - {'frozen'}).pop()], restored['frozen'])
  return TrainedRun(model, int(step), mesh, train_source, heldout_source, meta)
