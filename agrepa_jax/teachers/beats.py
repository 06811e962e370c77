"""BEATs (Chen et al., 2022) audio encoder in Flax NNX, its official .pt checkpoint loader, and the
BEATs teacher.

The model follows microsoft/unilm beats (BEATs.py, backbone.py) at inference: 16x16 patches of the
(frames, 128) kaldi fbank image -> LayerNorm -> projection -> convolutional positional embedding ->
post-LN "deep-norm" transformer layers whose self-attention adds a gated, bucketed relative position
bias computed once and shared by all layers. Tokens are time-major: token t * 8 + f is time step t,
frequency patch f.
"""

import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from agrepa_jax.teachers import fbank as fbank_lib
from agrepa_jax.teachers.base import TeacherSpec

LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's
FRAMES_PER_SECOND = fbank_lib.SAMPLE_RATE / fbank_lib.FRAME_SHIFT / 16  # 16×16 patches
SAMPLE_RATE = fbank_lib.SAMPLE_RATE  # the rate of the audio the teacher reads
CHECKPOINT_FORMAT = (
  'an official BEATs .pt checkpoint: a torch pickle of '
  "{'cfg': dict of BEATsConfig fields, 'model': BEATs state_dict}"
)


class BeatsCheckpointError(ValueError):
  """A file that is not a readable BEATs checkpoint of a supported configuration."""


@dataclasses.dataclass(frozen=True)
class BeatsConfig:
  """The BEATsConfig fields that shape the encoder; defaults are the official BEATsConfig's, so a
  checkpoint's cfg dict reads as it does in the official code (its input_patch_size placeholder -1
  aside)."""

  input_patch_size: int = 16
  embed_dim: int = 512
  conv_bias: bool = False
  encoder_layers: int = 12
  encoder_embed_dim: int = 768
  encoder_ffn_embed_dim: int = 3072
  encoder_attention_heads: int = 12
  deep_norm: bool = False
  conv_pos: int = 128
  conv_pos_groups: int = 16
  num_buckets: int = 320
  max_distance: int = 1280

  @property
  def head_dim(self) -> int:
    return self.encoder_embed_dim // self.encoder_attention_heads

  @property
  def frequency_patches(self) -> int:
    return fbank_lib.NUM_MEL_BINS // self.input_patch_size

  @property
  def residual_scale(self) -> float:
    """Deep-norm's alpha: the residual branch of every post-LN sublayer is scaled by (2 N)^(1/4)."""
    return (2 * self.encoder_layers) ** 0.25 if self.deep_norm else 1.0


# Official BEATsConfig switches and the one value of each that this implementation covers.
REQUIRED_SETTINGS = {
  'layer_norm_first': False,
  'relative_position_embedding': True,
  'gru_rel_pos': True,
  'activation_fn': 'gelu',
}
OFFICIAL_DEFAULTS = {
  'layer_norm_first': False,
  'relative_position_embedding': False,
  'gru_rel_pos': False,
  'activation_fn': 'gelu',
}


def config_from_checkpoint(cfg: dict, path='<cfg>') -> BeatsConfig:
  """BeatsConfig of an official checkpoint's cfg dict; rejects settings this model lacks."""
  for key, required in REQUIRED_SETTINGS.items():
    value = cfg.get(key, OFFICIAL_DEFAULTS[key])
    if value != required:
      raise BeatsCheckpointError(
        f'{path}: unsupported BEATs setting {key}={value!r} (need {required!r})'
      )
  fields = {f.name for f in dataclasses.fields(BeatsConfig)}
  config = BeatsConfig(**{k: v for k, v in cfg.items() if k in fields})
  if fbank_lib.NUM_MEL_BINS % config.input_patch_size:
    raise BeatsCheckpointError(
      f'{path}: input_patch_size {config.input_patch_size} does not '
      f'divide the {fbank_lib.NUM_MEL_BINS} mel bins'
    )
  return config


def relative_position_bucket(
  relative: np.ndarray, num_buckets: int, max_distance: int
) -> np.ndarray:
  """BEATs' bidirectional bucket of each key-minus-query offset: half the buckets per direction,
  exact below a quarter of the buckets, log-spaced up to max_distance, clipped beyond.

  Computed in float32 like the official code, so rounding at bucket edges agrees with it.
  """
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(relative)
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
  far = exact + (log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact))
  far = np.minimum(far.astype(np.int64), half - 1)
  return (relative > 0) * half + np.where(distance < exact, distance, far)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
  """(query, key) bucket table of a sequence of `length` tokens."""
  positions = np.arange(length)
  relative = positions[None, :] - positions[:, None]  # key minus query
  return relative_position_bucket(relative, num_buckets, max_distance)


