import jax.numpy as jnp
import librosa
import numpy as np
import pytest
import soundfile as sf

from agrepa_jax import audio
from agrepa_jax.data import cache, pipeline, sources, tokenizer
from agrepa_jax.teachers.base import TeacherSpec


def test_log_mel_equals_librosa():
  rng = np.random.default_rng(0)
  t = np.arange(3 * audio.SAMPLE_RATE) / audio.SAMPLE_RATE
  wave = (0.5 * np.sin(2 * np.pi * 440 * t * (1 + t)) + 0.05 * rng.standard_normal(t.size)).astype(
    np.float32
  )
  wave[:4000] = 0.0  # silence exercises the log floor
  reference = librosa.feature.melspectrogram(
    y=wave,
    sr=24000,
    n_fft=1024,
    hop_length=256,
    win_length=1024,
    center=True,
    pad_mode='reflect',
    power=1.0,
    n_mels=100,
    fmin=0.0,
    fmax=12000.0,
    htk=True,
    norm=None,
  )
  reference = (np.log(np.maximum(reference, 1e-5)) + 5.8843) / 2.2615
  ours = np.asarray(audio.log_mel(jnp.asarray(wave)))
  assert ours.shape == (audio.num_frames(wave.size), 100) == reference.T.shape
  np.testing.assert_allclose(ours, reference.T, atol=1e-4)
  np.testing.assert_allclose(audio.denormalize(audio.normalize(ours)), ours, atol=5e-6)


def test_ten_second_clip_has_938_frames():
  assert audio.num_frames(10 * audio.SAMPLE_RATE) == 938


def write_wave(path, seconds=0.5, rate=16000, freq=300.0):
  t = np.arange(int(seconds * rate)) / rate
  sf.write(path, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate)


def test_load_audio_resamples_normalizes_and_fits(tmp_path):
  write_wave(tmp_path / 'a.wav', seconds=0.5, rate=16000)
  wave = audio.load_audio(tmp_path / 'a.wav', seconds=1.0)
  assert wave.shape == (24000,) and np.isclose(np.abs(wave).max(), 1.0, atol=1e-3)
  assert np.all(wave[12100:] == 0)


@pytest.mark.parametrize('content', [b'', b'RIFF\x00\x00garbage that is not audio'])
def test_bad_audio_files_raise_errors_that_name_the_file(tmp_path, content):
  path = tmp_path / 'broken.wav'
  path.write_bytes(content)
  with pytest.raises(audio.AudioDecodeError, match='broken.wav'):
    audio.load_audio(path)


class FakeTeacher:
  """Frames = 8 band energies of the waveform at 50 frames/s: cheap but content-dependent."""

  spec = TeacherSpec('fake', 8, 16000, 50.0)

  def features(self, batch, num_samples):
    frames = batch.shape[1] // 320
    chunks = batch[:, : frames * 320].reshape(len(batch), frames, 8, 40)
    mask = np.arange(frames)[None] * 320 < num_samples[:, None]
    return np.log1p(np.square(chunks).mean(-1)), mask


def make_clip_directories(tmp_path):
  speech, other = tmp_path / 'speech', tmp_path / 'audio'
  for folder in (speech, other):
    folder.mkdir()
  for i in range(6):
    write_wave(speech / f's{i}.wav', freq=200 + 50 * i)
    write_wave(other / f'a{i}.flac', freq=1000 + 300 * i, rate=24000)
  (speech / 'empty.wav').write_bytes(b'')
  (other / 'corrupt.wav').write_bytes(b'not audio at all')
  return sources.directory_clips(str(speech), 'speech') + sources.directory_clips(
    str(other), 'audio'
  )


SETTINGS = dict(
  clip_seconds=0.6,
  heldout_fraction=0.25,
  token_rate=10.0,
  codebook_size=4,
  num_codebooks=2,
  seed=0,
  chunk_size=4,
  teacher_frames=True,
)


def test_cache_skips_and_counts_unreadable_and_empty_files(tmp_path):
  clips = make_clip_directories(tmp_path)
  teachers = {'speech': FakeTeacher(), 'audio': FakeTeacher()}
  meta = cache.build_cache(
    clips, tmp_path / 'cache', SETTINGS, ('speech', 'audio'), lambda: teachers
  )
  assert sorted(s['id'] for s in meta['skipped']) == ['audio/corrupt', 'speech/empty']
  assert sum(meta['num_clips'].values()) == 12 and meta['teacher_dims'] == {'speech': 8, 'audio': 8}
  train = pipeline.CachedSplit(
    tmp_path / 'cache' / 'train', ('speech', 'audio'), teacher_frames=True
  )
  assert len(train) == meta['num_clips']['train']
  record = train[0]
  assert record['mel'].shape == (audio.num_frames(14400), 100)
  assert record['tokens'].shape == (2, 6) and record['tokens'].max() < 4
  assert record['teacher_frames']['speech'].shape[-1] == 8
  own, other = ('speech', 'audio')[record['domain']], ('audio', 'speech')[record['domain']]
  assert np.all(record['teacher'][other] == 0) and np.any(record['teacher'][own] != 0)
  # rows hold the clip they claim: the mel of a cached clip equals the mel of its file
  clip = train.clips[0]
  expected = audio.log_mel(jnp.asarray(audio.fit_length(audio.load_audio(clip['path']), 14400)))
  np.testing.assert_allclose(record['mel'], np.asarray(expected), atol=2e-3)


