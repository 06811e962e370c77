"""Tests for the embedded corpus: eSpeak NG speech and synthetic sound events."""

import json
from pathlib import Path

import espeakng_loader
import librosa
import numpy as np
import pytest
import scipy.signal
import soundfile as sf

from agrepa_jax.data import synth

SAMPLE_RATE = 24000
NUM_SPEECH = 5
MAX_SPEECH_SECONDS = 1.8  # below the longest utterances, so some sentences get replaced


def power_spectrum(wave: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return np.fft.rfftfreq(wave.size, 1.0 / SAMPLE_RATE), np.abs(np.fft.rfft(wave)) ** 2


def spectral_flatness(wave: np.ndarray, low: float = 100.0, high: float = 10000.0) -> float:
  """Geometric over arithmetic mean of the power in [low, high] Hz: 1 white noise, ~0 a tone."""
  frequency, power = power_spectrum(wave)
  band = power[(frequency >= low) & (frequency <= high)] + 1e-20
  return float(np.exp(np.mean(np.log(band))) / np.mean(band))


def dominant_frequency(wave: np.ndarray) -> float:
  frequency, power = power_spectrum(wave * np.hanning(wave.size))
  return float(frequency[np.argmax(power)])


def file_bytes(directory: Path) -> dict[str, bytes]:
  return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope='module')
def speech_dir(tmp_path_factory) -> Path:
  out_dir = tmp_path_factory.mktemp('speech')
  synth.synthesize_speech(out_dir, NUM_SPEECH, seed=0, max_seconds=MAX_SPEECH_SECONDS)
  return out_dir


@pytest.fixture(scope='module')
def audio_dir(tmp_path_factory) -> Path:
  out_dir = tmp_path_factory.mktemp('audio')
  synth.synthesize_sound_events(out_dir, 12, seed=0, seconds=2.0)
  return out_dir


# Sentences and voices.


def test_spread_combinations_are_distinct_and_cover_small_products():
  combinations = synth.spread_combinations((('a', 'b'), ('x', 'y', 'z')), 6)
  assert combinations[0] == ('a', 'x')
  assert sorted(combinations) == [(a, x) for a in 'ab' for x in 'xyz']
  with pytest.raises(ValueError):
    synth.spread_combinations((('a', 'b'),), 3)


def test_english_sentences_are_short_distinct_and_complete():
  sentences = synth.english_sentences()
  assert len(sentences) == len(synth._SENTENCE_TEMPLATES) * synth.SENTENCES_PER_TEMPLATE == 420
  assert len(set(sentences)) == len(sentences)
  assert sentences[0] == 'The small dog walked to the river.'
  for sentence in sentences:
    assert sentence[0].isupper() and sentence[-1] in '.?'
    assert 4 <= len(sentence.split()) <= 7
    assert '{' not in sentence


def test_configured_voices_exist_in_espeak_data():
  data = Path(espeakng_loader.get_data_path())
  accents = {path.name.lower() for path in (data / 'lang' / 'gmw').iterdir()}
  assert set(synth.ACCENTS) <= accents
  for variant in synth.MALE_VARIANTS + synth.FEMALE_VARIANTS:
    assert (data / 'voices' / '!v' / variant).is_file()
  assert len(synth.espeak_voice_names()) == 6 * 12


def test_espeak_worker_speaks_every_accent_and_survives_an_unknown_voice():
  with synth.EspeakProcess() as espeak:
    with pytest.raises(RuntimeError, match='no voice'):
      espeak.speak('Hello.', 'xx-nowhere', 175, 50, 50)
    for accent in synth.ACCENTS:
      samples = espeak.speak('Hello there.', f'{accent}+f1', 175, 50, 50)
      assert samples.dtype == np.int16
      assert 0.4 < samples.size / synth.ESPEAK_SAMPLE_RATE < 1.5
      assert np.abs(samples).max() > 3000


def median_f0(samples: np.ndarray) -> float:
  wave = samples.astype(np.float32) / 32768.0
  return float(np.median(librosa.yin(wave, fmin=60, fmax=400, sr=synth.ESPEAK_SAMPLE_RATE)))


def test_espeak_rate_and_variants_change_duration_and_pitch():
  sentence = 'The ferry leaves at nine.'
  with synth.EspeakProcess() as espeak:
    slow = espeak.speak(sentence, 'en-us+m1', 100, 50, 50)
    fast = espeak.speak(sentence, 'en-us+m1', 300, 50, 50)
    female = espeak.speak(sentence, 'en-us+f1', 175, 50, 50)
  assert slow.size > 2 * fast.size
  assert 70 < median_f0(slow) < 140
  assert median_f0(female) > 1.4 * median_f0(slow)