def weight_norm(direction: jax.Array, magnitude: jax.Array) -> jax.Array:
  """torch weight_norm(dim=2) of a (kernel, in, out) conv weight: one magnitude per kernel tap."""
  norm = jnp.sqrt(jnp.sum(direction**2, axis=(1, 2), keepdims=True))
  return direction * magnitude[:, None, None] / norm


def gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # torch's default, erf-based


class ConvPositionalEmbedding(nnx.Module):
  """Weight-normalized grouped Conv1d over time, then GELU; its output is added to the input."""

  def __init__(self, dim: int, kernel_size: int, groups: int, *, rngs: nnx.Rngs):
    self.groups = groups
    std = math.sqrt(4 / (kernel_size * dim))
    direction = std * jax.random.normal(rngs.params(), (kernel_size, dim // groups, dim))
    self.weight_v = nnx.Param(direction)
    self.weight_g = nnx.Param(jnp.sqrt(jnp.sum(direction**2, axis=(1, 2))))
    self.bias = nnx.Param(jnp.zeros((dim,)))

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = weight_norm(self.weight_v[...], self.weight_g[...])
    pad = kernel.shape[0] // 2
    y = jax.lax.conv_general_dilated(
      x,
      kernel,
      window_strides=(1,),
      padding=[(pad, pad)],
      dimension_numbers=('NWC', 'WIO', 'NWC'),
      feature_group_count=self.groups,
    )
    # An even kernel yields one extra output step, which BEATs (SamePad) drops from the end.
    return gelu(y[:, : x.shape[1]] + self.bias[...])


class SelfAttention(nnx.Module):
  """Multi-head self-attention with BEATs' gated relative position bias.

  Each query scales the shared bias by a gate computed from its own (unscaled) projection:
  g = a (b grep_a - 1) + 2, with a, b sigmoids of two sums of grep_linear outputs.
  """

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs):
    dim, heads = config.encoder_embed_dim, config.encoder_attention_heads
    self.heads = heads
    self.q_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.k_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.v_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.out_proj = nnx.Linear(dim, dim, rngs=rngs)
    self.grep_linear = nnx.Linear(config.head_dim, 8, rngs=rngs)
    self.grep_a = nnx.Param(jnp.ones((heads,)))

  def split_heads(self, x: jax.Array) -> jax.Array:
    """(B, T, C) -> (B, H, T, C / H)."""
    return x.reshape(*x.shape[:2], self.heads, -1).transpose(0, 2, 1, 3)

  def position_bias_gate(self, query: jax.Array) -> jax.Array:
    """(B, H, T, head_dim) unscaled queries -> (B, H, T) factor on the relative position bias."""
    sums = self.grep_linear(query).reshape(*query.shape[:-1], 2, 4).sum(-1)
    gate_a, gate_b = jnp.moveaxis(jax.nn.sigmoid(sums), -1, 0)
    return gate_a * (gate_b * self.grep_a[...][:, None] - 1.0) + 2.0

  def __call__(
    self, x: jax.Array, position_bias: jax.Array, key_mask: jax.Array | None
  ) -> jax.Array:
    """x (B, T, C), position_bias (H, T, T), key_mask (B, T) True for keys that hold audio."""
    query = self.split_heads(self.q_proj(x))
    key = self.split_heads(self.k_proj(x))
    value = self.split_heads(self.v_proj(x))
    logits = jnp.einsum('bhqd,bhkd->bhqk', query, key) / math.sqrt(query.shape[-1])
    logits = logits + self.position_bias_gate(query)[..., None] * position_bias
    if key_mask is not None:
      logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    attended = jnp.einsum('bhqk,bhkd->bhqd', jax.nn.softmax(logits, axis=-1), value)
    return self.out_proj(attended.transpose(0, 2, 1, 3).reshape(x.shape))


class EncoderLayer(nnx.Module):
  """Post-LN transformer layer with deep-norm residual scaling."""

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs):
    dim = config.encoder_embed_dim
    self.residual_scale = config.residual_scale
    self.self_attn = SelfAttention(config, rngs=rngs)
    self.self_attn_layer_norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
    self.fc1 = nnx.Linear(dim, config.encoder_ffn_embed_dim, rngs=rngs)
    self.fc2 = nnx.Linear(config.encoder_ffn_embed_dim, dim, rngs=rngs)
    self.final_layer_norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)

  def __call__(
    self, x: jax.Array, position_bias: jax.Array, key_mask: jax.Array | None
  ) -> jax.Array:
    attended = self.self_attn(x, position_bias, key_mask)
    x = self.self_attn_layer_norm(x * self.residual_scale + attended)
    return self.final_layer_norm(x * self.residual_scale + self.fc2(gelu(self.fc1(x))))


