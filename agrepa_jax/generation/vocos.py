"""Vocos mel vocoder in JAX, its checkpoint loader, and the `Vocoder` that makes our mels audio.

Vocos (Siuzdak, 2023; gemelo-ai/vocos) predicts STFT magnitude and phase per mel frame with a
ConvNeXt backbone and inverts them with an ISTFT whose "same" padding makes T frames give exactly
T·hop samples. The "mel-24khz" checkpoint takes the natural-log mel of docs/method.md (audio front
end), so our normalized mels only need `denormalize` first. Without a checkpoint, `load_vocoder`
falls back to Griffin-Lim.
"""

import dataclasses
import functools
import pathlib
from typing import Protocol

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import yaml
from flax import nnx

from agrepa_jax import audio

CONFIG_FILE = 'config.yaml'
WEIGHTS_FILE = 'pytorch_model.bin'
LAYER_NORM_EPS = 1e-6
MAX_MAGNITUDE = 1e2
GRIFFIN_LIM_NAME = 'griffin-lim (no Vocos checkpoint)'


def hann_window(length: int) -> np.ndarray:
  """Periodic Hann window, as torch.hann_window."""
  return np.hanning(length + 1)[:-1].astype(np.float32)


def overlap_add(frames: jax.Array, hop: int) -> jax.Array:
  """(..., T, n) -> (..., (T - 1)·hop + n), frame t added in from sample t·hop; hop must divide n.

  Each frame is cut into n / hop blocks of one hop; block r of frame t lands on output block t + r,
  so the sum is n / hop shifted copies rather than a scatter (deterministic and fast on GPUs).
  """
  *batch, num_frames, frame_length = frames.shape
  blocks_per_frame = frame_length // hop
  blocks = frames.reshape(*batch, num_frames, blocks_per_frame, hop)
  output = 0.0
  for r in range(blocks_per_frame):
    shift = [(0, 0)] * len(batch) + [(r, blocks_per_frame - 1 - r), (0, 0)]
    output = output + jnp.pad(blocks[..., r, :], shift)
  return output.reshape(*batch, (num_frames + blocks_per_frame - 1) * hop)


def istft(spec: jax.Array, n_fft: int, hop: int, win_length: int) -> jax.Array:
  """Inverse STFT with Vocos's "same" padding: (..., n_fft // 2 + 1, T) complex -> (..., T·hop).

  Inverts a Hann-windowed STFT of a signal padded by (win_length - hop) / 2 on each side: per-frame
  irfft, windowing, overlap-add, division by the summed squared window, and trimming that padding.
  """
  if win_length != n_fft:
    raise ValueError(f'Vocos ISTFT needs win_length == n_fft, got {win_length} and {n_fft}')
  if n_fft % hop:
    raise ValueError(f'n_fft {n_fft} must be a multiple of hop {hop}')
  num_frames = spec.shape[-1]
  window = jnp.asarray(hann_window(win_length))
  frames = jnp.fft.irfft(jnp.swapaxes(spec, -1, -2), n=n_fft, axis=-1) * window
  signal = overlap_add(frames, hop)
  envelope = overlap_add(jnp.broadcast_to(window**2, (num_frames, win_length)), hop)
  trim = (win_length - hop) // 2
  return signal[..., trim:-trim] / envelope[trim:-trim]


