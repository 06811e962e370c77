"""Kaldi-compatible log-mel filterbank in JAX, as BEATs computes its input.

BEATs calls torchaudio.compliance.kaldi.fbank(wave * 2**15, num_mel_bins=128,
sample_frequency=16000, frame_length=25, frame_shift=10) with the other options at their defaults:
no dither, DC offset removed, pre-emphasis 0.97, povey window, frames snipped to the signal's edges,
FFT size rounded up to a power of two, power spectrum, mel filters over 20 Hz – Nyquist, log with a
float32-epsilon floor.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
FRAME_LENGTH = 400  # 25 ms
FRAME_SHIFT = 160  # 10 ms
FFT_SIZE = 512  # FRAME_LENGTH rounded up to a power of two
NUM_MEL_BINS = 128
LOW_FREQ = 20.0
PREEMPHASIS = 0.97
LOG_FLOOR = float(np.finfo(np.float32).eps)
WAVE_SCALE = 2.0**15
BEATS_FBANK_MEAN = 15.41663
BEATS_FBANK_STD = 6.55582


def num_fbank_frames(num_samples):
  """Frames kaldi's snip-edges framing gives for `num_samples` samples (int or integer array)."""
  return np.maximum(0, 1 + (num_samples - FRAME_LENGTH) // FRAME_SHIFT)


def kaldi_mel_scale(freq):
  return 1127.0 * np.log(1.0 + freq / 700.0)


@functools.cache
def kaldi_mel_filterbank(num_mel_bins: int = NUM_MEL_BINS) -> np.ndarray:
  """(FFT_SIZE // 2 + 1, num_mel_bins) triangular filters, linear in kaldi's mel scale.

  Kaldi builds the filters over the FFT_SIZE // 2 bins below Nyquist; the Nyquist bin gets weight 0.
  With 128 bins, bin 3 is narrower than the FFT bin spacing and holds no FFT bin: torchaudio (hence
  BEATs) keeps it as an all-zero filter, so that feature is always log(LOG_FLOOR).
  """
  mel_low = kaldi_mel_scale(LOW_FREQ)
  mel_high = kaldi_mel_scale(SAMPLE_RATE / 2)
  mel_step = (mel_high - mel_low) / (num_mel_bins + 1)
  edges = mel_low + mel_step * np.arange(num_mel_bins + 2)
  left, center, right = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  bin_mel = kaldi_mel_scale(SAMPLE_RATE / FFT_SIZE * np.arange(FFT_SIZE // 2))[None, :]
  rising = (bin_mel - left) / (center - left)
  falling = (right - bin_mel) / (right - center)
  filters = np.maximum(0.0, np.minimum(rising, falling))
  return np.pad(filters, ((0, 0), (0, 1))).T.astype(np.float32)


@functools.cache
def povey_window() -> np.ndarray:
  """Kaldi's 'povey' window: a symmetric Hann window raised to the power 0.85."""
  n = np.arange(FRAME_LENGTH)
  hann = 0.5 - 0.5 * np.cos(2 * math.pi * n / (FRAME_LENGTH - 1))
  return (hann**0.85).astype(np.float32)


def frame_signal(wave: jax.Array) -> jax.Array:
  """(..., samples) -> (..., frames, FRAME_LENGTH) with snip-edges framing."""
  frames = int(num_fbank_frames(wave.shape[-1]))
  index = np.arange(frames)[:, None] * FRAME_SHIFT + np.arange(FRAME_LENGTH)[None, :]
  return wave[..., index]


def preemphasize(frames: jax.Array) -> jax.Array:
  """x[i] - 0.97 x[i-1] within each frame, kaldi taking x[-1] = x[0]."""
  previous = jnp.concatenate([frames[..., :1], frames[..., :-1]], axis=-1)
  return frames - PREEMPHASIS * previous


def kaldi_fbank(wave: jax.Array, num_mel_bins: int = NUM_MEL_BINS) -> jax.Array:
  """Kaldi log-mel filterbank of (..., samples) 16 kHz audio on the int16 scale.

  Returns (..., frames, num_mel_bins) float32, frames = num_fbank_frames(samples).
  """
  frames = frame_signal(wave.astype(jnp.float32))
  frames = frames - frames.mean(axis=-1, keepdims=True)
  frames = preemphasize(frames) * povey_window()
  spectrum = jnp.fft.rfft(frames, n=FFT_SIZE, axis=-1)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  mel = power @ kaldi_mel_filterbank(num_mel_bins)
  return jnp.log(jnp.maximum(mel, LOG_FLOOR))


def beats_fbank(wave: jax.Array) -> jax.Array:
  """BEATs' normalized input features of (..., samples) 16 kHz audio in [-1, 1].

  Returns (..., frames, 128) float32.
  """
  fbank = kaldi_fbank(wave * WAVE_SCALE)
  return (fbank - BEATS_FBANK_MEAN) / (2 * BEATS_FBANK_STD)
