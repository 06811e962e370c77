"""The embedded default corpus: speech from eSpeak NG and procedurally generated sound events.

Both halves are made on first use, offline and without any download, so the project runs end to
end on a fresh machine. Same arguments and seed give bit-identical files.

eSpeak NG keeps synthesis state in C globals that carry over from one utterance to the next (the
pitch-flutter and waveform phases) and that neither espeak_Terminate nor espeak_Initialize resets,
so in-process output depends on everything spoken before. Each `synthesize_speech` call therefore
drives its own fresh eSpeak process (`python -m agrepa_jax.data.synth`), which initialises eSpeak
once and answers one utterance per request; the requests, including the seed of the breath noise
that eSpeak would otherwise seed from the clock, are a function of the corpus seed alone.
"""

import ctypes
import json
import math
import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

import librosa
import numpy as np
import soundfile as sf
from tqdm import tqdm

MANIFEST_NAME = 'manifest.jsonl'
STAMP_NAME = 'corpus.json'
ESPEAK_SAMPLE_RATE = 22050

# eSpeak NG API constants (speak_lib.h).
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_PARAM_RATE = 1
_PARAM_PITCH = 3
_PARAM_RANGE = 4

# English accents shipped with espeak-ng-data (lang/gmw) and the voice variants (voices/!v) that use
# the default formant synthesizer; the Klatt variants are left out because a second Klatt utterance
# in one process crashes this build.
ACCENTS = ('en', 'en-us', 'en-gb-x-rp', 'en-gb-scotland', 'en-029', 'en-gb-x-gbclan')
MALE_VARIANTS = ('m1', 'm2', 'm3', 'm4', 'm5', 'm6', 'm7')
FEMALE_VARIANTS = ('f1', 'f2', 'f3', 'f4', 'f5')
RATE_RANGE_WPM = (145, 205)
PITCH_RANGE = (30, 70)
INTONATION_RANGE = (30, 90)

# Sentence templates: each slot is filled from a word list; see `english_sentences`.
_NAMES = (
  'Anna',
  'Ben',
  'Clara',
  'David',
  'Elena',
  'Felix',
  'Grace',
  'Hugo',
  'Iris',
  'Jonas',
  'Kate',
  'Leo',
  'Maya',
  'Nick',
  'Olga',
  'Paul',
)
_NUMBER_WORDS = (
  'two',
  'three',
  'four',
  'five',
  'six',
  'seven',
  'eight',
  'nine',
  'ten',
  'eleven',
  'twelve',
)
_WHEN = (
  'today',
  'yesterday',
  'last week',
  'this morning',
  'at noon',
  'on Monday',
  'before lunch',
  'after dinner',
)
_OPENABLES = (
  'window',
  'door',
  'drawer',
  'gate',
  'cupboard',
  'box',
  'curtain',
  'suitcase',
  'oven',
  'fridge',
)
_SENTENCE_TEMPLATES = (
  (
    'The {} {} {} to the {}.',
    (
      (
        'small',
        'quiet',
        'old',
        'young',
        'brown',
        'grey',
        'happy',
        'tired',
        'clever',
        'lazy',
        'hungry',
        'little',
      ),
      ('dog', 'cat', 'horse', 'goat', 'rabbit', 'duck', 'fox', 'sheep', 'mouse', 'bird'),
      ('walked', 'ran', 'hurried', 'wandered', 'raced', 'crept', 'strolled', 'trotted'),
      (
        'river',
        'market',
        'garden',
        'station',
        'bridge',
        'village',
        'harbour',
        'school',
        'forest',
        'library',
      ),
    ),
  ),
  (
    '{} found {} {} {}.',
    (
      _NAMES,
      _NUMBER_WORDS,
      (
        'apples',
        'coins',
        'shells',
        'books',
        'stones',
        'letters',
        'cups',
        'pencils',
        'tickets',
        'candles',
      ),
      _WHEN,
    ),
  ),
  (
    'Please {} the {} {}.',
    (
      ('open', 'close', 'check', 'clean', 'fix', 'move'),
      _OPENABLES,
      ('now', 'again', 'for me', 'quickly', 'tonight'),
    ),
  ),
  (
    'Is the {} {} {}?',
    (
      _OPENABLES,
      ('ready', 'empty', 'broken', 'clean', 'warm', 'open', 'locked', 'full'),
      ('yet', 'now', 'again', 'already', 'today'),
    ),
  ),
  (
    '{} likes {} with {}.',
    (
      _NAMES,
      ('bread', 'rice', 'soup', 'toast', 'fish', 'pasta', 'eggs', 'salad'),
      ('honey', 'butter', 'cheese', 'lemon', 'pepper', 'garlic', 'beans', 'milk'),
    ),
  ),
  (
    'The {} {} {}.',
    (
      ('rain', 'wind', 'snow', 'fog', 'storm', 'frost'),
      ('stopped', 'returned', 'began', 'ended', 'eased', 'grew worse'),
      _WHEN,
    ),
  ),
  (
    "The {} {} at {} o'clock.",
    (
      ('train', 'bus', 'ferry', 'plane', 'tram', 'coach'),
      ('leaves', 'arrives', 'stops', 'returns'),
      _NUMBER_WORDS + ('one',),
    ),
  ),
)
SENTENCES_PER_TEMPLATE = 60