class Encoder(nnx.Module):
  """Positional convolution, LayerNorm and the layers, whose parameters are stacked to scan over."""

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs):
    dim = config.encoder_embed_dim
    self.num_buckets = config.num_buckets
    self.max_distance = config.max_distance
    self.pos_conv = ConvPositionalEmbedding(dim, config.conv_pos, config.conv_pos_groups, rngs=rngs)
    self.layer_norm = nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
    # Official checkpoints hold one table per layer, all the same module: the first layer's.
    self.relative_attention_bias = nnx.Embed(
      config.num_buckets, config.encoder_attention_heads, rngs=rngs
    )

    @nnx.split_rngs(splits=config.encoder_layers)
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked_layers(rngs: nnx.Rngs) -> EncoderLayer:
      return EncoderLayer(config, rngs=rngs)

    self.layers = stacked_layers(rngs)

  def position_bias(self, length: int) -> jax.Array:
    """(H, T, T) relative position bias."""
    buckets = relative_position_buckets(length, self.num_buckets, self.max_distance)
    return self.relative_attention_bias(jnp.asarray(buckets)).transpose(2, 0, 1)

  def __call__(self, x: jax.Array, token_mask: jax.Array | None, num_layers: int) -> jax.Array:
    """x (B, T, C) -> the output of the first `num_layers` layers (0: the layers' input)."""
    if token_mask is not None:
      x = jnp.where(token_mask[..., None], x, 0.0)
    x = self.layer_norm(x + self.pos_conv(x))
    position_bias = self.position_bias(x.shape[1])
    graphdef, stacked = nnx.split(self.layers)
    stacked = jax.tree.map(lambda p: p[:num_layers], stacked)

    def layer_step(h, layer_state):
      return nnx.merge(graphdef, layer_state)(h, position_bias, token_mask), None

    x, _ = jax.lax.scan(layer_step, x, stacked)
    return x


class Beats(nnx.Module):
  """The BEATs encoder: normalized fbank (B, frames, 128) -> tokens (B, steps * 8, C)."""

  def __init__(self, config: BeatsConfig, *, rngs: nnx.Rngs):
    patch = config.input_patch_size
    self.config = config
    self.patch_embedding = nnx.Conv(
      1,
      config.embed_dim,
      (patch, patch),
      strides=(patch, patch),
      padding='VALID',
      use_bias=config.conv_bias,
      rngs=rngs,
    )
    self.layer_norm = nnx.LayerNorm(config.embed_dim, epsilon=LAYER_NORM_EPSILON, rngs=rngs)
    self.post_extract_proj = (
      nnx.Linear(config.embed_dim, config.encoder_embed_dim, rngs=rngs)
      if config.embed_dim != config.encoder_embed_dim
      else None
    )
    self.encoder = Encoder(config, rngs=rngs)

  def __call__(
    self, fbank: jax.Array, step_mask: jax.Array | None = None, output_layer: int | None = None
  ) -> jax.Array:
    """Tokens of the last layer, or of layer `output_layer` (1..N; 0 is the layers' input).

    fbank: (B, frames, 128) from fbank.beats_fbank; trailing frames short of a whole patch are
    dropped, as in BEATs. step_mask: (B, frames // 16) bool, True for time steps that hold audio;
    padded steps are zeroed before the positional convolution and never attended to, so a clip's
    tokens do not depend on the padding that batches it.
    """
    patches = self.patch_embedding(fbank[..., None])  # (B, steps, frequency patches, embed_dim)
    tokens = self.layer_norm(patches.reshape(patches.shape[0], -1, patches.shape[-1]))
    if self.post_extract_proj is not None:
      tokens = self.post_extract_proj(tokens)
    token_mask = None
    if step_mask is not None:
      token_mask = jnp.repeat(step_mask, self.config.frequency_patches, axis=1)
    num_layers = self.config.encoder_layers if output_layer is None else output_layer
    return self.encoder(tokens, token_mask, num_layers)


