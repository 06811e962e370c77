import json
import pathlib
import types

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from agrepa_jax import audio, config_base, metrics, teachers, train
from agrepa_jax.data import spec
from agrepa_jax.generation import evaluate, vocos, wer
from agrepa_jax.teachers.base import TeacherSpec
from tests.helpers import fake_record, write_fake_store

CLIP_SECONDS = 0.5
CLIP_SAMPLES = 12000  # 47 mel frames
SPEECH_TEXTS = ('Hello, world!', 'hello there world', 'good morning 42')


# ----------------------------------------------------------------------------------------------- WER


def test_normalization_lowercases_strips_punctuation_and_spells_numbers():
  assert (
    wer.normalize_text("  Don't STOP—it's 7:05, Mr. O’Brien!\n")
    == 'dont stop its seven zero five mr obrien'
  )
  assert (
    wer.normalize_text('Twenty-one 21 1,000 3rd')
    == 'twenty one twenty one one zero zero zero three rd'
  )
  assert wer.normalize_text('10 90 99 100') == 'ten ninety ninety nine one zero zero'
  assert wer.normalize_text('...') == ''


def test_word_edits_count_substitutions_deletions_and_insertions():
  edits = lambda ref, hyp: wer.word_edits(ref.split(), hyp.split())
  assert edits('a b c d', 'a b c d') == wer.EditCounts(0, 0, 0, 4)
  assert edits('a b c d', 'a x c d') == wer.EditCounts(1, 0, 0, 4)
  assert edits('a b c d', 'a c d') == wer.EditCounts(0, 1, 0, 4)
  assert edits('a b c d', 'a b y c d z') == wer.EditCounts(0, 0, 2, 4)
  assert edits('a b c d', 'b x d') == wer.EditCounts(1, 1, 0, 4)
  assert edits('a b', '') == wer.EditCounts(0, 2, 0, 2)
  assert edits('', 'a') == wer.EditCounts(0, 0, 1, 0)


def test_corpus_wer_is_total_edits_over_total_reference_words():
  references = ['the cat sat', 'on the mat today', 'Good morning, 42!']
  hypotheses = ['the cat sat', 'on a mat', 'good morning forty two']
  # 0 edits / 3 words; 'the' → 'a' and 'today' deleted, 2 / 4; 0 / 4 after normalization: 2 / 11 overall
  assert wer.corpus_wer(references, hypotheses) == pytest.approx(2 / 11)
  assert wer.corpus_edits(references, hypotheses) == wer.EditCounts(1, 1, 0, 11)
  with pytest.raises(ValueError, match='2 references but 1'):
    wer.corpus_wer(['a', 'b'], ['a'])


# ------------------------------------------------------------------------------------------ helpers


def test_select_clips_takes_domains_in_turn_or_the_listed_ids(tmp_path):
  domain = np.array([0, 0, 0, 0, 1, 1])
  source = types.SimpleNamespace(
    clips=[{'id': f'c{i}'} for i in range(6)],
    domains=('speech', 'audio'),
    indices_of_domain=lambda d: np.flatnonzero(domain == d),
  )
  np.testing.assert_array_equal(evaluate.select_clips(source, 5), [0, 4, 1, 5, 2])
  listing = tmp_path / 'ids.txt'
  listing.write_text('c5\n\nc1\n')
  np.testing.assert_array_equal(evaluate.select_clips(source, 5, str(listing)), [5, 1])
  listing.write_text('c1\nnope\n')
  with pytest.raises(ValueError, match='nope'):
    evaluate.select_clips(source, 5, str(listing))


def test_mel_l1_scores_only_audio_frames_after_the_prompt():
  real = np.zeros((2, 6, 3), np.float32)
  generated = np.arange(6, dtype=np.float32)[None, :, None] * np.ones((2, 6, 3), np.float32)
  # clip 0: frames 0..3 hold audio (4·256 samples), prompt 1 -> frames 1, 2, 3; clip 1: all, prompt 4
  l1 = evaluate.mel_l1(real, generated, np.array([4 * 256, 6 * 256]), np.array([1, 4]))
  np.testing.assert_allclose(l1, [2.0, 4.5])


# ---------------------------------------------------------------------------- trained tiny workdir