def spread_combinations(
  word_lists: tuple[tuple[str, ...], ...], count: int
) -> list[tuple[str, ...]]:
  """`count` distinct combinations of one word per list, spread evenly over the cross product.

  Combination k is the (k * stride)-th element of the product in mixed radix; a stride coprime to
  the product size makes the picks distinct, and one near the golden ratio of it spreads them.
  """
  sizes = [len(words) for words in word_lists]
  total = math.prod(sizes)
  if count > total:
    raise ValueError(f'asked for {count} combinations of a product with {total}')
  stride = int(total * 0.618) or 1
  while math.gcd(stride, total) != 1:
    stride += 1
  combinations = []
  for k in range(count):
    index = k * stride % total
    words = []
    for words_in_slot, size in zip(reversed(word_lists), reversed(sizes)):
      index, digit = divmod(index, size)
      words.append(words_in_slot[digit])
    combinations.append(tuple(reversed(words)))
  return combinations


def english_sentences() -> list[str]:
  """The built-in list of short English sentences the speech clips read (a few hundred)."""
  sentences = []
  for template, word_lists in _SENTENCE_TEMPLATES:
    for words in spread_combinations(word_lists, SENTENCES_PER_TEMPLATE):
      sentences.append(template.format(*words))
  return sentences


def espeak_voice_names() -> list[str]:
  """Every accent+variant voice the speech clips draw from, e.g. 'en-us+f2'."""
  return [
    f'{accent}+{variant}' for accent in ACCENTS for variant in MALE_VARIANTS + FEMALE_VARIANTS
  ]


# ---------------------------------------------------------------------------------------------
# eSpeak NG: the worker process (runs as __main__) and the parent's handle on it.

_espeak_library = None
_collected_chunks: list[bytes] = []


def _collect_samples(samples, num_samples, _events) -> int:
  if samples and num_samples > 0:
    _collected_chunks.append(ctypes.string_at(samples, num_samples * 2))
  return 0  # keep synthesizing


_SYNTH_CALLBACK = ctypes.CFUNCTYPE(
  ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)(_collect_samples)