class CountingTeacher(FakeTeacher):
  calls = 0

  def features(self, batch, num_samples):
    CountingTeacher.calls += 1
    return super().features(np.asarray(batch), num_samples)


def test_interrupted_cache_build_resumes_without_recomputing_finished_chunks(tmp_path):
  clips = make_clip_directories(tmp_path)
  teachers = {'speech': CountingTeacher(), 'audio': CountingTeacher()}
  directory = tmp_path / 'cache'
  cache.build_cache(clips, directory, SETTINGS, ('speech', 'audio'), lambda: teachers)
  complete = {p.name: p.read_bytes() for p in (directory / 'train').iterdir()}
  calls_for_all = CountingTeacher.calls
  # simulate a build that died after the first two chunks
  for p in list(directory.glob('chunks/*'))[2:] + [directory / 'COMPLETE']:
    p.unlink()
  CountingTeacher.calls = 0
  cache.build_cache(clips, directory, SETTINGS, ('speech', 'audio'), lambda: teachers)
  assert 0 < CountingTeacher.calls < calls_for_all
  assert {p.name: p.read_bytes() for p in (directory / 'train').iterdir()} == complete


def test_pool_to_rate_hand_case():
  frames = np.arange(10, dtype=np.float32)[:, None]
  np.testing.assert_allclose(tokenizer.pool_to_rate(frames, 5)[:, 0], [0.5, 2.5, 4.5, 6.5, 8.5])


def test_residual_kmeans_recovers_separated_clusters():
  rng = np.random.default_rng(0)
  centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
  labels = rng.integers(0, 3, 300)
  points = centers[labels] + 0.1 * rng.standard_normal((300, 2))
  codebooks = tokenizer.fit_codebooks(points, 3, 2, seed=0)
  tokens = tokenizer.assign_tokens(points, codebooks)
  assert tokens.shape == (2, 300)
  # first-stage units are a relabelling of the true clusters
  mapping = {l: tokens[0][labels == l][0] for l in range(3)}
  assert len(set(mapping.values())) == 3
  assert all(np.all(tokens[0][labels == l] == mapping[l]) for l in range(3))
  with pytest.raises(ValueError, match='codebook_size'):
    tokenizer.fit_codebooks(points[:2], 3, 1, seed=0)


class ListSource:
  def __init__(self, domains):
    self.domains = ('speech', 'audio')
    self._domain = np.asarray(domains)

  def __len__(self):
    return len(self._domain)

  def __getitem__(self, i):
    return {'index': np.int64(i), 'domain': self._domain[i]}

  def indices_of_domain(self, d):
    return np.flatnonzero(self._domain == d)


def test_training_batches_are_domain_balanced_deterministic_and_resumable():
  source = ListSource([0] * 30 + [1] * 6)  # 5:1 imbalance on disk
  iterator = iter(pipeline.training_dataset(source, 8, seed=3))
  batches = [next(iterator) for _ in range(20)]
  domains = np.concatenate([b['domain'] for b in batches])
  assert (domains == 0).sum() == (domains == 1).sum() == 80
  again = iter(pipeline.training_dataset(source, 8, seed=3))
  assert all(np.array_equal(next(again)['index'], b['index']) for b in batches)
  state_iter = iter(pipeline.training_dataset(source, 8, seed=3))
  for _ in range(7):
    next(state_iter)
  state = state_iter.get_state()
  fresh = iter(pipeline.training_dataset(source, 8, seed=3))
  fresh.set_state(state)
  np.testing.assert_array_equal(next(fresh)['index'], batches[7]['index'])
  # each domain is a fresh permutation every epoch: the 6 audio clips appear once per 6 draws
  audio_order = np.concatenate([b['index'][b['domain'] == 1] for b in batches])
  assert all(sorted(audio_order[k : k + 6]) == list(range(30, 36)) for k in range(0, 78, 6))


def test_directory_clips_reads_librispeech_transcripts(tmp_path):
  chapter = tmp_path / '19' / '198'
  chapter.mkdir(parents=True)
  write_wave(chapter / '19-198-0000.flac')
  write_wave(chapter / '19-198-0001.flac')
  (chapter / '19-198.trans.txt').write_text(
    '19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n'
  )
  clips = sources.directory_clips(str(tmp_path), 'speech')
  assert [(c.id, c.text) for c in clips] == [
    ('speech/19/198/19-198-0000', 'NORTHANGER ABBEY'),
    ('speech/19/198/19-198-0001', 'THIS LITTLE WORK'),
  ]
  with pytest.raises(FileNotFoundError, match='nowhere'):
    sources.directory_clips(str(tmp_path / 'nowhere'), 'speech')


def test_external_token_files(tmp_path):
  np.save(tmp_path / 'a.npy', np.array([1, 2, 3, 4]))
  np.save(tmp_path / 'b.npy', np.array([[5, 6], [7, 8]]))
  tokens = cache.read_token_files(str(tmp_path), ['a'], 1, 2, vocab_size=8)
  np.testing.assert_array_equal(tokens, [[[1, 3]]])
  with pytest.raises(ValueError, match='b.npy'):
    cache.read_token_files(str(tmp_path), ['b'], 1, 2, vocab_size=8)
  with pytest.raises(
    ValueError, match=r'b.npy: token ids in \[5, 8\] are outside 0..7 \(model.vocab_size\)'
  ):
    cache.read_token_files(str(tmp_path), ['b'], 2, 2, vocab_size=8)
  with pytest.raises(FileNotFoundError, match='missing'):
    cache.read_token_files(str(tmp_path), ['missing'], 1, 2, vocab_size=8)
