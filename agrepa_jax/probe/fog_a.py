"""FoG-A, forward-only gate ablation (docs/method.md, FoG-A and LASP): how far the velocity moves
when one block is off.

Δ_ℓ(t) = RMS(v_¬ℓ − v) / RMS(v) per clip, over the frames that hold audio and all mel bins, where v
has every gate at 1 and v_¬ℓ has g = 1 − e_ℓ. Two implementations, each one jitted function of all
L+1 gate settings:

- `naive_clip_scores`: the model vmapped over the L+1 gate masks: (L+1)·L block evaluations and
  (L+1)× the activations. The reference in tests and the baseline of bench/fog_a.py.
- `clip_scores`: shares the prefix. g_ℓ = 0 makes block ℓ exactly the identity, so the run without
  block i (0-based) equals the clean run up to block i's input, and continues from that clean hidden
  state through blocks i+1..L−1. Those continuations are packed into lanes of exactly L block
  evaluations (`ablation_lanes`): ⌊(L−1)/2⌋ lanes, and for even L the middle continuation (L/2
  blocks) on its own, so L(L+1)/2 block evaluations with the clean pass: (L+1)/2 stack passes.
  The lanes are split over all devices of the mesh (shard_map) and run at most `chunk_size` at a
  time on each, so memory holds the L clean hidden states plus `chunk_size` lanes' activations.

With a dropout key, `clip_scores` gives every gate setting of a batch the same key: block ℓ draws
the same mask in the clean and the ablated runs, so the score isolates the ablation. The official
code instead draws fresh dropout in every forward pass (`naive_clip_scores(fresh_dropout=True)`,
what `fog_a_table(dropout=True)` runs; prefix sharing does not hold then).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from agrepa_jax.model import DiT, run_blocks
from agrepa_jax.probe import batch as probe_batch
from agrepa_jax.probe.batch import MODEL_KEYS, model_inputs, scored_frames


def relative_rms(v_ablated: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
  """(..., B, T, M) against (B, T, M) over the (B, T) valid frames -> (..., B) Δ.

  Δ = RMS(v_ablated − v) / RMS(v).
  """
  weights = valid[..., None].astype(v.dtype)
  change = (jnp.square(v_ablated - v) * weights).sum((-2, -1))
  return jnp.sqrt(
    change / jnp.maximum((jnp.square(v) * weights).sum((-2, -1)), jnp.finfo(v.dtype).tiny)
  )


def ablation_lanes(num_layers: int) -> tuple[np.ndarray, np.ndarray]:
  """Pairs of ablated blocks (0-based) sharing a lane of `num_layers` block evaluations.

  Without block i, blocks i+1..L−1 remain: L−1−i evaluations. A lane runs ablation `first` = i in
  steps [0, L−1−i) and ablation `second` = L−2−i in the remaining i+1 steps, so every lane is full.
  For even L the middle ablation has no partner (`unpaired_ablation`); ablation L−1 needs no block.
  """
  first = np.arange((num_layers - 1) // 2)
  return first, num_layers - 2 - first


def unpaired_ablation(num_layers: int) -> int | None:
  """The ablation that runs alone, in L/2 block evaluations, for even L (None for odd L)."""
  return num_layers // 2 - 1 if num_layers % 2 == 0 else None


def lane_layout(num_lanes: int, num_devices: int, chunk_size: int) -> tuple[int, int]:
  """(lanes after padding, lanes per chunk) for splitting lanes over devices, then into chunks.

  Every device runs the same whole number of chunks; a chunk is never larger than a device's share,
  so padding adds less than one chunk per device.
  """
  per_device = -(-num_lanes // num_devices)
  chunk = min(chunk_size, per_device)
  return num_devices * chunk * -(-per_device // chunk), chunk


def clean_pass(dit: DiT, inputs: dict, dropout_key, lengths=None):
  """The clean velocity (B, T, M), every block's input (L, B, T, W), time embedding, layer keys.

  lengths: (B,) valid frames, the keys attention reads (default all).
  """
  cfg = dit.cfg
  h0, time_emb, _ = dit.embed_inputs(
    inputs['x_t'], inputs['t'], inputs['tokens'], inputs['ref_mel'], inputs['domain']
  )
  layer_keys = dit.layer_keys(dropout_key)
  h, outputs = run_blocks(
    dit.blocks,
    h0,
    time_emb,
    jnp.ones((cfg.num_layers,), h0.dtype),
    layer_keys,
    'frame',
    cfg.remat,
    lengths,
  )
  return dit.output(h), jnp.concatenate([h0[None], outputs[:-1]]), time_emb, layer_keys


def run_lanes(blocks, block_inputs, time_emb, layer_keys, first, second, lengths=None):
  """Final hidden states (C, B, T, W) of the `first` and the `second` ablation of C lanes."""
  num_layers = block_inputs.shape[0]
  graphdef, stacked = nnx.split(blocks)
  switch = num_layers - 1 - first
  second_start = block_inputs[second]
  gate = jnp.ones((), block_inputs.dtype)

  def apply_block(index, h):
    block = nnx.merge(graphdef, jax.tree.map(lambda p: p[index], stacked))
    return block(h, time_emb, gate, None if layer_keys is None else layer_keys[index], lengths)

  def step(carry, s):
    h, first_final = carry
    at_switch = (s == switch)[:, None, None, None]
    first_final = jnp.where(at_switch, h, first_final)
    h = jnp.where(at_switch, second_start, h)
    index = jnp.where(s < switch, first + 1 + s, s)
    return (jax.vmap(apply_block)(index, h), first_final), None

  start = block_inputs[first]
  (second_final, first_final), _ = jax.lax.scan(
    step, (start, jnp.zeros_like(start)), jnp.arange(num_layers)
  )
  return first_final, second_final


def run_suffix(dit: DiT, h, time_emb, layer_keys, start: int, lengths=None):
  """Final hidden state (B, T, W) of blocks `start`..L−1 applied to `h` (a block's input)."""
  graphdef, stacked = nnx.split(dit.blocks)
  suffix = nnx.merge(graphdef, jax.tree.map(lambda p: p[start:], stacked))
  keys = None if layer_keys is None else layer_keys[start:]
  gates = jnp.ones((dit.cfg.num_layers - start,), h.dtype)
  return run_blocks(suffix, h, time_emb, gates, keys, 'none', dit.cfg.remat, lengths)[0]


def _lane_scores(
  graphdef,
  state,
  block_inputs,
  time_emb,
  layer_keys,
  v,
  valid,
  lengths,
  first,
  second,
  *,
  chunk_size,
):
  """Per-device: Δ (lanes, 2, B) of this device's lanes, `chunk_size` lanes at a time."""
  dit = nnx.merge(graphdef, state)

  def chunk(lanes):
    finals = jnp.stack(
      run_lanes(dit.blocks, block_inputs, time_emb, layer_keys, *lanes, lengths), 1
    )
    velocity = dit.output(finals.reshape(-1, *finals.shape[-2:])).reshape(
      *finals.shape[:3], *v.shape[-2:]
    )
    return relative_rms(velocity, v, valid)

  scores = jax.lax.map(chunk, (first.reshape(-1, chunk_size), second.reshape(-1, chunk_size)))
  return scores.reshape(-1, *scores.shape[2:])


@functools.partial(
  jax.jit,
  static_argnames=(
    'graphdef',
    'chunk_size',
    'mesh',
    'prompt_fraction',
    'clean_input',
    'mask_padding',
  ),
)
def _clip_scores(
  state,
  batch,
  t,
  noise,
  dropout_key,
  *,
  graphdef,
  chunk_size,
  mesh,
  prompt_fraction,
  clean_input,
  mask_padding,
):
  dit = nnx.merge(graphdef, state)
  inputs = model_inputs(batch, t, noise, prompt_fraction, clean_input)
  valid, lengths = scored_frames(batch['num_samples'], noise.shape[1], mask_padding)
  v, block_inputs, time_emb, layer_keys = clean_pass(dit, inputs, dropout_key, lengths)
  num_layers = block_inputs.shape[0]
  scores = jnp.zeros((num_layers, v.shape[0]), v.dtype)
  scores = scores.at[-1].set(relative_rms(dit.output(block_inputs[-1]), v, valid))
  middle = unpaired_ablation(num_layers)
  if middle is not None:  # on every device: L/2 blocks, less than a lane
    final = run_suffix(dit, block_inputs[middle], time_emb, layer_keys, middle + 1, lengths)
    scores = scores.at[middle].set(relative_rms(dit.output(final), v, valid))
  first, second = ablation_lanes(num_layers)
  if len(first):
    replicated = (state, block_inputs, time_emb, layer_keys, v, valid, lengths)
    scores = _scatter_lane_scores(
      scores, graphdef, replicated, first, second, chunk_size=chunk_size, mesh=mesh
    )
  # replicated, so that every host of a multi-host mesh can read the whole table
  return jax.lax.with_sharding_constraint(scores, NamedSharding(mesh, P()))


def _scatter_lane_scores(scores, graphdef, replicated, first, second, *, chunk_size, mesh):
  """`scores` (L, B) with the rows of the lanes' ablations (`first`, `second`), lanes split over
  the devices of `mesh`; `replicated`: _lane_scores's inputs that every device reads whole."""
  num_lanes, chunk_size = lane_layout(len(first), mesh.size, chunk_size)
  padding = np.zeros(
    num_lanes - len(first), np.int64
  )  # copies of lane 0, their scores written twice
  first, second = np.concatenate([first, first[padding]]), np.concatenate([second, second[padding]])
  lanes = P(tuple(mesh.axis_names))
  per_lane = jax.shard_map(
    functools.partial(_lane_scores, graphdef, chunk_size=chunk_size),
    mesh=mesh,
    in_specs=(P(),) * len(replicated) + (lanes, lanes),
    out_specs=lanes,
  )(*replicated, jnp.asarray(first), jnp.asarray(second))
  return scores.at[np.concatenate([first, second])].set(
    jnp.concatenate([per_lane[:, 0], per_lane[:, 1]])
  )


def single_device_mesh() -> jax.sharding.Mesh:
  return jax.make_mesh((1,), ('lanes',), axis_types=(AxisType.Auto,), devices=jax.devices()[:1])


def clip_scores(
  dit: DiT,
  batch: dict,
  t: float,
  noise: jax.Array,
  *,
  dropout_key: jax.Array | None = None,
  prompt_fraction: float = 0.15,
  chunk_size: int = 1,
  mesh: jax.sharding.Mesh | None = None,
  clean_input: bool = False,
  mask_padding: bool = True,
):
  """Δ (L, B) of every block for every clip of `batch` at one t, prefix-shared and lane-sharded.

  batch: 'mel' x1 (B, T, M), 'tokens', 'domain', 'num_samples'; noise: x0 (B, T, M).
  mesh: the lanes are split over all its devices (default: one device).
  clean_input: the model reads x1 labelled t instead of x_t (the official probe's quirk).
  mask_padding: padding frames are masked from attention and from Δ (False: the official code,
    every frame counts).
  """
  graphdef, state = nnx.split(dit)
  return _clip_scores(
    state,
    {k: batch[k] for k in MODEL_KEYS},
    jnp.float32(t),
    noise,
    dropout_key,
    graphdef=graphdef,
    chunk_size=chunk_size,
    mesh=mesh or single_device_mesh(),
    prompt_fraction=prompt_fraction,
    clean_input=clean_input,
    mask_padding=mask_padding,
  )


@functools.partial(
  jax.jit,
  static_argnames=('graphdef', 'prompt_fraction', 'clean_input', 'fresh_dropout', 'mask_padding'),
)
def _naive_clip_scores(
  state,
  batch,
  t,
  noise,
  dropout_key,
  *,
  graphdef,
  prompt_fraction,
  clean_input,
  fresh_dropout,
  mask_padding,
):
  inputs = model_inputs(batch, t, noise, prompt_fraction, clean_input)
  valid, lengths = scored_frames(batch['num_samples'], noise.shape[1], mask_padding)
  num_layers = nnx.merge(graphdef, state).cfg.num_layers
  masks = jnp.concatenate([jnp.ones((1, num_layers)), 1 - jnp.eye(num_layers)])
  forward = lambda gates, key: nnx.merge(graphdef, state)(
    **inputs, gates=gates, dropout_key=key, lengths=lengths
  )[0]
  if dropout_key is None:
    velocities = jax.vmap(lambda gates: forward(gates, None))(masks)
  elif fresh_dropout:
    velocities = jax.vmap(forward)(masks, jax.random.split(dropout_key, num_layers + 1))
  else:
    velocities = jax.vmap(lambda gates: forward(gates, dropout_key))(masks)
  return relative_rms(velocities[1:], velocities[0], valid)


def naive_clip_scores(
  dit: DiT,
  batch: dict,
  t: float,
  noise: jax.Array,
  *,
  dropout_key: jax.Array | None = None,
  prompt_fraction: float = 0.15,
  clean_input: bool = False,
  fresh_dropout: bool = False,
  mask_padding: bool = True,
):
  """Δ (L, B) like `clip_scores`, from the model vmapped over all L+1 gate masks.

  fresh_dropout: each of the L+1 forward passes draws its own dropout from `dropout_key` (the
  official code's training-mode probe); otherwise they share it, as in `clip_scores`.
  """
  graphdef, state = nnx.split(dit)
  return _naive_clip_scores(
    state,
    {k: batch[k] for k in MODEL_KEYS},
    jnp.float32(t),
    noise,
    dropout_key,
    graphdef=graphdef,
    prompt_fraction=prompt_fraction,
    clean_input=clean_input,
    fresh_dropout=fresh_dropout,
    mask_padding=mask_padding,
  )


def domain_means(per_clip: np.ndarray, clip_domains: np.ndarray, num_domains: int):
  """(..., N) per-clip values -> (..., D) means per domain (NaN for no clips), (D,) counts."""
  counts = np.bincount(clip_domains, minlength=num_domains)
  one_hot = (clip_domains[:, None] == np.arange(num_domains)).astype(np.float64)
  with np.errstate(invalid='ignore', divide='ignore'):
    means = (per_clip @ one_hot) / counts
  return np.where(counts > 0, means, np.nan), counts


def fog_a_table(
  dit: DiT,
  batch: dict,
  t_values,
  key: jax.Array,
  *,
  num_domains: int,
  batch_size: int = 16,
  chunk_size: int = 1,
  mesh: jax.sharding.Mesh | None = None,
  prompt_fraction: float = 0.15,
  dropout: bool = False,
  clean_input: bool = False,
  progress: bool = False,
  noise_std: float = probe_batch.NOISE_STD,
  mask_padding: bool = True,
):
  """FoG-A over a probe set: (L, n_t, D) per-domain mean Δ (NaN for an absent domain), (D,) counts.

  batch: the stacked probe set (`batch.stack_records`); it is run `batch_size` clips at a time.
  key: draws the fixed noise (per clip, see batch.py) and, with `dropout`, the training-mode
  dropout, fresh in every forward pass (the official probe; L+1 full passes, no prefix sharing).
  clean_input: the model reads the clean mel labelled t (the official probe's quirk).
  mask_padding: False scores every frame with no attention mask (model.mask_padding, the official).
  """
  num_clips = len(batch['domain'])
  noise = probe_batch.clip_noise(key, num_clips, batch['mel'].shape[1:], noise_std)
  starts = range(0, num_clips, batch_size)
  per_clip = np.zeros((dit.cfg.num_layers, len(t_values), num_clips), np.float32)
  jobs = [(b, j) for b in range(len(starts)) for j in range(len(t_values))]
  for b, j in tqdm.tqdm(jobs, desc='FoG-A', unit='forward set', disable=not progress):
    rows = slice(starts[b], starts[b] + batch_size)
    clips = {k: batch[k][rows] for k in MODEL_KEYS}
    settings = dict(
      prompt_fraction=prompt_fraction, clean_input=clean_input, mask_padding=mask_padding
    )
    if dropout:
      scores = naive_clip_scores(
        dit,
        clips,
        t_values[j],
        noise[rows],
        dropout_key=probe_batch.dropout_key(key, b, j),
        fresh_dropout=True,
        **settings,
      )
    else:
      scores = clip_scores(
        dit, clips, t_values[j], noise[rows], chunk_size=chunk_size, mesh=mesh, **settings
      )
    per_clip[:, j, rows] = np.asarray(scores)
  return domain_means(per_clip, np.asarray(batch['domain']), num_domains)