def _initialised_espeak() -> ctypes.CDLL:
  """Loads and initialises eSpeak NG once per process (synchronous mode, samples to a callback)."""
  global _espeak_library
  if _espeak_library is not None:
    return _espeak_library
  import espeakng_loader

  library = ctypes.CDLL(espeakng_loader.get_library_path())
  library.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
  library.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
  library.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
  library.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
  library.espeak_Synth.argtypes = [
    ctypes.c_char_p,
    ctypes.c_size_t,
    ctypes.c_uint,
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint,
    ctypes.c_void_p,
    ctypes.c_void_p,
  ]
  rate = library.espeak_Initialize(
    _AUDIO_OUTPUT_SYNCHRONOUS, 0, espeakng_loader.get_data_path().encode(), 0
  )
  if rate != ESPEAK_SAMPLE_RATE:
    raise RuntimeError(
      f'eSpeak NG initialisation returned {rate}, expected {ESPEAK_SAMPLE_RATE} Hz'
    )
  library.espeak_SetSynthCallback(_SYNTH_CALLBACK)
  _espeak_library = library
  return library


def _speak(request: dict) -> bytes:
  """16-bit native-endian samples at 22050 Hz for one request; raises RuntimeError on failure."""
  library = _initialised_espeak()
  status = library.espeak_SetVoiceByName(request['voice'].encode())
  if status != 0:
    raise RuntimeError(f'eSpeak NG has no voice {request["voice"]!r} (status {status})')
  for parameter, key in ((_PARAM_RATE, 'rate'), (_PARAM_PITCH, 'pitch'), (_PARAM_RANGE, 'range')):
    library.espeak_SetParameter(parameter, request[key], 0)
  # The breathy variants draw noise from a generator that eSpeak seeds with the wall-clock time.
  library.espeak_ng_SetRandSeed(request['noise_seed'])
  text = request['text'].encode()
  _collected_chunks.clear()
  status = library.espeak_Synth(text, len(text) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
  if status != 0:
    raise RuntimeError(f'eSpeak NG could not synthesize {request["text"]!r} (status {status})')
  return b''.join(_collected_chunks)


def serve_espeak(requests: BinaryIO, replies: BinaryIO) -> None:
  """Worker loop: one JSON request per line in, a length-prefixed sample block (or error) out."""
  for line in requests:
    try:
      samples = _speak(json.loads(line))
    except RuntimeError as e:
      message = str(e).encode()
      replies.write(struct.pack('<q', -len(message)) + message)
    else:
      replies.write(struct.pack('<q', len(samples)) + samples)
    replies.flush()


class EspeakProcess:
  """A private eSpeak NG worker process; use as a context manager and call `speak`."""

  def __enter__(self) -> 'EspeakProcess':
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(
      os.environ,
      PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get('PYTHONPATH')])),
    )
    self._process = subprocess.Popen(
      [sys.executable, '-m', 'agrepa_jax.data.synth'],
      env=env,
      stdin=subprocess.PIPE,
      stdout=subprocess.PIPE,
    )
    return self

  def __exit__(self, *exc_info) -> None:
    self._process.stdin.close()
    self._process.wait()
    self._process.stdout.close()

  def speak(
    self, text: str, voice: str, rate: int, pitch: int, pitch_range: int, noise_seed: int = 0
  ) -> np.ndarray:
    """int16 samples at 22050 Hz; `noise_seed` seeds the breath noise of the breathy variants."""
    request = dict(
      text=text, voice=voice, rate=rate, pitch=pitch, range=pitch_range, noise_seed=noise_seed
    )
    self._process.stdin.write(json.dumps(request).encode() + b'\n')
    self._process.stdin.flush()
    header = self._process.stdout.read(8)
    if len(header) < 8:
      raise RuntimeError(f'eSpeak NG worker exited (code {self._process.poll()})')
    (size,) = struct.unpack('<q', header)
    payload = self._process.stdout.read(abs(size))
    if size < 0:
      raise RuntimeError(payload.decode())
    return np.frombuffer(payload, dtype=np.int16)


# ---------------------------------------------------------------------------------------------
# Shared file handling.


def to_pcm16(wave: np.ndarray) -> np.ndarray:
  """float waveform in [-1, 1] to int16, clipping what lies outside."""
  return np.clip(np.round(wave * 32767.0), -32768, 32767).astype(np.int16)


