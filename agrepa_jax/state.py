"""The train state: parameters, optimizer state, step, RNG and λ, built directly into its shardings.

Everything that reads or writes a checkpoint (training, probing, sampling, evaluation) builds the
same abstract state from the config with `sharded_shapes`, so no inference path imports the trainer.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from agrepa_jax import audio, selection, sharding
from agrepa_jax.model import AgRepaModel, ModelConfig, count_params


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State
  frozen: nnx.State
  opt_state: optax.OptState
  rng: jax.Array  # base key; step s uses fold_in(rng, s), so resuming reproduces every draw
  # (L, domains) alignment weights in force: an input of the step, never a constant
  lambdas: jax.Array
  # (L, domains) moving average of FoG-A scores re-measured in training (else zeros)
  scores: jax.Array
  ema_params: nnx.State | None  # moving average of params (optim.ema_decay > 0), else None

  def inference_params(self) -> nnx.State:
    """The parameters that evaluation, probing and sampling use: the moving average when kept."""
    return self.params if self.ema_params is None else self.ema_params


def make_model(config, teacher_dims: tuple[int, ...], seed) -> AgRepaModel:
  if config.model.n_mels != audio.N_MELS:
    raise ValueError(
      f'model.n_mels={config.model.n_mels}: the target representation has {audio.N_MELS} mel bands'
    )
  cfg = ModelConfig.from_config(
    {**config.model, 'num_domains': len(config.data.domains), 'bitc_form': config.bitc.form}
  )
  return AgRepaModel(
    cfg, teacher_dims, nnx.Rngs(params=jax.random.key(seed)), selection.repa_head_layers(config)
  )


def one_cycle(step, total_steps: int, pct_start: float, start: float, peak: float, end: float):
  """PyTorch OneCycleLR's two cosine phases at `step` (0-based): `start` -> `peak` over steps
  [0, pct_start·total − 1], then `peak` -> `end` at step total − 1 (later steps stay there)."""
  warmup_end = float(pct_start * total_steps) - 1.0
  step = jnp.clip(jnp.asarray(step, jnp.float32), 0.0, total_steps - 1.0)
  warming = step <= warmup_end
  phase_start = jnp.where(warming, 0.0, warmup_end)
  phase_end = jnp.where(warming, warmup_end, total_steps - 1.0)
  fraction = (step - phase_start) / jnp.maximum(phase_end - phase_start, 1e-6)
  high, low = jnp.where(warming, start, peak), jnp.where(warming, peak, end)
  return low + (high - low) / 2 * (jnp.cos(jnp.pi * fraction) + 1)


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping and a one-cycle (or constant) learning-rate schedule.

  The one-cycle schedule is PyTorch's OneCycleLR (cosine annealing), the official code's; with
  optim.cycle_momentum, β1 follows it the other way (max_momentum -> base_momentum -> back), as
  OneCycleLR does by default.
  """
  opt = config.optim
  total = opt.schedule_steps if opt.schedule_steps > 0 else config.num_steps
  initial = opt.learning_rate / opt.div_factor
  if opt.schedule == 'onecycle':
    schedule = lambda step: one_cycle(
      step, total, opt.pct_start, initial, opt.learning_rate, initial / opt.final_div_factor
    )
  elif opt.schedule == 'constant':
    schedule = optax.constant_schedule(opt.learning_rate)
  else:
    raise ValueError(f"optim.schedule={opt.schedule!r}: expected 'onecycle' or 'constant'")
  adamw = functools.partial(optax.adamw, b2=opt.b2, weight_decay=opt.weight_decay)
  if opt.cycle_momentum:
    if opt.schedule != 'onecycle':
      raise ValueError("optim.cycle_momentum needs optim.schedule='onecycle'")
    b1 = lambda step: one_cycle(
      step, total, opt.pct_start, opt.max_momentum, opt.base_momentum, opt.max_momentum
    )
    optimizer = optax.inject_hyperparams(adamw)(learning_rate=schedule, b1=b1)
  else:
    optimizer = adamw(schedule, b1=opt.b1)
  return optax.chain(optax.clip_by_global_norm(opt.grad_clip), optimizer), schedule


def init_state(config, teacher_dims, tx, seed) -> tuple[nnx.GraphDef, TrainState]:
  model = make_model(config, teacher_dims, seed)
  return model_state(config, model, tx, jax.random.fold_in(jax.random.key(seed), 1))


def model_state(config, model, tx, key) -> tuple[nnx.GraphDef, TrainState]:
  """(graphdef, the step-0 train state of `model`); `key` seeds the steps' random draws."""
  graphdef, params, frozen = nnx.split(model, nnx.Param, ...)
  lambdas = jnp.asarray(selection.lambdas_from_config(config))
  state = TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    frozen=frozen,
    opt_state=tx.init(params),
    rng=jax.random.key_data(key),
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
  return (
    graphdef,
    shapes,
    state_shardings(shapes, mesh, config.mesh.rules, config.mesh.fsdp_min_size),
  )


def initialize(config, teacher_dims, tx, shardings) -> TrainState:
  init = jax.jit(
    lambda seed: init_state(config, teacher_dims, tx, seed)[1],
    static_argnums=0,
    out_shardings=shardings,
  )
  return init(config.seed)


def state_shardings(shapes: TrainState, mesh, rules, min_size: int):
  tree = functools.partial(sharding.tree_shardings, mesh=mesh, rules=rules, min_size=min_size)
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


def abstract_with_shardings(shapes, shardings):
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
  )


def param_counts(shapes: TrainState) -> dict[str, int]:
  """Parameter counts of the backbone, its stacked blocks and the alignment heads."""
  params = nnx.State.merge(shapes.params, shapes.frozen)
  return {
    'backbone': count_params(params['backbone']),
    'blocks': count_params(params['backbone']['blocks']),
    'repa_heads': count_params(params.get('repa_heads', {})),  # none without a selection
    'bitc_heads': count_params(params['bitc_heads']),
  }