def test_breath_noise_follows_its_seed():
  request = ('Please close the gate.', 'en+f5', 170, 50, 50)
  with synth.EspeakProcess() as espeak:
    first = espeak.speak(*request, noise_seed=7)
  with synth.EspeakProcess() as espeak:
    same = espeak.speak(*request, noise_seed=7)
  with synth.EspeakProcess() as espeak:
    other = espeak.speak(*request, noise_seed=8)
  np.testing.assert_array_equal(first, same)
  assert first.shape == other.shape and not np.array_equal(first, other)


# Speech clips.


def test_speech_manifest_and_transcripts(speech_dir):
  entries = synth.read_manifest(speech_dir)
  assert [entry['id'] for entry in entries] == [f'speech_{i:05d}' for i in range(NUM_SPEECH)]
  first_line = json.loads((speech_dir / synth.MANIFEST_NAME).read_text().splitlines()[0])
  assert first_line['path'] == 'speech_00000.wav'
  for entry in entries:
    assert set(entry) == {'id', 'path', 'domain', 'text', 'voice', 'rate', 'pitch', 'seconds'}
    assert entry['domain'] == 'speech'
    assert entry['text'] in synth.english_sentences()
    assert (speech_dir / f'{entry["id"]}.txt').read_text() == entry['text'] + '\n'
    assert entry['voice'] in synth.espeak_voice_names()
    assert synth.RATE_RANGE_WPM[0] <= entry['rate'] <= synth.RATE_RANGE_WPM[1]
    assert synth.PITCH_RANGE[0] <= entry['pitch'] <= synth.PITCH_RANGE[1]


def test_speech_clips_fit_and_sound_like_speech(speech_dir):
  for entry in synth.read_manifest(speech_dir):
    info = sf.info(entry['path'])
    assert (info.samplerate, info.channels, info.subtype) == (SAMPLE_RATE, 1, 'PCM_16')
    wave, _ = sf.read(entry['path'])
    assert entry['seconds'] == wave.size / SAMPLE_RATE
    assert 0.5 < entry['seconds'] <= MAX_SPEECH_SECONDS
    assert np.sqrt(np.mean(wave**2)) > 0.03
    frequency, power = power_spectrum(wave)
    speech_band = (frequency > 100) & (frequency < 4000)
    assert power[speech_band].sum() / power.sum() > 0.8
    assert power[frequency > 11000].sum() / power.sum() < 1e-3


def test_speech_is_deterministic_per_seed(speech_dir, tmp_path):
  synth.synthesize_speech(tmp_path / 'same', NUM_SPEECH, seed=0, max_seconds=MAX_SPEECH_SECONDS)
  assert file_bytes(tmp_path / 'same') == file_bytes(speech_dir)
  synth.synthesize_speech(tmp_path / 'other', NUM_SPEECH, seed=1, max_seconds=MAX_SPEECH_SECONDS)
  other = file_bytes(tmp_path / 'other')
  assert other['speech_00000.wav'] != file_bytes(speech_dir)['speech_00000.wav']


# Sound events.


@pytest.mark.parametrize('name', sorted(synth.SOUND_EVENT_CLASSES))
def test_every_event_class_is_bounded_and_audible(name):
  for seed in range(5):
    event = synth.SOUND_EVENT_CLASSES[name](np.random.default_rng(seed), SAMPLE_RATE)
    assert 0.1 * SAMPLE_RATE <= event.size <= 2.0 * SAMPLE_RATE
    assert np.all(np.isfinite(event))
    assert 0.5 < np.abs(event).max() <= 1.0 + 1e-9
    assert abs(event[0]) < 0.05 and abs(event[-1]) < 0.05


def test_tone_has_a_dominant_spectral_peak_and_noise_a_flat_spectrum():
  for seed in range(5):
    tone = synth.tone_event(np.random.default_rng(seed), SAMPLE_RATE)
    frequency, power = power_spectrum(tone)
    peak = frequency[np.argmax(power)]
    assert 200 <= peak <= 4000
    assert power[np.abs(frequency - peak) < 10].sum() / power.sum() > 0.95
    assert spectral_flatness(tone) < 0.01
    noise = synth.noise_burst_event(np.random.default_rng(seed), SAMPLE_RATE)
    assert spectral_flatness(noise) > 0.2


def test_chirp_sweeps_at_least_an_octave():
  for seed in range(5):
    chirp = synth.chirp_event(np.random.default_rng(seed), SAMPLE_RATE)
    tenth = chirp.size // 10
    start = dominant_frequency(chirp[tenth : 2 * tenth])
    end = dominant_frequency(chirp[-2 * tenth : -tenth])
    assert max(start, end) / min(start, end) > 1.5


