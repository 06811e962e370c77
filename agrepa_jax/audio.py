"""Audio front end: loading, the 24 kHz log-mel target representation and its inverse scaling.

The mel parameters are the Vocos "mel-24khz" ones (docs/method.md, audio front end); `log_mel` is a
JAX function so it can run batched on an accelerator, and equals librosa's melspectrogram with the
same settings.
"""

import functools
import io
import math

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


def decode_audio(
  data: bytes, name: str, sample_rate: int = SAMPLE_RATE, via_rate: int = 0
) -> np.ndarray:
  """An encoded audio file's bytes -> mono float32 at `sample_rate`, peak-normalized.

  via_rate > 0 (data.mel_via_rate, the official front end): peak-normalized at the file's rate,
  then `official_detour`: through `via_rate` (content above via_rate / 2 is lost) to `sample_rate`.
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
  if via_rate:
    wave = official_detour(peak_normalize(wave), file_rate, via_rate, sample_rate)
  elif file_rate != sample_rate:
    wave = librosa.resample(wave, orig_sr=file_rate, target_sr=sample_rate, res_type='soxr_hq')
  if len(wave) < MIN_SAMPLES * sample_rate // SAMPLE_RATE:
    raise AudioDecodeError(
      f'{name}: too short ({len(wave)} samples at {sample_rate} Hz, fewer than one frame)'
    )
  # the official front end normalizes before resampling only: its peaks may move past 1
  return wave.astype(np.float32) if via_rate else peak_normalize(wave)


def peak_normalize(wave: np.ndarray) -> np.ndarray:
  """float32 `wave` / max |wave| (a silent wave stays zero)."""
  peak = np.abs(wave).max()
  return (wave / peak if peak > 0 else wave).astype(np.float32)


# The official front end's resamplers (torchaudio's windowed-sinc `resample`): the loader's default
# (Hann window) to 16 kHz, and the mel extractor's (Kaiser window, β of torchaudio's default) to
# 24 kHz; both with 6 zero crossings and roll-off 0.99.
OFFICIAL_LOADER_RESAMPLER = dict(window='hann', lowpass_filter_width=6, rolloff=0.99)
OFFICIAL_MEL_RESAMPLER = dict(window='kaiser', lowpass_filter_width=6, rolloff=0.99)
KAISER_BETA = 14.769656459379492


def official_detour(wave: np.ndarray, file_rate: int, via_rate: int, rate: int) -> np.ndarray:
  """The official front end's path of a (normalized) wave: `file_rate` -> `via_rate` (its loader),
  then -> `rate` (its mel extractor), each step skipped where the rates already agree."""
  if file_rate != via_rate:
    wave = sinc_resample(wave, file_rate, via_rate, **OFFICIAL_LOADER_RESAMPLER)
  if via_rate != rate:
    wave = sinc_resample(wave, via_rate, rate, **OFFICIAL_MEL_RESAMPLER)
  return wave


def sinc_kernels(
  orig: int, new: int, window: str, lowpass_filter_width: int, rolloff: float
) -> tuple[np.ndarray, int]:
  """Polyphase windowed-sinc filters (new, taps) for orig -> new (coprime), and the taps' reach.

  Output phase j reads input offsets k / orig (k from −reach to reach + orig − 1) around its
  time −j / new, weighting them by sinc(π·f·Δt)·window(f·Δt)·f / orig with the cutoff
  f = rolloff·min(orig, new) and the window over ±lowpass_filter_width zero crossings.
  """
  cutoff = min(orig, new) * rolloff
  reach = math.ceil(lowpass_filter_width * orig / cutoff)
  offsets = np.arange(-reach, reach + orig, dtype=np.float64) / orig
  times = (-np.arange(new, dtype=np.float64)[:, None] / new + offsets[None, :]) * cutoff
  times = np.clip(times, -lowpass_filter_width, lowpass_filter_width)
  if window == 'hann':
    taper = np.cos(times * math.pi / lowpass_filter_width / 2) ** 2
  elif window == 'kaiser':
    taper = np.i0(KAISER_BETA * np.sqrt(1 - (times / lowpass_filter_width) ** 2)) / np.i0(
      KAISER_BETA
    )
  else:
    raise ValueError(f"window {window!r}: expected 'hann' or 'kaiser'")
  return np.sinc(times) * taper * cutoff / orig, reach


def sinc_resample(
  wave: np.ndarray,
  orig_rate: int,
  new_rate: int,
  window: str = 'hann',
  lowpass_filter_width: int = 6,
  rolloff: float = 0.99,
) -> np.ndarray:
  """(..., N) at `orig_rate` -> (..., ⌈N·new/orig⌉) at `new_rate`: torchaudio's windowed-sinc
  resampling (zero beyond the ends), as the official code's loader and mel extractor run it."""
  divisor = math.gcd(orig_rate, new_rate)
  orig, new = orig_rate // divisor, new_rate // divisor
  kernels, reach = sinc_kernels(orig, new, window, lowpass_filter_width, rolloff)
  length = wave.shape[-1]
  padded = np.pad(
    np.asarray(wave, np.float64), [(0, 0)] * (wave.ndim - 1) + [(reach, reach + orig)]
  )
  starts = np.arange(0, padded.shape[-1] - kernels.shape[1] + 1, orig)
  windows = padded[..., starts[:, None] + np.arange(kernels.shape[1])]  # (..., frames, taps)
  out = np.einsum('...ft,pt->...fp', windows, kernels).reshape(*wave.shape[:-1], -1)
  return out[..., : math.ceil(new * length / orig)].astype(np.float32)


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
