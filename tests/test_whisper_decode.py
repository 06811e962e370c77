"""Greedy Whisper decoding in JAX against CTranslate2's greedy `generate` on eSpeak speech."""

import librosa
import numpy as np
import pytest

from agrepa_jax.data import synth
from agrepa_jax.teachers import bundled_whisper_tiny_en, whisper
from agrepa_jax.teachers.whisper_decode import WhisperGreedyTranscriber, until_end_of_text

TINY_EN = bundled_whisper_tiny_en()
SENTENCES = (
  'The quick brown fox jumps over the lazy dog.',
  'Please call Stella and ask her to bring these things with her from the store.',
  'Seven green boxes were left by the river in the morning.',
  'My sister reads a short story every night.',
)


@pytest.fixture(scope='module')
def utterances():
  with synth.EspeakProcess() as espeak:
    waves = [
      librosa.resample(
        espeak.speak(text, 'en-us', 175, 50, 50).astype(np.float32) / 2**15,
        orig_sr=synth.ESPEAK_SAMPLE_RATE,
        target_sr=16000,
      )
      for text in SENTENCES
    ]
  batch = np.zeros((len(waves), max(w.size for w in waves)), np.float32)
  for row, wave in zip(batch, waves):
    row[: wave.size] = wave
  return batch


@pytest.fixture(scope='module')
def transcriber():
  return WhisperGreedyTranscriber(TINY_EN)


def ctranslate2_greedy(audio: np.ndarray, prompt: list[int]) -> list[list[int]]:
  ctranslate2 = pytest.importorskip('ctranslate2')
  window = np.zeros((audio.shape[0], 30 * 16000), np.float32)
  window[:, : audio.shape[1]] = audio
  log_mel = np.array(whisper.whisper_log_mel(window, 80))
  model = ctranslate2.models.Whisper(TINY_EN, device='cpu', compute_type='float32')
  results = model.generate(
    ctranslate2.StorageView.from_array(log_mel), [prompt] * len(audio), beam_size=1
  )
  return [result.sequences_ids[0] for result in results]


def test_prompt_is_english_only_start_of_transcript(transcriber):
  assert transcriber.prompt == [50257, 50362]  # <|startoftranscript|> <|notimestamps|>
  assert transcriber.end_of_text == 50256
  assert transcriber.suppressed.sum() == 90 and transcriber.suppressed_first[[220, 50256]].all()


def test_greedy_tokens_equal_ctranslate2(transcriber, utterances):
  reference = ctranslate2_greedy(utterances, transcriber.prompt)
  ours = transcriber.tokens(utterances, max_new_tokens=48)
  assert ours == reference
  assert ours[0] == [383, 2068, 7586, 21831, 4391, 625, 262, 16931, 299, 519, 13]
  texts = transcriber.transcribe(
    utterances, np.array([utterances.shape[1]] * len(SENTENCES)), max_new_tokens=48
  )
  assert texts[0] == ' The quick brown fox jump over the lazy nog.'
  assert texts[1].startswith(' Please call stellar and ask')
  # A shorter budget gives the first tokens of the same greedy path.
  assert transcriber.tokens(utterances[:1], max_new_tokens=4) == [reference[0][:4]]
  # Samples past num_samples are silence: cutting the first sentence after 1.2 s changes its text.
  cut = transcriber.transcribe(utterances[:1], np.array([19200]), max_new_tokens=48)[0]
  assert cut != texts[0] and cut.startswith(' The quick')


def test_until_end_of_text_and_limits(transcriber):
  assert until_end_of_text(np.array([5, 7, 50256, 50256]), 50256) == [5, 7]
  assert until_end_of_text(np.array([5, 7]), 50256) == [5, 7]
  with pytest.raises(ValueError, match='exceed the text context of 448'):
    transcriber.tokens(np.zeros((1, 16000), np.float32), max_new_tokens=447)
  with pytest.raises(ValueError, match='exceed the 480000-sample Whisper window'):
    transcriber.tokens(np.zeros((1, 480001), np.float32))