def layer_norm(dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm:
  # Two-pass variance, as torch computes it: the one-pass E[x²] - E[x]² cancels digits when the
  # mean is large next to the spread.
  return nnx.LayerNorm(dim, epsilon=LAYER_NORM_EPS, use_fast_variance=False, rngs=rngs)


class ConvNeXtBlock(nnx.Module):
  """Depthwise conv (k7) -> LayerNorm -> Linear -> GELU -> Linear, scaled by gamma, plus input."""

  def __init__(self, dim: int, intermediate_dim: int, layer_scale: float, rngs: nnx.Rngs):
    self.dwconv = nnx.Conv(
      dim, dim, kernel_size=(7,), padding=3, feature_group_count=dim, rngs=rngs
    )
    self.norm = layer_norm(dim, rngs)
    self.pwconv1 = nnx.Linear(dim, intermediate_dim, rngs=rngs)
    self.pwconv2 = nnx.Linear(intermediate_dim, dim, rngs=rngs)
    self.gamma = nnx.Param(jnp.full((dim,), layer_scale, jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: (B, T, dim)."""
    h = self.norm(self.dwconv(x))
    h = self.pwconv2(jax.nn.gelu(self.pwconv1(h), approximate=False))
    return x + self.gamma[...] * h


class Vocos(nnx.Module):
  """ConvNeXt backbone + ISTFT head: natural-log mel (B, n_mels, T) -> audio (B, T·hop)."""

  def __init__(
    self,
    *,
    input_channels: int = 100,
    dim: int = 512,
    intermediate_dim: int = 1536,
    num_layers: int = 8,
    n_fft: int = 1024,
    hop_length: int = 256,
    rngs: nnx.Rngs,
  ):
    self.n_fft = n_fft
    self.hop_length = hop_length
    self.embed = nnx.Conv(input_channels, dim, kernel_size=(7,), padding=3, rngs=rngs)
    self.norm = layer_norm(dim, rngs)

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_blocks(rngs):
      return ConvNeXtBlock(dim, intermediate_dim, 1 / num_layers, rngs)

    self.convnext = stacked_blocks(rngs)
    self.final_layer_norm = layer_norm(dim, rngs)
    self.out = nnx.Linear(dim, n_fft + 2, rngs=rngs)

  def __call__(self, log_mel: jax.Array) -> jax.Array:
    x = self.norm(self.embed(jnp.swapaxes(log_mel, 1, 2)))

    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def through_blocks(x, block):
      return block(x)

    x = self.final_layer_norm(through_blocks(x, self.convnext))
    log_magnitude, phase = jnp.split(self.out(x), 2, axis=-1)
    magnitude = jnp.minimum(jnp.exp(log_magnitude), MAX_MAGNITUDE)
    spec = magnitude * jax.lax.complex(jnp.cos(phase), jnp.sin(phase))
    return istft(jnp.swapaxes(spec, 1, 2), self.n_fft, self.hop_length, self.n_fft)


class CheckpointError(ValueError):
  """A Vocos checkpoint directory that misses files, is unreadable, or holds another model."""


def read_config(checkpoint_dir: pathlib.Path) -> dict:
  """`Vocos` constructor arguments from config.yaml, once it is known to describe a mel Vocos."""
  path = checkpoint_dir / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f'{path}: Vocos config not found')
  try:
    config = yaml.safe_load(path.read_text())
    parts = [config[key] for key in ('feature_extractor', 'backbone', 'head')]
    classes = [part['class_path'].rsplit('.', 1)[-1] for part in parts]
    backbone_args, head_args = parts[1]['init_args'], parts[2]['init_args']
  except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
    raise CheckpointError(f'{path}: not a Vocos config.yaml ({e!r})') from e
  if classes != ['MelSpectrogramFeatures', 'VocosBackbone', 'ISTFTHead']:
    raise CheckpointError(
      f'{path}: expected a mel Vocos (MelSpectrogramFeatures, VocosBackbone, '
      f'ISTFTHead), found {classes}'
    )
  if (
    backbone_args.get('adanorm_num_embeddings') is not None
    or head_args.get('padding', 'same') != 'same'
  ):
    raise CheckpointError(
      f'{path}: only the unconditional backbone with "same" ISTFT padding is supported'
    )
  return dict(
    input_channels=backbone_args['input_channels'],
    dim=backbone_args['dim'],
    intermediate_dim=backbone_args['intermediate_dim'],
    num_layers=backbone_args['num_layers'],
    n_fft=head_args['n_fft'],
    hop_length=head_args['hop_length'],
  )


def read_torch_state_dict(path: pathlib.Path) -> dict[str, np.ndarray]:
  if not path.is_file():
    raise CheckpointError(f'{path}: Vocos weights not found')
  try:
    import torch
  except ImportError as e:
    raise ImportError(
      f'reading {path} needs PyTorch: pip install torch==2.13.0 '
      '--index-url https://download.pytorch.org/whl/cpu'
    ) from e
  try:
    state_dict = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # torch raises several types for truncated or foreign files
    raise CheckpointError(f'{path}: cannot read the torch state dict ({e})') from e
  if not isinstance(state_dict, dict):
    raise CheckpointError(f'{path}: holds a {type(state_dict).__name__}, not a state dict')
  return {key: value.float().numpy() for key, value in state_dict.items() if torch.is_tensor(value)}


def conv_kernel(weight):
  """torch Conv1d weight (out, in / groups, k) -> flax kernel (k, in / groups, out)."""
  return weight.transpose(2, 1, 0)


def linear_kernel(weight):
  """torch Linear weight (out, in) -> flax kernel (in, out)."""
  return weight.T


def torch_to_flax(state_dict: dict[str, np.ndarray], num_layers: int) -> dict:
  """Vocos torch parameters -> the pure-dict state of `Vocos`, blocks stacked along a leading axis.

  The feature extractor's mel buffers and the head's window buffer are no parameters: dropped.
  """

  def block_param(name, convert=lambda w: w):
    return np.stack(
      [convert(state_dict[f'backbone.convnext.{i}.{name}']) for i in range(num_layers)]
    )

  def norm(prefix):
    return {'scale': state_dict[f'{prefix}.weight'], 'bias': state_dict[f'{prefix}.bias']}

  return {
    'embed': {
      'kernel': conv_kernel(state_dict['backbone.embed.weight']),
      'bias': state_dict['backbone.embed.bias'],
    },
    'norm': norm('backbone.norm'),
    'convnext': {
      'dwconv': {
        'kernel': block_param('dwconv.weight', conv_kernel),
        'bias': block_param('dwconv.bias'),
      },
      'norm': {'scale': block_param('norm.weight'), 'bias': block_param('norm.bias')},
      'pwconv1': {
        'kernel': block_param('pwconv1.weight', linear_kernel),
        'bias': block_param('pwconv1.bias'),
      },
      'pwconv2': {
        'kernel': block_param('pwconv2.weight', linear_kernel),
        'bias': block_param('pwconv2.bias'),
      },
      'gamma': block_param('gamma'),
    },
    'final_layer_norm': norm('backbone.final_layer_norm'),
    'out': {
      'kernel': linear_kernel(state_dict['head.out.weight']),
      'bias': state_dict['head.out.bias'],
    },
  }


def shape_mismatches(params: dict, expected: dict) -> list[str]:
  """Parameters whose checkpoint shape differs from the shape the config implies."""
  return [
    f'{jax.tree_util.keystr(path)}: checkpoint {np.shape(got)}, config {want.shape}'
    for (path, got), want in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(expected)
    )
    if np.shape(got) != want.shape
  ]


def load_vocos(checkpoint_dir: str | pathlib.Path) -> Vocos:
  """Vocos from an official checkpoint directory (config.yaml + pytorch_model.bin)."""
  checkpoint_dir = pathlib.Path(checkpoint_dir)
  if not checkpoint_dir.is_dir():
    raise CheckpointError(f'{checkpoint_dir}: Vocos checkpoint directory not found')
  config = read_config(checkpoint_dir)
  weights_path = checkpoint_dir / WEIGHTS_FILE
  state_dict = read_torch_state_dict(weights_path)
  try:
    params = torch_to_flax(state_dict, config['num_layers'])
  except KeyError as e:
    raise CheckpointError(
      f'{weights_path}: lacks parameter {e} of the model in {CONFIG_FILE}'
    ) from e
  abstract = nnx.eval_shape(lambda: Vocos(**config, rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(abstract)
  mismatches = shape_mismatches(params, nnx.to_pure_dict(state))
  if mismatches:
    raise CheckpointError(
      f'{weights_path}: shapes do not match {CONFIG_FILE}: ' + '; '.join(mismatches)
    )
  nnx.replace_by_pure_dict(state, jax.tree_util.tree_map(jnp.asarray, params))
  return nnx.merge(graphdef, state)


class Vocoder(Protocol):
  name: str

  def vocode(self, normalized_mel: np.ndarray) -> np.ndarray:
    """Normalized log-mel (B, T, 100), as the flow model makes it -> (B, T·256) float32, 24 kHz."""
    ...


@functools.partial(jax.jit, static_argnums=0)
def vocode_with_vocos(
  graphdef: nnx.GraphDef, state: nnx.State, normalized_mel: jax.Array
) -> jax.Array:
  model = nnx.merge(graphdef, state)
  log_mel = audio.denormalize(normalized_mel.astype(jnp.float32))
  return model(jnp.swapaxes(log_mel, 1, 2))


@dataclasses.dataclass
class VocosVocoder:
  name: str
  graphdef: nnx.GraphDef
  state: nnx.State

  def vocode(self, normalized_mel: np.ndarray) -> np.ndarray:
    return np.asarray(vocode_with_vocos(self.graphdef, self.state, jnp.asarray(normalized_mel)))


@functools.cache
def pseudo_inverse_filterbank() -> np.ndarray:
  """(n_fft // 2 + 1, n_mels): maps mel magnitudes back to linear-frequency magnitudes."""
  return np.linalg.pinv(audio.mel_filterbank().T.astype(np.float64))


@dataclasses.dataclass
class GriffinLimVocoder:
  name: str = GRIFFIN_LIM_NAME
  n_iter: int = 32

  def vocode(self, normalized_mel: np.ndarray) -> np.ndarray:
    mel = np.exp(audio.denormalize(np.asarray(normalized_mel, np.float64))).swapaxes(1, 2)
    # A clamped pseudo-inverse of the filterbank instead of librosa's non-negative least squares
    # (mel_to_stft), which took ~80% of the time; Griffin-Lim's own error dwarfs the difference.
    stft_magnitude = np.maximum(pseudo_inverse_filterbank() @ mel, 0.0)
    num_frames = mel.shape[-1]
    wave = librosa.griffinlim(
      stft_magnitude,
      n_iter=self.n_iter,
      hop_length=audio.HOP_LENGTH,
      n_fft=audio.N_FFT,
      pad_mode='reflect',
      length=(num_frames - 1) * audio.HOP_LENGTH,
      random_state=0,
    )
    # A centered STFT of T frames spans (T - 1)·hop samples; pad to Vocos's T·hop samples.
    return audio.fit_length(wave, num_frames * audio.HOP_LENGTH).astype(np.float32)


def load_vocoder(checkpoint_dir: str | None) -> Vocoder:
  """The Vocos vocoder in `checkpoint_dir`, or Griffin-Lim when it is None."""
  if checkpoint_dir is None:
    return GriffinLimVocoder()
  model = load_vocos(checkpoint_dir)
  project_mels = (audio.N_MELS, audio.N_FFT, audio.HOP_LENGTH)
  if (model.embed.in_features, model.n_fft, model.hop_length) != project_mels:
    raise CheckpointError(
      f'{checkpoint_dir}: Vocos does not take the project mels '
      f'({audio.N_MELS} bands, n_fft {audio.N_FFT}, hop {audio.HOP_LENGTH})'
    )
  graphdef, state = nnx.split(model)
  return VocosVocoder(f'vocos ({checkpoint_dir})', graphdef, state)