def time_step_features(tokens: jax.Array, frequency_patches: int) -> jax.Array:
  """(B, steps * frequency_patches, C) time-major tokens -> (B, steps, C) means over frequency."""
  return tokens.reshape(tokens.shape[0], -1, frequency_patches, tokens.shape[-1]).mean(axis=2)


def num_time_steps(num_samples, patch: int = 16):
  """Whole patches of fbank frames in `num_samples` samples (int or integer array)."""
  return fbank_lib.num_fbank_frames(num_samples) // patch


# ---------------------------------------------------------------------------- checkpoint loading


def _linear(prefix: str) -> dict:
  return {f'{prefix}.weight': ('kernel', np.transpose), f'{prefix}.bias': ('bias', None)}


def _layer_norm(prefix: str) -> dict:
  return {f'{prefix}.weight': ('scale', None), f'{prefix}.bias': ('bias', None)}


def _nest(path: tuple, table: dict) -> dict:
  """Prefixes the NNX paths of a torch-name -> (nnx leaf, transform) table with `path`."""
  return {name: (path + (leaf,), transform) for name, (leaf, transform) in table.items()}


def _layer_table() -> dict:
  """Torch names within encoder.layers.{i} -> (NNX path within Encoder.layers, transform)."""
  table = {}
  for proj in ('q_proj', 'k_proj', 'v_proj', 'out_proj', 'grep_linear'):
    table |= _nest(('self_attn', proj), _linear(f'self_attn.{proj}'))
  table['self_attn.grep_a'] = (('self_attn', 'grep_a'), np.ravel)  # (1, H, 1, 1) -> (H,)
  for norm in ('self_attn_layer_norm', 'final_layer_norm'):
    table |= _nest((norm,), _layer_norm(norm))
  for fc in ('fc1', 'fc2'):
    table |= _nest((fc,), _linear(fc))
  return table


def _model_table(config: BeatsConfig, state_dict: dict) -> dict:
  """Torch names outside encoder.layers -> (NNX path, transform)."""
  conv_to_hwio = lambda w: w.transpose(2, 3, 1, 0)
  table = {'patch_embedding.weight': (('patch_embedding', 'kernel'), conv_to_hwio)}
  if config.conv_bias:
    table['patch_embedding.bias'] = (('patch_embedding', 'bias'), None)
  table |= _nest(('layer_norm',), _layer_norm('layer_norm'))
  if config.embed_dim != config.encoder_embed_dim:
    table |= _nest(('post_extract_proj',), _linear('post_extract_proj'))
  table |= _nest(('encoder', 'layer_norm'), _layer_norm('encoder.layer_norm'))
  table['encoder.layers.0.self_attn.relative_attention_bias.weight'] = (
    ('encoder', 'relative_attention_bias', 'embedding'),
    None,
  )
  # Weight norm is stored as weight_g / weight_v (torch.nn.utils.weight_norm) or, by the newer
  # torch.nn.utils.parametrizations.weight_norm, as original0 / original1.
  conv = 'encoder.pos_conv.0'
  parametrized = f'{conv}.parametrizations.weight.original0' in state_dict
  magnitude = f'{conv}.parametrizations.weight.original0' if parametrized else f'{conv}.weight_g'
  direction = f'{conv}.parametrizations.weight.original1' if parametrized else f'{conv}.weight_v'
  table[magnitude] = (('encoder', 'pos_conv', 'weight_g'), np.ravel)  # (1, 1, K) -> (K,)
  table[direction] = (('encoder', 'pos_conv', 'weight_v'), lambda w: w.transpose(2, 1, 0))
  table[f'{conv}.bias'] = (('encoder', 'pos_conv', 'bias'), None)
  return table


def _is_ignored(name: str) -> bool:
  """Entries that do not shape the features: the fine-tuned classifier, and the relative position
  tables of layers after the first, which are that same table."""
  return name.startswith('predictor.') or (
    name.startswith('encoder.layers.')
    and name.endswith('.relative_attention_bias.weight')
    and not name.startswith('encoder.layers.0.')
  )


