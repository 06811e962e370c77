"""Audio front end: loading, the 24 kHz log-mel target representation and its inverse scaling.

The mel parameters are the Vocos "mel-24khz" ones (docs/method.md, audio front end); `log_mel` is a
JAX function so it can run batched on an accelerator, and equals librosa's melspectrogram with the
same settings.
"""

import functools
import io

import jax
import jax.numpy as jnp
import librosa
import numpy as np
import soundfile as sf
from etils import epath

SAMPLE_RATE = 24000
N_FFT = 1024
HOP_LENGTH = 256
N_MELS = 100
F_MAX = 12000.0
LOG_FLOOR = 1e-5
MEL_MEAN = -5.8843
MEL_STD = 2.2615


class AudioDecodeError(ValueError):
  """An audio file that cannot be decoded or holds no samples."""


def num_frames(num_samples: int, hop_length: int = HOP_LENGTH) -> int:
  """Frames of a centered STFT of `num_samples` samples (a 10 s clip at 24 kHz gives 938)."""
  return 1 + num_samples // hop_length


MIN_SAMPLES = N_FFT  # a clip shorter than one STFT window (≈ 43 ms) holds no usable frame


def load_audio(path, sample_rate: int = SAMPLE_RATE, seconds: float | None = None) -> np.ndarray:
  """Mono float32 waveform at `sample_rate`, peak-normalized, fitted to `seconds` (if given)."""
  try:
    data = epath.Path(path).read_bytes()
  except OSError as e:
    raise AudioDecodeError(f'{path}: cannot read the file ({e})') from e
  wave = decode_audio(data, str(path), sample_rate)
  if seconds is not None:
    wave = fit_length(wave, round(seconds * sample_rate))
  return wave


def decode_audio(data: bytes, name: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
  """An encoded audio file's bytes -> mono float32 at `sample_rate`, peak-normalized.

  Raises AudioDecodeError naming `name` and the reason for whatever makes a file unusable: it
  cannot be decoded, holds no samples or fewer than one STFT window, or holds NaN or infinite
  samples (checked before resampling, so at any rate).
  """
  if not data:
    raise AudioDecodeError(f'{name}: file holds no audio samples (empty file)')
  try:
    wave, file_rate = sf.read(io.BytesIO(data), dtype='float32', always_2d=True)
  except Exception:  # soundfile raises several types; m4a/AAC, webm and others are FFmpeg's
    try:
      wave, file_rate = decode_with_ffmpeg(data)
    except Exception as e:  # noqa: BLE001 PyAV raises one type per FFmpeg error
      reason = getattr(e, 'strerror', None) or e
      raise AudioDecodeError(f'{name}: cannot decode audio ({reason})') from e
  if wave.size == 0:
    raise AudioDecodeError(f'{name}: file holds no audio samples')
  if not np.all(np.isfinite(wave)):
    raise AudioDecodeError(f'{name}: audio holds NaN or infinite samples')
  wave = wave.mean(axis=1)
  if file_rate != sample_rate:
    wave = librosa.resample(wave, orig_sr=file_rate, target_sr=sample_rate, res_type='soxr_hq')
  if len(wave) < MIN_SAMPLES * sample_rate // SAMPLE_RATE:
    raise AudioDecodeError(
      f'{name}: too short ({len(wave)} samples at {sample_rate} Hz, fewer than one frame)'
    )
  peak = np.abs(wave).max()
  if peak > 0:
    wave = wave / peak
  return wave.astype(np.float32)


def decode_with_ffmpeg(data: bytes) -> tuple[np.ndarray, int]:
  """(samples, channels) float32 and the sample rate of an audio file that soundfile (wav, flac,
  mp3, ogg) does not read — m4a/AAC, webm, ... — through FFmpeg (PyAV)."""
  import av

  with av.open(io.BytesIO(data)) as container:
    if not container.streams.audio:
      raise ValueError('no audio stream')
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format='fltp', layout=stream.layout, rate=stream.rate)
    frames = [r.to_ndarray() for f in container.decode(stream) for r in resampler.resample(f)]
    frames += [r.to_ndarray() for r in resampler.resample(None)]
  if not frames:
    return np.zeros((0, 1), np.float32), stream.rate
  return np.concatenate(frames, axis=1).T.astype(np.float32), stream.rate


def wav_bytes(wave: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
  """A mono float waveform in [-1, 1] as the bytes of a 16-bit PCM WAV file."""
  buffer = io.BytesIO()
  sf.write(buffer, wave, sample_rate, format='WAV', subtype='PCM_16')
  return buffer.getvalue()


def fit_length(wave: np.ndarray, length: int) -> np.ndarray:
  """Crops or zero-pads the last axis to `length` samples."""
  wave = wave[..., :length]
  pad = [(0, 0)] * (wave.ndim - 1) + [(0, length - wave.shape[-1])]
  return np.pad(wave, pad)


@functools.cache
def mel_filterbank() -> np.ndarray:
  """(n_fft // 2 + 1, n_mels) HTK-scale, unnormalized triangular filters over 0–12 kHz."""
  return librosa.filters.mel(
    sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0.0, fmax=F_MAX, htk=True, norm=None
  ).T.astype(np.float32)


def stft_magnitude(wave: jax.Array, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH) -> jax.Array:
  """|STFT| of (..., samples), centered with reflect padding and a periodic Hann window.

  Returns (..., frames, n_fft // 2 + 1).
  """
  pad = [(0, 0)] * (wave.ndim - 1) + [(n_fft // 2, n_fft // 2)]
  padded = jnp.pad(wave, pad, mode='reflect')
  frames = 1 + (padded.shape[-1] - n_fft) // hop_length
  index = jnp.arange(frames)[:, None] * hop_length + jnp.arange(n_fft)[None, :]
  window = jnp.asarray(np.hanning(n_fft + 1)[:-1], dtype=wave.dtype)
  spectrum = jnp.fft.rfft(padded[..., index] * window, axis=-1)
  return jnp.abs(spectrum)


@jax.jit
def log_mel(wave: jax.Array) -> jax.Array:
  """Normalized log-mel (..., frames, 100) of 24 kHz audio (..., samples): the model's target x1."""
  mel = stft_magnitude(wave) @ jnp.asarray(mel_filterbank())
  return normalize(jnp.log(jnp.maximum(mel, LOG_FLOOR)))


def normalize(log_mel_values):
  return (log_mel_values - MEL_MEAN) / MEL_STD


def denormalize(normalized):
  """Inverse of `normalize`: back to the natural-log mel that the Vocos mel-24khz vocoder takes."""
  return normalized * MEL_STD + MEL_MEAN
