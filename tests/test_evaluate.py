import json
import pathlib
import types

import jax.numpy as jnp
import numpy as np
import pytest
import soundfile as sf

from agrepa_jax import audio, checkpoint, config_base, metrics, teachers, train
from agrepa_jax.data import spec
from agrepa_jax.generation import evaluate, normalizer, vocos, wer
from agrepa_jax.teachers.base import TeacherSpec
from tests.helpers import fake_record, write_fake_store

CLIP_SECONDS = 0.5
CLIP_SAMPLES = 12000  # 47 mel frames
SPEECH_TEXTS = ('Hello, world!', 'hello there world', 'good morning 42')


# ---------------------------------------------------------------------------------------------- WER


# Numbers, currency, abbreviations and titles, contractions, British spellings, diacritics, fillers.
PARITY_SENTENCES = (
  'Twenty-one people paid $20 million for it.',
  'He was born in 1960 and died in the 1990s.',
  'It costs £3.50, or three pounds fifty.',
  'The 21st century began on the first of January 2001.',
  "Dr. Smith and Mr. O'Brien met Mrs. Jones on St. Patrick's day.",
  "I can't believe they won't come; let's go, y'all.",
  "We're gonna need about one hundred and twenty five chairs.",
  "The colour of the theatre's centre is grey, I realise.",
  "She'll have travelled two thousand three hundred kilometres.",
  'About 5% of them, or five per cent, agreed.',
  'Call me at one oh one double five triple nine.',
  "It's two point five times bigger, minus three degrees.",
  'He owes me five dollars and seven cents.',
  'Uh, um, hmm, I think [inaudible] it was (probably) fine.',
  "The organisation's programme was cancelled in the autumn.",
  'Lt. Col. Brown and Capt. Green arrived at 7:30 p.m.',
  'Three and a half hours later, the sixes and sevens were sorted.',
  "It's 3.14159 to five decimal places.",
  'She was ranked twelfth, then fifth, then third.',
  'The €1,000,000 prize went to the nineteen eighties band.',
  "They'd been there since the 1800s, I'd say.",
  'Sen. Jones, Gov. Lee and Pres. Kim spoke for ninety minutes.',
  'The defence analysed the catalogue in its entirety.',
  'One of the ones I liked cost $0.75.',
  "The neighbour's favourite flavour is vanilla.",
  'Approximately 2,500 metres of the 10,000 metre race.',
  'He said: "Naïve façade, café crème, Ærø and Straße."',
  'Version 2.0.1 of the software shipped on 2024-03-15.',
  'Forty two thousand, six hundred and seventeen votes.',
  'Jr. and Sr. members of the Hon. society, Esq.',
  "We'll pay twenty dollars, or £15, whichever is fewer.",
  'Double o seven has a licence to kill.',
  'Eight hundred thousand millionth of a second.',
  "He realised the tyre's pressure was low at 32 psi.",
  'A 50-50 chance at one in a million odds.',
  "I'm sure you've seen the first two hundred pages.",
  'The 1st, 2nd, 3rd and 4th places were all taken.',
  'Minus twenty, plus forty and negative five.',
)


def random_phrases(count: int, seed: int = 0) -> list[str]:
  """Seeded word salads of number words, symbols and spellings: corner cases of number reading."""
  vocabulary = (
    'one two three five nine ten eleven twelve nineteen twenty thirty ninety hundred thousand '
    'million oh zero o first second third fifth twelfth twentieth hundredth thousands sixes '
    'twenties and a half point double triple minus plus negative dollars dollar pounds euro cents '
    "cent per percent the $ £ 3 12 1.5 2,000 1960s 21st . , - mr dr st colour realise can't it's"
  ).split()
  rng = np.random.default_rng(seed)
  return [' '.join(rng.choice(vocabulary, rng.integers(1, 9))) for _ in range(count)]


@pytest.fixture(scope='module')
def whisper_normalizer():
  english_normalizer = pytest.importorskip('transformers.models.whisper.english_normalizer')
  # The spelling table is a plain dict argument: no download needed.
  return english_normalizer.EnglishTextNormalizer(normalizer.english_spellings())


def test_normalizer_matches_whisper_english_normalizer_of_transformers(whisper_normalizer):
  texts = list(PARITY_SENTENCES) + random_phrases(1000)
  ours = [normalizer.normalize_english(t) for t in texts]
  assert ours == [whisper_normalizer(t) for t in texts]
  assert len(PARITY_SENTENCES) >= 30


def test_normalizer_hand_cases():
  normalize = lambda text: normalizer.normalize_english(text).strip()
  assert normalize('Twenty-one people paid $20 million.') == '21 people paid $20000000'
  assert normalize('2024') == normalize('twenty twenty four') == '2024'
  assert normalize('two thousand and twenty four') == '2024'
  assert normalize('five dollars and seven cents') == '$5.07'
  assert normalize('ten per cent, 5%') == '10% 5%'
  assert normalize("Dr. Brown can't, O'Brien") == 'doctor brown can not 0 brien'  # o is zero
  assert normalize('The colour of the theatre') == 'the color of the theater'
  assert normalize('one oh one, the 21st, one') == '101 the 21st one'
  assert normalize('uh [noise] fine (aside)') == 'fine'


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
  # 0 edits / 3 words; 'the' → 'a' and 'today' deleted, 2 / 4; both 'good morning 42', 0 / 3
  assert wer.corpus_wer(references, hypotheses) == pytest.approx(2 / 10)
  assert wer.corpus_edits(references, hypotheses) == wer.EditCounts(1, 1, 0, 10)
  with pytest.raises(ValueError, match='2 references but 1'):
    wer.corpus_wer(['a', 'b'], ['a'])