def write_manifest(out_dir: Path, entries: list[dict]) -> None:
  """manifest.jsonl with paths relative to `out_dir`, so a corpus can be moved."""
  lines = [json.dumps(dict(entry, path=Path(entry['path']).name)) for entry in entries]
  (out_dir / MANIFEST_NAME).write_text(''.join(line + '\n' for line in lines))


def read_manifest(out_dir: Path) -> list[dict]:
  """Entries of manifest.jsonl with their paths resolved against `out_dir`."""
  lines = (out_dir / MANIFEST_NAME).read_text().splitlines()
  return [dict(entry, path=str(out_dir / entry['path'])) for entry in map(json.loads, lines)]


def _write_clips(
  out_dir: Path, clips: Iterator[dict], num_clips: int, description: str, progress: bool
) -> list[dict]:
  entries = list(tqdm(clips, total=num_clips, desc=description, disable=not progress))
  write_manifest(out_dir, entries)
  return entries


# ---------------------------------------------------------------------------------------------
# Speech.


def _draw_voice(rng: np.random.Generator) -> tuple[str, int, int, int]:
  """(voice name, rate in words per minute, pitch 0-100, pitch range 0-100); genders balanced."""
  accent = ACCENTS[rng.integers(len(ACCENTS))]
  variants = FEMALE_VARIANTS if rng.random() < 0.5 else MALE_VARIANTS
  variant = variants[rng.integers(len(variants))]
  rate = int(rng.integers(RATE_RANGE_WPM[0], RATE_RANGE_WPM[1] + 1))
  pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
  pitch_range = int(rng.integers(INTONATION_RANGE[0], INTONATION_RANGE[1] + 1))
  return f'{accent}+{variant}', rate, pitch, pitch_range


def _sentence_stream(rng: np.random.Generator, sentences: list[str]) -> Iterator[str]:
  """Sentences in seeded random order, reshuffled after every full pass."""
  while True:
    for index in rng.permutation(len(sentences)):
      yield sentences[index]


def _speech_clips(
  espeak: EspeakProcess,
  out_dir: Path,
  num_clips: int,
  seed: int,
  sample_rate: int,
  max_seconds: float,
) -> Iterator[dict]:
  rng = np.random.default_rng(seed)
  sentences = english_sentences()
  texts = _sentence_stream(rng, sentences)
  for index in range(num_clips):
    voice, rate, pitch, pitch_range = _draw_voice(rng)
    noise_seed = int(rng.integers(2**31))
    # A too-long utterance is replaced by another sentence rather than cut mid-word.
    for _ in range(len(sentences)):
      text = next(texts)
      native = espeak.speak(text, voice, rate, pitch, pitch_range, noise_seed)
      wave = librosa.resample(
        native.astype(np.float32) / 32768.0,
        orig_sr=ESPEAK_SAMPLE_RATE,
        target_sr=sample_rate,
        res_type='soxr_hq',
      )
      if 0 < wave.size <= max_seconds * sample_rate:
        break
    else:
      raise ValueError(f'no sentence fits in {max_seconds} s with voice {voice} at {rate} wpm')
    clip_id = f'speech_{index:05d}'
    path = out_dir / f'{clip_id}.wav'
    sf.write(path, to_pcm16(wave), sample_rate, subtype='PCM_16')
    (out_dir / f'{clip_id}.txt').write_text(text + '\n')
    yield dict(
      id=clip_id,
      path=str(path),
      domain='speech',
      text=text,
      voice=voice,
      rate=rate,
      pitch=pitch,
      seconds=wave.size / sample_rate,
    )