def flat_nnx_state(config: BeatsConfig, state_dict: dict, path='<state_dict>') -> dict:
  """Official BEATs state_dict (name -> numpy array) -> {NNX path: numpy array} of a Beats."""
  layers = range(config.encoder_layers)
  table, layer_table = _model_table(config, state_dict), _layer_table()
  expected = set(table) | {f'encoder.layers.{i}.{name}' for i in layers for name in layer_table}
  present = {name for name in state_dict if not _is_ignored(name)}
  if present != expected:
    missing, unexpected = sorted(expected - present), sorted(present - expected)
    raise BeatsCheckpointError(
      f'{path}: state_dict does not match a BEATs encoder with this cfg: {len(missing)} missing '
      f'(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}); expected '
      f'{CHECKPOINT_FORMAT}'
    )
  apply = lambda transform, array: array if transform is None else transform(array)
  flat = {
    nnx_path: apply(transform, state_dict[name]) for name, (nnx_path, transform) in table.items()
  }
  for name, (leaf_path, transform) in layer_table.items():
    per_layer = [apply(transform, state_dict[f'encoder.layers.{i}.{name}']) for i in layers]
    flat[('encoder', 'layers') + leaf_path] = np.stack(per_layer)
  return flat


def beats_from_state_dict(config: BeatsConfig, state_dict: dict, path='<state_dict>') -> Beats:
  """A Beats holding an official state_dict's weights (numpy arrays by torch name)."""
  abstract = nnx.eval_shape(lambda: Beats(config, rngs=nnx.Rngs(0)))
  graphdef, abstract_state = nnx.split(abstract)
  flat = flat_nnx_state(config, state_dict, path)
  leaves = []
  for nnx_path, variable in nnx.to_flat_state(abstract_state):
    array = flat[nnx_path]
    if array.shape != variable.shape:
      raise BeatsCheckpointError(
        f'{path}: {"/".join(map(str, nnx_path))} has shape {array.shape}, '
        f'the cfg implies {variable.shape}'
      )
    leaves.append((nnx_path, variable.replace(jnp.asarray(array, jnp.float32))))
  return nnx.merge(graphdef, nnx.from_flat_state(leaves))


def _describe(checkpoint) -> str:
  """A short description of what a torch pickle holds, for error messages."""
  if not isinstance(checkpoint, dict):
    return f'a {type(checkpoint).__name__}'
  keys = sorted(map(str, checkpoint))
  if len(keys) <= 3:
    return f'top-level keys {keys}'
  return f'{len(keys)} top-level keys, first {keys[:3]}'


def read_checkpoint(path) -> tuple[dict, dict]:
  """(cfg, state_dict as numpy arrays) of an official BEATs .pt checkpoint."""
  import torch  # only checkpoint loading needs torch

  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file; expected {CHECKPOINT_FORMAT}')
  try:
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several types for corrupt or truncated files
    raise BeatsCheckpointError(
      f'{path}: cannot read as a torch checkpoint ({e}); expected {CHECKPOINT_FORMAT}'
    ) from e
  if not (
    isinstance(checkpoint, dict)
    and isinstance(checkpoint.get('cfg'), dict)
    and isinstance(checkpoint.get('model'), dict)
  ):
    raise BeatsCheckpointError(
      f'{path}: not a BEATs checkpoint ({_describe(checkpoint)}); expected {CHECKPOINT_FORMAT}'
    )
  state_dict = {
    name: tensor.float().numpy()
    for name, tensor in checkpoint['model'].items()
    if isinstance(tensor, torch.Tensor)
  }
  return checkpoint['cfg'], state_dict


def load_beats(path) -> Beats:
  """The BEATs encoder of an official .pt checkpoint, fine-tuned (AS2M) or self-supervised."""
  cfg, state_dict = read_checkpoint(path)
  return beats_from_state_dict(config_from_checkpoint(cfg, path), state_dict, path)


# ------------------------------------------------------------------------------------- teacher


def audio_step_mask(num_samples: np.ndarray, num_steps: int, patch: int) -> np.ndarray:
  """(B, num_steps) bool: time steps whose fbank frames all hold audio, i.e. the steps BEATs gives
  each clip on its own."""
  return np.arange(num_steps)[None, :] < num_time_steps(np.asarray(num_samples), patch)[:, None]


def encode(
  graphdef: nnx.GraphDef,
  state: nnx.State,
  audio: jax.Array,
  mask: jax.Array,
  output_layer: int | None,
) -> jax.Array:
  """(B, N) 16 kHz audio, (B, steps) mask -> (B, steps, C) features averaged over frequency."""
  model = nnx.merge(graphdef, state)
  tokens = model(fbank_lib.beats_fbank(audio), mask, output_layer)
  return time_step_features(tokens, model.config.frequency_patches)