class FakeTeacher:
  """Deterministic 16 kHz 'embedding': per 20 ms frame its log energy, mean |x| and zero crossings."""

  spec = TeacherSpec(name='fake', dim=3, sample_rate=16000, frames_per_second=50.0)

  def features(self, waves, num_samples):
    frames = waves[:, : waves.shape[1] // 320 * 320].reshape(len(waves), -1, 320)
    crossings = (np.diff(np.sign(frames), axis=-1) != 0).mean(-1)
    feats = np.stack([np.log(1e-4 + (frames**2).mean(-1)), np.abs(frames).mean(-1), crossings], -1)
    mask = np.arange(frames.shape[1])[None, :] * 320 < num_samples[:, None]
    return feats.astype(np.float32), mask


class FakeVocoder:
  """Fast stand-in for Griffin-Lim (whose NNLS mel inversion takes seconds per batch on a CPU):
  fixed noise shaped by each frame's mean mel energy, T·256 samples per clip."""

  name = 'fake vocoder'

  def vocode(self, normalized_mel):
    envelope = np.exp(audio.denormalize(np.asarray(normalized_mel))).mean(-1)
    noise = np.random.default_rng(0).standard_normal(envelope.shape[1] * audio.HOP_LENGTH)
    return (np.repeat(envelope, audio.HOP_LENGTH, axis=1) * noise).astype(np.float32)


class FakeTranscriber:
  """Hears 'hello world' in every clip, and records what it was given."""

  def __init__(self):
    self.calls = []

  def transcribe(self, audio_16k, num_samples):
    self.calls.append((audio_16k.shape, np.asarray(num_samples).copy()))
    return ['hello world'] * len(audio_16k)


def synth_clip(rng, domain: str, num_samples: int) -> np.ndarray:
  t = np.arange(CLIP_SAMPLES) / audio.SAMPLE_RATE
  if domain == 'speech':
    f0 = rng.uniform(100, 200) * (1 + 0.2 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(f0) / audio.SAMPLE_RATE
    wave = sum(np.sin(k * phase) / k for k in range(1, 6))
  else:
    wave = rng.standard_normal(CLIP_SAMPLES) * (np.sin(2 * np.pi * rng.uniform(2, 6) * t) > 0)
  wave = np.where(np.arange(CLIP_SAMPLES) < num_samples, wave, 0.0)
  return (wave / np.abs(wave).max()).astype(np.float32)


def write_fake_cache(config, root: pathlib.Path):
  """The feature store `prepare.prepare(config)` looks for, written directly (no teachers, no
  synthesis)."""
  rng = np.random.default_rng(0)
  counts = {'train': 8, 'heldout': 3}  # per domain
  dims = {'speech': 4, 'audio': 4}
  batch_spec = spec.batch_spec(config, dims)
  splits = {}
  for split, per_domain in counts.items():
    splits[split] = []
    for i in range(per_domain):
      for d, domain in enumerate(('speech', 'audio')):
        clip_id = f'{split}-{domain}-{i}'
        length = CLIP_SAMPLES - 3000 * (i % 2)
        wave = synth_clip(rng, domain, length)
        path = root / 'clips' / f'{clip_id}.wav'
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, wave, audio.SAMPLE_RATE, subtype='FLOAT')
        text = SPEECH_TEXTS[i % len(SPEECH_TEXTS)] if domain == 'speech' else ''
        tokens = rng.integers(0, config.model.vocab_size, (1, batch_spec.num_tokens))
        mel = np.asarray(audio.log_mel(jnp.asarray(wave)))
        record = fake_record(batch_spec, clip_id, d, mel, tokens, length, rng, text)
        splits[split].append({**record, 'path': str(path)})
  write_fake_store(config, splits, dims)


def tiny_config(root: pathlib.Path):
  config = config_base.base_config()
  config.update(
    num_steps=2,
    batch_size=8,
    log_every=1,
    eval_every=0,
    checkpoint_every=2,
    async_checkpointing=False,
  )
  config.model.update(
    num_layers=2, width=32, num_heads=4, token_dim=16, vocab_size=16, time_freq_dim=16, dropout=0.0
  )
  config.optim.update(learning_rate=1e-3, schedule='constant')
  config.data.update(cache_dir=str(root / 'cache'), clip_seconds=CLIP_SECONDS)
  config.sample.update(num_points=4, prompt_seconds=0.1, num_clips=3, batch_size=4)
  config.eval.update(num_clips=6, batch_size=4, fad_inf_points=3)
  return config


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny_run')
  config = tiny_config(root)
  write_fake_cache(config, root)
  train.train_and_evaluate(config, root / 'workdir')
  return config, root / 'workdir'


@pytest.fixture
def fake_models(monkeypatch):
  transcriber = FakeTranscriber()
  monkeypatch.setattr(teachers, 'load_teacher', lambda name, checkpoint=None: FakeTeacher())
  monkeypatch.setattr(evaluate, 'load_transcriber', lambda checkpoint: (transcriber, ''))
  monkeypatch.setattr(vocos, 'load_vocoder', lambda checkpoint: FakeVocoder())
  return transcriber


@pytest.mark.slow
def test_run_sample_writes_wavs_spectrograms_and_a_listening_page(trained):
  config, workdir = trained
  out = evaluate.run_sample(config, workdir)
  assert out == workdir / 'samples'
  ids = ['heldout-speech-0', 'heldout-audio-0', 'heldout-speech-1']  # domains in turn
  page = (out / 'index.html').read_text()
  assert 'griffin-lim' in page and 'step 2' in page
  for clip_id, length in zip(ids, (12000, 12000, 9000)):
    assert clip_id in page
    for kind in ('generated', 'reference', 'original'):
      wave, rate = sf.read(out / f'{clip_id}_{kind}.wav')
      assert rate == 24000 and len(wave) == length and np.abs(wave).max() > 0.01
      assert f'src="{clip_id}_{kind}.wav"' in page
    assert (out / f'{clip_id}.png').read_bytes()[:4] == b'\x89PNG'
  assert 'hello there world' in page  # transcripts shown
  assert sorted(p.name for p in out.iterdir()) == sorted(
    ['index.html']
    + [
      f'{i}{suffix}'
      for i in ids
      for suffix in ('.png', '_generated.wav', '_reference.wav', '_original.wav')
    ]
  )


@pytest.mark.slow
def test_run_eval_writes_fad_wer_and_mel_l1_to_eval_json_and_metrics(trained, fake_models):
  config, workdir = trained
  report = evaluate.run_eval(config, workdir)
  assert json.loads((workdir / 'eval.json').read_text()) == json.loads(json.dumps(report))
  scores = report['metrics']
  assert report['step'] == 2 and report['counts'] == {'all': 6, 'speech': 3, 'audio': 3, 'wer': 3}
  assert report['embeddings'] == ['fake'] and report['vocoder'] == 'fake vocoder'
  expected = {
    f'{metric}/{group}'
    for metric in ('mel_l1', 'fad/fake', 'fad_original/fake')
    for group in ('all', 'speech', 'audio')
  }
  expected |= {'fad_inf/fake/all', 'wer/generated', 'wer/resynthesis', 'wer/original'}
  assert set(scores) == expected  # FAD∞ needs 4 clips per group: only 'all' has them
  assert all(np.isfinite(v) for v in scores.values())
  assert scores['mel_l1/all'] > 0.1 and scores['fad/fake/all'] > 0
  # 'hello world' for every clip: 0 edits / 2 words, 1 / 3, 4 / 4 ('good morning forty two')
  assert scores['wer/generated'] == scores['wer/original'] == pytest.approx(5 / 9)
  assert [c[0] for c in fake_models.calls] == [(3, 8000)] * 3  # 16 kHz, one batch per audio kind
  np.testing.assert_array_equal(fake_models.calls[0][1], [8000, 6000, 8000])
  assert [t['id'] for t in report['transcripts']] == [
    'heldout-speech-0',
    'heldout-speech-1',
    'heldout-speech-2',
  ]
  assert len(report['fad_infinity']['fake/all']['points']) == 3

  row = metrics.read_metrics(workdir / 'metrics.jsonl')[-1]
  assert row['step'] == 2 and row['eval/num_clips'] == 6
  assert row['eval/fad/fake/all'] == pytest.approx(scores['fad/fake/all'])


@pytest.mark.slow
def test_run_eval_is_deterministic_and_skips_wer_without_a_transcriber(
  trained, fake_models, monkeypatch
):
  config, workdir = trained
  first = evaluate.run_eval(config, workdir)['metrics']
  monkeypatch.setattr(
    evaluate, 'load_transcriber', lambda checkpoint: (None, 'no Whisper transcriber (test)')
  )
  report = evaluate.run_eval(config, workdir)
  assert report['wer_skipped'] == 'no Whisper transcriber (test)' and report['transcripts'] == []
  assert {k: v for k, v in first.items() if not k.startswith('wer/')} == report['metrics']