def synthesize_speech(
  out_dir: Path,
  num_clips: int,
  seed: int,
  sample_rate: int = 24000,
  max_seconds: float = 3.0,
  *,
  progress: bool = False,
) -> list[dict]:
  """Writes `num_clips` eSpeak NG utterances of at most `max_seconds` as <id>.wav + <id>.txt.

  Voices, rates, pitches and sentences are drawn from `seed`; returns the manifest entries
  {'id', 'path', 'domain': 'speech', 'text', 'voice', 'rate', 'pitch', 'seconds'}, also written to
  manifest.jsonl.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  with EspeakProcess() as espeak:
    clips = _speech_clips(espeak, out_dir, num_clips, seed, sample_rate, max_seconds)
    return _write_clips(out_dir, clips, num_clips, 'speech', progress)


# ---------------------------------------------------------------------------------------------
# Sound events: each generator returns one event's waveform with peak 1.


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
  return float(np.exp(rng.uniform(np.log(low), np.log(high))))


def _num_samples(
  rng: np.random.Generator, sample_rate: int, min_seconds: float, max_seconds: float
) -> int:
  return int(rng.uniform(min_seconds, max_seconds) * sample_rate)


def _fade_edges(wave: np.ndarray, sample_rate: int, fade_seconds: float = 0.01) -> np.ndarray:
  """Raised-cosine fade-in and fade-out, so events start and end without a click."""
  fade = min(int(fade_seconds * sample_rate), wave.size // 2)
  ramp = 0.5 - 0.5 * np.cos(np.linspace(0.0, np.pi, fade))
  envelope = np.ones(wave.size)
  envelope[:fade] = ramp
  envelope[wave.size - fade :] = ramp[::-1]
  return wave * envelope


def _peak_normalised(wave: np.ndarray) -> np.ndarray:
  return wave / max(np.abs(wave).max(), 1e-12)


def _phase(frequency: np.ndarray, sample_rate: int) -> np.ndarray:
  """Running phase of an oscillator whose instantaneous frequency is `frequency` (Hz per sample)."""
  return 2 * np.pi * np.cumsum(frequency) / sample_rate


def tone_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """A steady sine between 200 Hz and 4 kHz."""
  length = _num_samples(rng, sample_rate, 0.2, 1.0)
  frequency = _log_uniform(rng, 200.0, 4000.0)
  return _fade_edges(np.sin(2 * np.pi * frequency * np.arange(length) / sample_rate), sample_rate)


def chirp_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """An exponential sweep, up or down, over at least one octave."""
  length = _num_samples(rng, sample_rate, 0.3, 1.2)
  start = _log_uniform(rng, 150.0, 3000.0)
  end = start * _log_uniform(rng, 2.0, 8.0) ** rng.choice([-1.0, 1.0])
  frequency = start * (end / start) ** np.linspace(0.0, 1.0, length)
  return _fade_edges(np.sin(_phase(frequency, sample_rate)), sample_rate)


def noise_burst_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """Broadband noise between white and pink, with a fast attack and exponential decay."""
  length = _num_samples(rng, sample_rate, 0.1, 0.8)
  tilt = rng.uniform(0.0, 1.0)  # power falls as frequency**-tilt: 0 white, 1 pink
  spectrum = np.fft.rfft(rng.standard_normal(length))
  frequency = np.fft.rfftfreq(length, 1.0 / sample_rate)
  spectrum *= np.maximum(frequency, 20.0) ** (-tilt / 2)
  noise = np.fft.irfft(spectrum, n=length)
  decay = np.exp(-np.arange(length) / (rng.uniform(0.2, 0.6) * length))
  return _peak_normalised(_fade_edges(noise * decay, sample_rate, 0.005))


def click_train_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """Regular ticks at 4 to 40 per second, each a damped 1.5-5 kHz ring of about 5 ms."""
  length = _num_samples(rng, sample_rate, 0.3, 1.5)
  period = int(sample_rate / rng.uniform(4.0, 40.0))
  time = np.arange(int(0.005 * sample_rate)) / sample_rate
  click = np.sin(2 * np.pi * rng.uniform(1500.0, 5000.0) * time) * np.exp(-time / 0.001)
  wave = np.zeros(length)
  for start in range(0, length - click.size, period):
    wave[start : start + click.size] += click
  return _peak_normalised(wave)


def harmonic_note_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """A pitched note of 4 to 10 harmonics with a percussive attack and exponential decay."""
  length = _num_samples(rng, sample_rate, 0.3, 1.2)
  fundamental = _log_uniform(rng, 100.0, 800.0)
  num_harmonics = int(rng.integers(4, 11))
  rolloff = rng.uniform(0.5, 2.0)
  time = np.arange(length) / sample_rate
  wave = np.zeros(length)
  for harmonic in range(1, num_harmonics + 1):
    if harmonic * fundamental < sample_rate / 2:
      wave += harmonic**-rolloff * np.sin(2 * np.pi * harmonic * fundamental * time)
  attack = np.minimum(time / 0.01, 1.0)
  decay = np.exp(-time / rng.uniform(0.15, 0.5))
  return _peak_normalised(_fade_edges(wave * attack * decay, sample_rate))


def siren_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """A sine whose frequency swings sinusoidally around a center (frequency modulation)."""
  length = _num_samples(rng, sample_rate, 0.8, 2.0)
  center = rng.uniform(500.0, 1500.0)
  depth = rng.uniform(0.15, 0.4) * center
  swing_rate = rng.uniform(0.5, 4.0)
  time = np.arange(length) / sample_rate
  frequency = center + depth * np.sin(2 * np.pi * swing_rate * time)
  return _fade_edges(np.sin(_phase(frequency, sample_rate)), sample_rate)


def thump_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """A drum-like hit: a low sine gliding down in pitch under a fast decay, plus a noisy attack."""
  length = _num_samples(rng, sample_rate, 0.3, 0.6)
  time = np.arange(length) / sample_rate
  start, end = rng.uniform(100.0, 200.0), rng.uniform(40.0, 70.0)
  frequency = end + (start - end) * np.exp(-time / 0.03)
  body = np.sin(_phase(frequency, sample_rate)) * np.exp(-time / rng.uniform(0.05, 0.2))
  attack = 0.3 * rng.standard_normal(length) * np.exp(-time / 0.003)
  return _peak_normalised(_fade_edges(body + attack, sample_rate, 0.002))


def bell_event(rng: np.random.Generator, sample_rate: int) -> np.ndarray:
  """Inharmonic partials (free bar modes) ringing down, higher partials faster."""
  length = _num_samples(rng, sample_rate, 0.5, 1.5)
  fundamental = _log_uniform(rng, 300.0, 1200.0)
  ring = rng.uniform(0.3, 0.8)
  time = np.arange(length) / sample_rate
  wave = np.zeros(length)
  for ratio, amplitude in ((1.0, 1.0), (2.756, 0.6), (5.404, 0.35), (8.933, 0.2)):
    if ratio * fundamental < sample_rate / 2:
      partial = np.sin(2 * np.pi * ratio * fundamental * time)
      wave += amplitude * partial * np.exp(-time * ratio / ring)
  return _peak_normalised(_fade_edges(wave, sample_rate, 0.002))


SOUND_EVENT_CLASSES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
  'tone': tone_event,
  'chirp': chirp_event,
  'noise_burst': noise_burst_event,
  'click_train': click_train_event,
  'harmonic_note': harmonic_note_event,
  'siren': siren_event,
  'thump': thump_event,
  'bell': bell_event,
}


def _background_noise(rng: np.random.Generator, length: int) -> np.ndarray:
  """Quiet white noise 40 to 55 dB below full scale, in half of the clips."""
  if rng.random() < 0.5:
    return np.zeros(length)
  return 10 ** (rng.uniform(-55.0, -40.0) / 20) * rng.standard_normal(length)


def mix_sound_events(
  rng: np.random.Generator, sample_rate: int, length: int
) -> tuple[np.ndarray, list[str]]:
  """One clip of 1 to 3 events of distinct classes at random onsets and levels; (wave, labels)."""
  names = list(SOUND_EVENT_CLASSES)
  chosen = rng.choice(len(names), size=int(rng.integers(1, 4)), replace=False)
  wave = _background_noise(rng, length)
  for class_index in chosen:
    event = SOUND_EVENT_CLASSES[names[class_index]](rng, sample_rate)[:length]
    onset = int(rng.integers(0, length - event.size + 1))
    wave[onset : onset + event.size] += rng.uniform(0.1, 0.6) * event
  wave /= max(1.0, np.abs(wave).max() / 0.99)
  return wave, sorted(names[i] for i in chosen)


def _sound_event_clips(
  out_dir: Path, num_clips: int, seed: int, sample_rate: int, seconds: float
) -> Iterator[dict]:
  rng = np.random.default_rng(seed)
  length = round(seconds * sample_rate)
  for index in range(num_clips):
    wave, labels = mix_sound_events(rng, sample_rate, length)
    clip_id = f'audio_{index:05d}'
    path = out_dir / f'{clip_id}.wav'
    sf.write(path, to_pcm16(wave), sample_rate, subtype='PCM_16')
    yield dict(
      id=clip_id, path=str(path), domain='audio', labels=labels, seconds=length / sample_rate
    )


def synthesize_sound_events(
  out_dir: Path,
  num_clips: int,
  seed: int,
  sample_rate: int = 24000,
  seconds: float = 3.0,
  *,
  progress: bool = False,
) -> list[dict]:
  """Writes `num_clips` clips of mixed synthetic sound events as <id>.wav.

  Returns the manifest entries {'id', 'path', 'domain': 'audio', 'labels', 'seconds'}, also written
  to manifest.jsonl; `labels` are the sorted class names (keys of SOUND_EVENT_CLASSES) in the clip.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  clips = _sound_event_clips(out_dir, num_clips, seed, sample_rate, seconds)
  return _write_clips(out_dir, clips, num_clips, 'audio', progress)