class BeatsTeacher:
  """Teacher protocol (agrepa_jax.teachers.base) over a BEATs encoder: one feature per time step of
  16 fbank frames (6.25 per second), the mean of its 8 frequency-patch tokens.

  official_padding: no padding mask, and the returned mask marks every step, so the utterance
  target averages the whole zero-padded crop (the official code's BEATs target).
  """

  def __init__(self, model: Beats, output_layer: int | None = None, official_padding: bool = False):
    config = model.config
    if output_layer is not None and not 0 <= output_layer <= config.encoder_layers:
      raise ValueError(f'output_layer {output_layer} outside 0..{config.encoder_layers}')
    self.patch = config.input_patch_size
    fbank_frames_per_second = fbank_lib.SAMPLE_RATE / fbank_lib.FRAME_SHIFT
    self.spec = TeacherSpec(
      name='beats',
      dim=config.encoder_embed_dim,
      sample_rate=fbank_lib.SAMPLE_RATE,
      frames_per_second=fbank_frames_per_second / self.patch,
    )
    self.official_padding = official_padding
    graphdef, self.state = nnx.split(model)
    self._encode = jax.jit(functools.partial(encode, graphdef, output_layer=output_layer))

  def features(self, audio: np.ndarray, num_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    num_steps = int(num_time_steps(audio.shape[1], self.patch))
    if num_steps == 0:
      raise ValueError(
        f'BEATs needs clips of at least one patch of {self.patch} fbank frames '
        f'({fbank_lib.FRAME_LENGTH + (self.patch - 1) * fbank_lib.FRAME_SHIFT} '
        f'samples); got {audio.shape[1]}'
      )
    mask = audio_step_mask(num_samples, num_steps, self.patch)
    if self.official_padding:
      mask = np.ones_like(mask)
    features = self._encode(self.state, jnp.asarray(audio, jnp.float32), jnp.asarray(mask))
    return np.asarray(features, np.float32), mask

  def online(self):
    """(apply, params) for a jitted step: `features` as a pure function of jax arrays (it holds
    no reference to this teacher, so its own copy of the parameters can be freed)."""
    apply = functools.partial(
      traced_features, self._encode, self.patch, official_padding=self.official_padding
    )
    return apply, self.state


def traced_features(
  encode_fn, patch: int, state, audio: jax.Array, num_samples: jax.Array, official_padding=False
):
  """BeatsTeacher.features inside a trace: (B, N) audio, (B,) int counts -> (B, steps, C)
  float32, (B, steps) mask of the steps holding audio (of every step with `official_padding`)."""
  num_steps = int(num_time_steps(audio.shape[1], patch))
  if num_steps == 0:
    raise ValueError(f'BEATs needs clips of at least one patch; got {audio.shape[1]} samples')
  fbank_frames = jnp.maximum(0, 1 + (num_samples - fbank_lib.FRAME_LENGTH) // fbank_lib.FRAME_SHIFT)
  mask = jnp.arange(num_steps)[None, :] < (fbank_frames // patch)[:, None]
  if official_padding:
    mask = jnp.ones_like(mask)
  return encode_fn(state, audio.astype(jnp.float32), mask).astype(jnp.float32), mask


def load_beats_teacher(
  checkpoint: str, output_layer: int | None = None, official_padding: bool = False
) -> BeatsTeacher:
  """BEATs teacher from an official .pt checkpoint; features of layer `output_layer` (1..N, 0 the
  layers' input), by default the last."""
  return BeatsTeacher(load_beats(checkpoint), output_layer, official_padding)


def load(checkpoint: str | None = None, padding: str = 'masked', **options) -> BeatsTeacher:
  """The teacher registry's entry. padding: teachers.padding, 'masked' or 'official' (no padding
  mask, every step pooled); options go to `load_beats_teacher` (output_layer)."""
  if checkpoint is None:
    raise ValueError("teacher 'beats' needs a checkpoint path (BEATs iter3+ AS2M .pt)")
  if padding not in ('masked', 'official'):
    raise ValueError(f"teachers.padding={padding!r}: expected 'masked' or 'official'")
  return load_beats_teacher(checkpoint, official_padding=padding == 'official', **options)