def test_siren_frequency_swings_and_thump_is_low():
  for seed in range(5):
    siren = synth.siren_event(np.random.default_rng(seed), SAMPLE_RATE)
    window = SAMPLE_RATE // 20
    peaks = [
      dominant_frequency(siren[i : i + window]) for i in range(0, siren.size - window, window)
    ]
    assert max(peaks) / min(peaks) > 1.2
    thump = synth.thump_event(np.random.default_rng(seed), SAMPLE_RATE)
    frequency, power = power_spectrum(thump)
    assert power[frequency < 250].sum() / power.sum() > 0.8


def test_click_train_and_harmonic_note_are_periodic():
  for seed in range(5):
    clicks = synth.click_train_event(np.random.default_rng(seed), SAMPLE_RATE)
    loud = np.flatnonzero(np.abs(clicks) > 0.5)
    click_starts = loud[np.diff(loud, prepend=-SAMPLE_RATE) > 0.01 * SAMPLE_RATE]
    intervals = np.diff(click_starts)
    assert len(click_starts) >= 2
    assert intervals.max() - intervals.min() <= 1
    assert SAMPLE_RATE / 40 <= intervals.mean() <= SAMPLE_RATE / 4
    note = synth.harmonic_note_event(np.random.default_rng(seed), SAMPLE_RATE)
    frequency, power = power_spectrum(note * np.hanning(note.size))
    peaks, _ = scipy.signal.find_peaks(power, height=1e-4 * power.max(), distance=20)
    harmonic_number = frequency[peaks] / frequency[peaks[0]]
    assert len(peaks) >= 3
    np.testing.assert_allclose(harmonic_number, np.round(harmonic_number), atol=0.03)


def test_sound_event_manifest_and_clips(audio_dir):
  entries = synth.read_manifest(audio_dir)
  assert [entry['id'] for entry in entries] == [f'audio_{i:05d}' for i in range(12)]
  labels_seen = set()
  for entry in entries:
    assert set(entry) == {'id', 'path', 'domain', 'labels', 'seconds'}
    assert entry['domain'] == 'audio' and entry['seconds'] == 2.0
    assert 1 <= len(entry['labels']) <= 3
    assert entry['labels'] == sorted(set(entry['labels']))
    assert set(entry['labels']) <= set(synth.SOUND_EVENT_CLASSES)
    labels_seen.update(entry['labels'])
    wave, sample_rate = sf.read(entry['path'])
    assert (sample_rate, wave.size) == (SAMPLE_RATE, 2 * SAMPLE_RATE)
    assert 0.05 < np.abs(wave).max() <= 1.0
  assert len(labels_seen) >= 6


def test_sound_events_are_deterministic_per_seed(audio_dir, tmp_path):
  synth.synthesize_sound_events(tmp_path / 'same', 12, seed=0, seconds=2.0)
  assert file_bytes(tmp_path / 'same') == file_bytes(audio_dir)
  synth.synthesize_sound_events(tmp_path / 'other', 12, seed=1, seconds=2.0)
  other = file_bytes(tmp_path / 'other')
  assert other['audio_00000.wav'] != file_bytes(audio_dir)['audio_00000.wav']


# The whole corpus.


def test_corpus_is_built_once_and_rebuilt_when_arguments_or_files_change(tmp_path, monkeypatch):
  root = tmp_path / 'corpus'
  entries = synth.build_embedded_corpus(root, 2, 3, seed=4, seconds=2.0, progress=False)
  assert [entry['domain'] for entry in entries] == ['speech'] * 2 + ['audio'] * 3
  assert json.loads((root / synth.STAMP_NAME).read_text()) == dict(
    num_speech=2, num_audio=3, seed=4, sample_rate=SAMPLE_RATE, seconds=2.0
  )

  def must_not_run(*args, **kwargs):
    raise AssertionError('a complete corpus was generated again')

  def build_without_generating(num_audio: int) -> list[dict]:
    with monkeypatch.context() as patch:
      patch.setattr(synth, 'synthesize_speech', must_not_run)
      patch.setattr(synth, 'synthesize_sound_events', must_not_run)
      return synth.build_embedded_corpus(root, 2, num_audio, seed=4, seconds=2.0, progress=False)

  assert build_without_generating(num_audio=3) == entries
  Path(entries[-1]['path']).unlink()
  with pytest.raises(AssertionError, match='generated again'):
    build_without_generating(num_audio=3)
  assert synth.build_embedded_corpus(root, 2, 3, seed=4, seconds=2.0, progress=False) == entries
  assert Path(entries[-1]['path']).exists()
  with pytest.raises(AssertionError, match='generated again'):
    build_without_generating(num_audio=4)