# ---------------------------------------------------------------------------------------------
# The whole corpus.


def _corpus_is_complete(root: Path, stamp: dict) -> bool:
  stamp_path = root / STAMP_NAME
  if not stamp_path.exists() or json.loads(stamp_path.read_text()) != stamp:
    return False
  for domain in ('speech', 'audio'):
    if not (root / domain / MANIFEST_NAME).exists():
      return False
    if not all(Path(entry['path']).exists() for entry in read_manifest(root / domain)):
      return False
  return True


def build_embedded_corpus(
  root: Path,
  num_speech: int,
  num_audio: int,
  seed: int,
  sample_rate: int = 24000,
  seconds: float = 3.0,
  *,
  progress: bool = True,
) -> list[dict]:
  """Speech clips in root/speech and sound-event clips in root/audio; returns all entries.

  A corpus.json stamp records the arguments; when it matches and every listed file exists, the
  existing corpus is returned without generating anything.
  """
  root = Path(root)
  stamp = dict(
    num_speech=num_speech, num_audio=num_audio, seed=seed, sample_rate=sample_rate, seconds=seconds
  )
  if _corpus_is_complete(root, stamp):
    return read_manifest(root / 'speech') + read_manifest(root / 'audio')
  root.mkdir(parents=True, exist_ok=True)
  (root / STAMP_NAME).unlink(missing_ok=True)  # an interrupted build must not look complete
  speech = synthesize_speech(
    root / 'speech', num_speech, seed, sample_rate, seconds, progress=progress
  )
  audio = synthesize_sound_events(
    root / 'audio', num_audio, seed, sample_rate, seconds, progress=progress
  )
  (root / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + '\n')
  return speech + audio


if __name__ == '__main__':
  serve_espeak(sys.stdin.buffer, sys.stdout.buffer)