# ------------------------------------------------------------------------------------------ helpers


def test_select_clips_takes_domains_in_turn_or_the_listed_ids_that_fit_a_clip(tmp_path):
  domain = np.array([0, 0, 0, 0, 1, 1, 0])
  source = types.SimpleNamespace(
    clips=[{'id': f'c{i}'} for i in range(7)],
    domains=('speech', 'audio'),
    indices_of_domain=lambda d: np.flatnonzero(domain == d),
    arrays={'num_samples': np.array([100, 100, 100, 100, 100, 100, 101])},  # c6: a long utterance
  )
  np.testing.assert_array_equal(evaluate.select_clips(source, 6, 100), [0, 4, 1, 5, 2, 3])
  listing = tmp_path / 'ids.txt'
  listing.write_text('c5\n\nc1\n')
  np.testing.assert_array_equal(evaluate.select_clips(source, 5, 100, str(listing)), [5, 1])
  listing.write_text('c1\nnope\n')
  with pytest.raises(ValueError, match='nope'):
    evaluate.select_clips(source, 5, 100, str(listing))
  listing.write_text('c6\n')  # its transcript would describe more than the audio generated
  with pytest.raises(ValueError, match='longer than data.clip_seconds.*c6'):
    evaluate.select_clips(source, 5, 100, str(listing))
  with pytest.raises(ValueError, match='no held-out clip fits'):
    evaluate.select_clips(source, 5, 50)


def test_mel_color_range_covers_loud_clips_and_is_shared():
  quiet = np.zeros((10, 4))
  loud = np.full((10, 4), 6.0)
  loud[:, 0] = 2.0
  loud[8:] = 50.0  # frames past the audio do not count
  low, high = evaluate.mel_color_range(quiet, loud, audio_frames=8)
  assert low == pytest.approx(0.0) and high == pytest.approx(6.0)


def test_captions_are_transcripts_or_class_labels():
  clips = [
    {'id': 's1', 'domain': 'speech', 'text': 'hello', 'labels': []},
    {'id': 'a1', 'domain': 'audio', 'text': '', 'labels': ['Rain', 'Church bell']},
    {'id': 'a3', 'domain': 'audio', 'text': '', 'labels': []},
  ]
  assert evaluate.clip_captions(clips) == ['hello', 'label: Rain, Church bell', '']


def test_mel_l1_scores_only_audio_frames_after_the_prompt():
  real = np.zeros((2, 6, 3), np.float32)
  generated = np.arange(6, dtype=np.float32)[None, :, None] * np.ones((2, 6, 3), np.float32)
  # clip 0: frames 0..3 hold audio (4·256 samples), prompt 1 -> frames 1, 2, 3; clip 1: all,
  # prompt 4
  l1 = evaluate.mel_l1(real, generated, np.array([4 * 256, 6 * 256]), np.array([1, 4]))
  np.testing.assert_allclose(l1, [2.0, 4.5])


# ---------------------------------------------------------------------------- trained tiny workdir


class FakeTeacher:
  """Deterministic 16 kHz 'embedding': per 20 ms frame its log energy, mean |x| and zero
  crossings."""

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
        labels = ['siren', 'dog_bark'] if domain == 'audio' else []
        splits[split].append({**record, 'path': str(path), 'labels': labels})
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
  assert 'label: siren, dog_bark' in page  # and the audio clips' class labels
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
  counts = {'all': 6, 'speech': 3, 'audio': 3, 'wer': 3, 'with_original': 6}
  assert report['step'] == 2 and report['counts'] == counts
  assert report['clips_evaluated'].startswith('held-out clips whose whole audio fits')
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
  # 'hello world' for every clip: 0 edits / 2 words, 1 / 3, 3 / 3 ('good morning 42')
  assert scores['wer/generated'] == scores['wer/original'] == pytest.approx(4 / 8)
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
def test_an_unreadable_original_costs_its_clip_only(trained, fake_models, tmp_path):
  config, workdir = trained
  clips = checkpoint.restore_trained(config, workdir).heldout_source.clips
  original = pathlib.Path(next(c['path'] for c in clips if c['id'] == 'heldout-audio-1'))
  kept = tmp_path / original.name
  original.rename(kept)
  try:
    report = evaluate.run_eval(config, workdir)
  finally:
    kept.rename(original)
  assert report['counts']['with_original'] == 5 and report['counts']['all'] == 6
  assert 'fad_original/fake/audio' in report['metrics']  # over the 2 audio clips still readable
  assert np.isfinite(report['metrics']['wer/original'])


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
