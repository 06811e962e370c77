import dataclasses
import itertools
import pathlib

import jax.numpy as jnp
import librosa
import ml_dtypes
import numpy as np
import pytest
import soundfile as sf

from agrepa_jax import audio
from agrepa_jax.data import (
  DataError,
  features,
  pipeline,
  prepare,
  records,
  sources,
  store,
  tokenizer,
)
from agrepa_jax.data import spec as spec_lib
from agrepa_jax.teachers.base import TeacherSpec
from tests import helpers


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


class FakeTeacher:
  """Frames = 8 band energies of the waveform at 50 frames/s: cheap but content-dependent."""

  spec = TeacherSpec('fake', 8, 16000, 50.0)
  calls = 0

  def features(self, batch, num_samples):
    FakeTeacher.calls += 1
    batch = np.asarray(batch)
    frames = batch.shape[1] // 320
    chunks = batch[:, : frames * 320].reshape(len(batch), frames, 8, 40)
    mask = np.arange(frames)[None] * 320 < num_samples[:, None]
    return np.log1p(np.square(chunks).mean(-1)), mask


def write_librispeech(root, bad=True):
  """A LibriSpeech-layout tree: train-clean-100 and dev-clean, flac files and transcripts."""
  for split, speakers in (('train-clean-100', (19, 26)), ('dev-clean', (84,))):
    for speaker in speakers:
      chapter = root / 'LibriSpeech' / split / str(speaker) / '198'
      chapter.mkdir(parents=True)
      lines = []
      for u in range(4 if split.startswith('train') else 3):
        stem = f'{speaker}-198-{u:04d}'
        write_wave(chapter / f'{stem}.flac', seconds=0.4 + 0.2 * u, freq=150 + 40 * u + speaker)
        lines.append(f'{stem} WORDS OF {stem}')
      (chapter / f'{speaker}-198.trans.txt').write_text('\n'.join(lines) + '\n')
  if bad:
    chapter = root / 'LibriSpeech' / 'train-clean-100' / '19' / '198'
    nan = np.full(8000, np.nan, np.float32)
    sf.write(chapter / '19-198-0100.wav', nan, 16000, subtype='FLOAT')  # NaN at 16 kHz
    (chapter / '19-198-0101.flac').write_bytes(b'')  # empty
    write_wave(chapter / '19-198-0102.flac', seconds=0.01)  # shorter than one frame


def write_audioset(root):
  """An AudioSet-layout tree: segment CSVs, class labels, one listed clip missing, one corrupt."""
  root.mkdir(parents=True)
  (root / 'class_labels_indices.csv').write_text(
    'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/04rlf,"Music"\n'
  )
  header = '# Segments csv\n# YTID, start_seconds, end_seconds, positive_labels\n'
  train = [f'vid{i:08d}, {10 * i}.000, {10 * i + 10}.000, "/m/04rlf,/m/09x0r"' for i in range(8)]
  (root / 'balanced_train_segments.csv').write_text(header + '\n'.join(train) + '\n')
  evaluation = [f'evl{i:08d}, 30.000, 40.000, "/m/04rlf"' for i in range(3)]
  (root / 'eval_segments.csv').write_text(header + '\n'.join(evaluation) + '\n')
  (root / 'audio').mkdir()
  for i in range(7):  # vid00000007 is listed but missing
    name = f'Yvid{i:08d}_{10 * i}.000_{10 * i + 10}.000.wav'
    write_wave(root / 'audio' / name, 0.8, 24000, 900 + 100 * i)
  (root / 'audio' / 'Yvid00000006_60.000_70.000.wav').write_bytes(b'RIFF not audio')  # corrupt
  for i in range(3):
    write_wave(root / 'audio' / f'evl{i:08d}_30.wav', 0.8, 24000, 700 + 50 * i)


def corpus_config(tmp_path, **overrides):
  config = helpers.tiny_config(
    tmp_path / 'cache',
    **{
      'data.source': 'directories',
      'data.speech_dir': str(tmp_path / 'librispeech'),
      'data.audio_dir': str(tmp_path / 'audioset'),
      'data.clip_seconds': 0.5,
      'data.max_seconds': 1.0,
      'data.chunk_size': 4,
      'data.shard_clips': 4,
      'data.tokenizer_clips': 5,
      'model.vocab_size': 4,
      'num_steps': 5,
      'batch_size': 8,
      'eval_every': 0,
      'checkpoint_every': 5,
      'log_every': 1,
      **overrides,
    },
  )
  return config


@pytest.fixture
def corpora(tmp_path, monkeypatch):
  write_librispeech(tmp_path / 'librispeech')
  write_audioset(tmp_path / 'audioset')
  teachers = lambda config: {d: FakeTeacher() for d in config.data.domains}
  monkeypatch.setattr(prepare, 'load_teachers', teachers)
  return tmp_path


def store_files(directory):
  """The bytes of every file of a store but its claims and listing metadata (which name the
  scan that wrote them)."""
  return {
    str(p.relative_to(directory)): p.read_bytes()
    for p in sorted(pathlib.Path(directory).rglob('*'))
    if p.is_file() and p.parent.name != 'claims' and not p.name.endswith('.meta.json')
  }


def rescan(config, **options):
  """What --mode features does: list the corpora again and build what changed."""
  return prepare.build(
    config, store.BuildOptions(scan=f'scan-{next(SCANS)}', verify=True, **options)
  )


SCANS = itertools.count()


@pytest.mark.slow
def test_librispeech_and_audioset_build_features_train_and_resume(corpora):
  from agrepa_jax import train

  config = corpus_config(corpora)
  report = prepare.write_features_report(config, corpora / 'run')
  assert report['clips_per_domain'] == {
    'train': {'speech': 8, 'audio': 6},  # 8 good flacs; 7 clips of 8 listed, 1 corrupt
    'heldout': {'speech': 3, 'audio': 3},  # dev-clean and eval
  }
  assert report['missing_on_disk'] == {'audio': 1}
  reasons = {s['id']: s['reason'] for s in report['skipped']}
  assert set(reasons) == {
    'speech/19-198-0100',
    'speech/19-198-0101',
    'speech/19-198-0102',
    'audio/vid00000006_60',
  }
  assert 'NaN' in reasons['speech/19-198-0100'] and '0100.wav' in reasons['speech/19-198-0100']
  assert 'empty' in reasons['speech/19-198-0101'] and 'too short' in reasons['speech/19-198-0102']
  assert 'cannot decode' in reasons['audio/vid00000006_60']
  problems = {(p['id'], p['reason']) for p in report['problems']}
  assert ('audio/vid00000007_70', 'listed in balanced_train but not on disk') in problems
  assert ('speech/19-198-0101', 'utterance has no transcript line') in problems
  train_split, heldout, meta = prepare.prepare(config)
  assert meta['teacher_dims'] == {'speech': 8, 'audio': 8}
  clip = next(c for c in heldout.clips if c['id'] == 'speech/84-198-0002')
  assert clip['text'] == 'WORDS OF 84-198-0002' and clip['domain'] == 'speech'
  audio_clip = next(c for c in train_split.clips if c['id'] == 'audio/vid00000001_10')
  assert audio_clip['labels'] == ['Music', 'Speech']
  # a stored record is the clip at its native length, with its own domain's teacher target
  i = [c['id'] for c in train_split.clips].index('speech/26-198-0003')
  record = train_split.record(i)
  assert record['num_samples'] == 24000  # 1.0 s at 24 kHz (cut from 1.0 s)
  assert record['mel'].shape == (audio.num_frames(24000), 100) and record['teacher'].shape == (8,)
  expected = audio.log_mel(jnp.asarray(audio.load_audio(record['path'])[:24000]))
  np.testing.assert_allclose(np.asarray(record['mel'], np.float32), expected, atol=0.05)
  assert record['tokens'].shape == (1, 10) and record['tokens'].max() < 4

  workdir = corpora / 'run'
  train.train_and_evaluate(config, workdir)
  config.num_steps = 7
  state = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 7


def test_resumed_build_equals_clean_build_and_changes_rebuild_only_their_shards(corpora):
  config = corpus_config(corpora)
  directory = prepare.store_directory(config)
  first = rescan(config)
  clean = store_files(directory)
  # a crash: two shards and the index never finished
  sidecars = sorted(directory.glob('shards/train-*.json'))
  for p in sidecars[1:3] + [directory / 'index.json']:
    p.unlink()
  assert rescan(config)['this_run']['computed'] == 2
  assert store_files(directory) == clean
  # an utterance added and one removed: only their shards are computed again
  chapter = corpora / 'librispeech' / 'LibriSpeech' / 'train-clean-100' / '26' / '198'
  write_wave(chapter / '26-198-0004.flac', seconds=0.7, freq=333)
  (chapter / '26-198-0001.flac').unlink()
  again = rescan(config)
  assert 1 <= again['this_run']['computed'] <= 2 < first['this_run']['computed']
  assert again['clips_per_domain']['train']['speech'] == 8
  ids = [c['id'] for c in prepare.prepare(config)[0].clips]
  assert 'speech/26-198-0004' in ids and 'speech/26-198-0001' not in ids
  assert again['this_run']['listed'] == again['units'].__len__()  # a scan lists every unit


def test_a_training_start_reads_the_index_only(corpora, monkeypatch):
  config = corpus_config(corpora)
  prepare.build(config)

  def forbidden(*args):
    raise AssertionError('a training start listed the corpus')

  monkeypatch.setattr(sources, 'relative_files', forbidden)
  monkeypatch.setattr(sources, 'size_and_mtime', forbidden)
  train_split, heldout, _ = prepare.prepare(config)
  assert len(train_split) == 14 and len(heldout) == 6
  assert train_split.source.open_files() == 0  # shard files open on first read


def test_the_store_opens_with_tfds_and_without_tensorflow(corpora):
  import sys

  import tensorflow_datasets as tfds

  config = corpus_config(corpora)
  prepare.build(config)
  train_split, _, _ = prepare.prepare(config)
  source = tfds.data_source(records.DATASET, data_dir=str(prepare.store_directory(config)))
  assert len(source['train']) == len(train_split)
  example = source['train'][3]
  ours = train_split.record(3)
  assert example['id'].decode() == ours['id']
  np.testing.assert_array_equal(example['mel'].view(ml_dtypes.bfloat16), ours['mel'])
  np.testing.assert_array_equal(example['tokens'], ours['tokens'])
  assert 'tensorflow' not in sys.modules


def test_directory_without_usable_files_and_missing_domain_fail_clearly(corpora, tmp_path):
  bad = tmp_path / 'bad'
  bad.mkdir()
  (bad / 'a.wav').write_bytes(b'garbage')
  config = corpus_config(corpora, **{'data.speech_dir': str(bad)})
  with pytest.raises(ValueError, match=r"domain\(s\) \['speech'\].*no usable audio file in .*bad"):
    prepare.build(config)
  with pytest.raises(ValueError, match='data.audio_dir is empty'):
    prepare.build(corpus_config(corpora, **{'data.audio_dir': ''}))
  speech_only = corpus_config(corpora, **{'data.audio_dir': '', 'data.domains': ('speech',)})
  assert prepare.build(speech_only)['num_clips']['train'] == 8


def fixture_ids(corpora) -> dict:
  """{domain: corpus ids} of the clips the fixtures write."""
  speech = [p.stem for p in (corpora / 'librispeech').rglob('*') if p.suffix in ('.flac', '.wav')]
  youtube = [
    p.stem[1:12] if p.stem.startswith('Y') else p.stem[:11]
    for p in (corpora / 'audioset' / 'audio').iterdir()
  ]
  starts = {f'vid{i:08d}': 10 * i for i in range(8)} | {f'evl{i:08d}': 30 for i in range(3)}
  return {'speech': speech, 'audio': [f'{y}_{starts[y]}' for y in youtube]}


def test_external_tokens_are_cut_with_the_audio_at_their_own_rate(corpora):
  token_dir = corpora / 'tokens'
  config = corpus_config(corpora, **{'data.token_dir': str(token_dir), 'data.token_rate': 25.0})
  for domain, ids in fixture_ids(corpora).items():
    (token_dir / domain).mkdir(parents=True, exist_ok=True)
    for clip_id in ids:
      np.save(token_dir / domain / f'{clip_id}.npy', np.arange(60) % 4)  # 2.4 s of tokens
  train_split, _, _ = prepare.prepare(config)
  i = [c['id'] for c in train_split.clips].index('speech/26-198-0001')  # 0.6 s of audio
  record = train_split.record(i)
  np.testing.assert_array_equal(record['tokens'], [np.arange(15) % 4])  # the first 0.6 s
  row = pipeline.crop_record(record, train_split.spec, train_split.domains, start_token=5)
  np.testing.assert_array_equal(row['tokens'][0], np.r_[np.arange(5, 15) % 4, 0, 0])
  assert not (prepare.store_directory(config) / 'tokenizer').exists()


def test_crops_keep_mel_teacher_frames_and_tokens_aligned():
  batch_spec = spec_lib.BatchSpec(
    num_frames=audio.num_frames(24000),
    n_mels=2,
    num_samples=24000,
    num_codebooks=1,
    num_tokens=25,
    token_rate=25.0,
    teacher_dims={'speech': 1},
    teacher_frames={'speech': 50},
    teacher_rates={'speech': 50.0},
    audio_rates={'speech': 16000},  # online teachers: the crop's audio at the teacher's rate
    layout=(0,),
  )
  seconds = 3.0
  frames = audio.num_frames(72000)
  t_mel = np.arange(frames) * audio.HOP_LENGTH / audio.SAMPLE_RATE
  record = {
    'domain': 0,
    'num_samples': 72000,
    'mel': np.stack([t_mel, t_mel], 1),  # each row holds its own time
    'tokens': (np.arange(int(seconds * 25)) / 25.0)[None] * 1000,  # time in ms
    'teacher': np.zeros(1, np.float32),
    'teacher_frames': (np.arange(150) / 50.0)[:, None],
    'audio': (np.arange(48000) // 16 + 1).astype(np.int16),  # 16 kHz; time in ms, + 1
  }
  row = pipeline.crop_record(record, batch_spec, ('speech',), start_token=30)  # from 1.2 s
  assert abs(float(row['mel'][0, 0]) - 1.2) < 0.012 and row['tokens'][0, 0] == 1200  # bf16
  assert row['teacher_frames'].dtype == ml_dtypes.bfloat16 and row['teacher_frames'].shape == (
    50,
    1,
  )
  assert float(row['teacher_frames'][0, 0]) == pytest.approx(1.2, abs=0.01)
  assert row['num_samples'] == 24000
  assert row['audio'].shape == (16000,) and row['audio'].dtype == np.int16
  assert row['audio'][0] == 1201 and row['audio'][-1] == 2200
  end = pipeline.crop_record(record, batch_spec, ('speech',), start_token=60)  # 2.4 s: 0.6 s left
  assert end['num_samples'] == round(0.6 * 24000)
  assert np.all(end['tokens'][0, 15:] == 0) and np.allclose(
    np.float32(end['mel'][-1]), pipeline.SILENCE, atol=0.01
  )
  assert end['audio'][0] == 2401 and np.all(end['audio'][9600:] == 0) and end['audio'][9599] > 0


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
  mapping = {k: tokens[0][labels == k][0] for k in range(3)}
  assert len(set(mapping.values())) == 3
  assert all(np.all(tokens[0][labels == k] == mapping[k]) for k in range(3))
  with pytest.raises(DataError, match='cannot fit 3 units; lower model.vocab_size'):
    tokenizer.fit_codebooks(points[:2], 3, 1, seed=0)
  clips = [points[:7], points[7:40], points[40:41]]  # several clips' tokens in one padded call
  together = tokenizer.assign_token_lists(clips, codebooks)
  for clip, tokens in zip(clips, together, strict=True):
    np.testing.assert_array_equal(tokens, tokenizer.assign_tokens(clip, codebooks))


class ListSource:
  spec = None  # records are batch rows already

  def __init__(self, domains):
    self.domains = ('speech', 'audio')
    self._domain = np.asarray(domains)

  def record(self, i):
    return self[i]

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
  resumed = iter(pipeline.training_dataset(source, 8, seed=3, start_step=7))
  np.testing.assert_array_equal(next(resumed)['index'], batches[7]['index'])
  # each domain is a fresh permutation every epoch: the 6 audio clips appear once per 6 draws
  audio_order = np.concatenate([b['index'][b['domain'] == 1] for b in batches])
  assert all(sorted(audio_order[k : k + 6]) == list(range(30, 36)) for k in range(0, 78, 6))


def test_online_teacher_layout_fixes_each_rows_domain_and_keeps_epochs():
  source = ListSource([0] * 30 + [1] * 6)
  records = pipeline.mixed_records(source, seed=3, layout=(0, 0, 0, 1))
  rows = [source[records[p]] for p in range(96)]
  domains = np.array([r['domain'] for r in rows])
  np.testing.assert_array_equal(domains, np.tile([0, 0, 0, 1], 24))
  speech = np.array([r['index'] for r in rows if r['domain'] == 0])
  assert sorted(speech[:30]) == list(range(30)) and sorted(speech[30:60]) == list(range(30))
  audio_order = np.array([r['index'] for r in rows if r['domain'] == 1])
  assert sorted(audio_order[:6]) == list(range(30, 36))
  with pytest.raises(ValueError, match=r"no training clips of domain\(s\) \['audio'\]"):
    pipeline.mixed_records(ListSource([0] * 8), seed=0, layout=(0, 1))


def test_data_position_is_global_two_hosts_resume_on_one():
  source = ListSource([0] * 30 + [1] * 6)
  one = iter(pipeline.training_dataset(source, 8, seed=3, process_index=0, process_count=1))
  hosts = [
    iter(pipeline.training_dataset(source, 8, seed=3, process_index=h, process_count=2))
    for h in range(2)
  ]
  for _ in range(4):  # both hosts' slices make up the one-host batch of the same step
    parts = [next(h)['index'] for h in hosts]
    np.testing.assert_array_equal(np.concatenate(parts), next(one)['index'])
  # a checkpoint of the 2-host run at step 4 holds records_consumed = 4·8; one host resumes there
  resumed = iter(pipeline.training_dataset(source, 8, seed=3, start_step=32 // 8))
  np.testing.assert_array_equal(next(resumed)['index'], next(one)['index'])


def test_a_plain_speech_tree_is_one_train_split_with_its_transcripts(tmp_path):
  chapter = tmp_path / '19' / '198'
  chapter.mkdir(parents=True)
  write_wave(chapter / '19-198-0000.flac')
  write_wave(chapter / '19-198-0001.flac')
  (chapter / '19-198.trans.txt').write_text(
    '19-198-0000 NORTHANGER ABBEY\n19-198-0001 THIS LITTLE WORK\n'
  )
  splits = sources.resolve_splits(
    'speech', 'librispeech', str(tmp_path), sources.Splits(('train_clean_100',), 'dev_clean', 0.0)
  )
  assert splits == sources.Splits(('train',), '', 0.0)  # no official split folders: one split
  units = sources.corpus_units('speech', 'librispeech', str(tmp_path), splits)
  listings = [sources.list_unit(u, splits)[0] for u in units]
  clips = sorted(
    (i, t) for listing in listings for i, t in zip(listing.columns['id'], listing.columns['text'])
  )
  assert clips == [
    ('speech/19-198-0000', 'NORTHANGER ABBEY'),
    ('speech/19-198-0001', 'THIS LITTLE WORK'),
  ]
  assert sum(len(listing) for listing in listings if listing.unit.bucket == units[0].bucket) in (
    0,
    2,
  )
  with pytest.raises(DataError, match='LibriSpeech directory does not exist: .*nowhere'):
    sources.corpus_units('speech', 'librispeech', str(tmp_path / 'nowhere'), splits)


def test_a_folder_of_audio_is_a_dataset_with_labels_from_sub_folders(tmp_path, monkeypatch):
  for label, count in (('dog', 3), ('rain', 2)):
    (tmp_path / 'clips' / label).mkdir(parents=True)
    for i in range(count):
      write_wave(tmp_path / 'clips' / label / f'{label}{i}.wav', 0.6, 16000, 300 + 90 * i)
  monkeypatch.setattr(
    prepare, 'load_teachers', lambda c: {d: FakeTeacher() for d in c.data.domains}
  )
  config = corpus_config(
    tmp_path,
    **{
      'data.domains': ('audio',),
      'data.audio_dir': str(tmp_path / 'clips'),
      'data.datasets': {'speech': 'librispeech', 'audio': 'folder'},
      'data.heldout_fraction': 0.3,
    },
  )
  report = prepare.build(config)
  assert sum(report['num_clips'].values()) == 5 and not report['problems']
  train_split, heldout, _ = prepare.prepare(config)
  labels = {c['id']: c['labels'] for c in train_split.clips + heldout.clips}
  assert labels['audio/dog/dog1'] == ['dog'] and labels['audio/rain/rain0'] == ['rain']


def test_external_token_files_are_checked(tmp_path):
  ref = features.ClipRef('b', 'speech', 'train', 'unit', 'b.flac', -1, 10, 0)
  settings = {'codebook_size': 8, 'num_codebooks': 1}
  np.save(tmp_path / 'b.npy', np.array([[5, 6], [7, 8]]))
  with pytest.raises(ValueError, match='b.npy: holds 2 codebooks'):
    features.read_token_file(str(tmp_path), ref, settings)
  with pytest.raises(
    ValueError, match=r'b.npy: token ids in \[5, 8\] are outside 0..7 \(model.vocab_size\)'
  ):
    features.read_token_file(str(tmp_path), ref, {**settings, 'num_codebooks': 2})
  with pytest.raises(DataError, match='missing'):
    features.read_token_file(str(tmp_path), dataclasses.replace(ref, id='missing'), settings)


@pytest.mark.parametrize(
  'content, reason',
  [(b'', 'empty'), (b'RIFF\x00\x00garbage that is not audio', 'cannot decode')],
)
def test_bad_audio_bytes_name_the_file_and_reason(content, reason):
  with pytest.raises(audio.AudioDecodeError, match=f'broken.wav: .*{reason}'):
    audio.decode_audio(content, 'broken.wav')


def test_nan_samples_at_any_rate_are_caught_before_resampling(tmp_path):
  for rate in (16000, 24000, 44100):
    sf.write(
      tmp_path / f'n{rate}.wav',
      np.r_[np.zeros(4000), np.inf].astype(np.float32),
      rate,
      subtype='FLOAT',
    )
    with pytest.raises(audio.AudioDecodeError, match=f'n{rate}.wav: audio holds NaN or infinite'):
      audio.load_audio(tmp_path / f'n{rate}.wav')


def test_batch_spec_serves_aot_and_matches_reader_rows():
  config = helpers.tiny_config('/nonexistent', **{'data.teacher_frames': True})
  batch_spec = spec_lib.batch_spec(config, {'speech': 6, 'audio': 5})
  shapes = batch_spec.shapes(4)
  assert shapes['mel'] == ((4, audio.num_frames(12000), 100), ml_dtypes.bfloat16)
  assert shapes['tokens'] == ((4, 1, 5), np.int32)
  assert shapes['teacher']['audio'] == ((4, 5), np.float32)
  # Whisper: 50 frames/s; a row packs its own domain's frames, bf16, in the widest domain's width
  assert shapes['teacher_frames'] == ((4, 25, 6), ml_dtypes.bfloat16)
  assert batch_spec.frame_shapes == (('speech', 25, 6), ('audio', 25, 5))
  described = lambda tree: {
    k: described(v) if isinstance(v, dict) else (np.shape(v), np.asarray(v).dtype)
    for k, v in tree.items()
  }
  for online in (False, True):
    config.teachers.online = online
    batch_spec = spec_lib.batch_spec(config, {'speech': 6, 'audio': 5})
    shapes = batch_spec.shapes(4)
    assert ('audio' in shapes) == online
    if online:  # Whisper reads 16 kHz: 0.5 s crops of 8000 samples, int16
      assert shapes['audio'] == ((4, 8000), np.int16) and batch_spec.layout == (0, 1)
    record = helpers.fake_record(
      batch_spec, 'x', 1, np.zeros((7, 100)), np.zeros((1, 2)), 3000, np.random.default_rng(0)
    )
    row = pipeline.crop_record(record, batch_spec, batch_spec.domains, 0)
    expected = spec_lib.map_shapes(lambda shape, dtype: (shape[1:], np.dtype(dtype)), shapes)
    assert described(row) == expected


class WindowedTeacher(FakeTeacher):
  """FakeTeacher that takes at most 0.5 s at once (as Whisper takes at most 30 s)."""

  spec = dataclasses.replace(FakeTeacher.spec, max_seconds=0.5)


def test_a_clip_longer_than_the_teachers_window_is_read_window_by_window():
  rng = np.random.default_rng(0)
  waves = rng.standard_normal((3, 36000)).astype(np.float32)  # 1.5 s at 24 kHz
  num_samples = np.array([36000, 20000, 9000])
  for i, n in enumerate(num_samples):
    waves[i, n:] = 0
  mesh = features.feature_mesh()
  whole = features.teacher_features(FakeTeacher(), waves, num_samples, mesh)
  windowed = features.teacher_features(WindowedTeacher(), waves, num_samples, mesh)
  assert windowed[1].shape == whole[1].shape == (3, 75, 8)  # 50 frames/s, 3 windows of 25
  np.testing.assert_array_equal(windowed[2], whole[2])  # frames past each clip's end masked
  np.testing.assert_allclose(windowed[1][whole[2]], whole[1][whole[2]], rtol=1e-6)
  np.testing.assert_allclose(windowed[0], whole[0], rtol=1e-6)


def aac_bytes(wave: np.ndarray, rate: int) -> bytes:
  """An .m4a (AAC in MP4) file, as yt-dlp downloads AudioSet clips, encoded by FFmpeg (PyAV)."""
  import io

  import av

  buffer = io.BytesIO()
  with av.open(buffer, 'w', format='ipod') as out:
    stream = out.add_stream('aac', rate=rate, layout='mono')
    frame = av.AudioFrame.from_ndarray(wave[None, :], format='flt', layout='mono')
    frame.rate = rate
    for packet in [*stream.encode(frame), *stream.encode(None)]:
      out.mux(packet)
  return buffer.getvalue()


def test_m4a_clips_decode_through_ffmpeg():
  rate = 44100
  t = np.arange(rate) / rate
  wave = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
  decoded = audio.decode_audio(aac_bytes(wave, rate), 'clip.m4a')
  # AAC is lossy and adds encoder priming: compare the 440 Hz tone's share of the energy
  energy = np.square(np.abs(np.fft.rfft(decoded[:24000])))
  assert 24000 <= len(decoded) < 24000 + 1200 and energy[430:451].sum() > 0.9 * energy.sum()
  with pytest.raises(audio.AudioDecodeError, match=r'clip.m4a: cannot decode audio'):
    audio.decode_audio(b'\x00\x00\x00\x18ftypM4A not really', 'clip.m4a')


def test_a_damaged_shard_is_named_when_read_and_rebuilt_by_the_next_features_run(corpora):
  config = corpus_config(corpora)
  prepare.build(config)
  directory = prepare.store_directory(config)
  train_split = prepare.prepare(config)[0]
  shard = records.shard_path(directory, 'train', 1)
  data = bytearray(shard.read_bytes())
  data[100:164] = b'\xff' * 64  # bytes flipped on the disk, in the first records' chunk
  shard.write_bytes(bytes(data))
  first = int(train_split.source.starts[1])
  with pytest.raises(records.ShardError, match=rf'{shard.name}: record \d+'):
    [train_split.record(i) for i in range(first, int(train_split.source.starts[2]))]
  again = rescan(config)
  assert again['this_run']['computed'] == 1  # the damaged shard, and only it
  reread = prepare.prepare(config)[0]
  assert [reread.record(i)['id'] for i in range(len(reread))] == [c['id'] for c in reread.clips]


def test_source_problems_are_listed_by_id_and_reason(tmp_path):
  write_librispeech(tmp_path / 'librispeech', bad=False)
  chapter = tmp_path / 'librispeech' / 'LibriSpeech' / 'train-clean-100' / '19' / '198'
  with (chapter / '19-198.trans.txt').open('a') as f:
    f.write('19-198-0042 A LINE WHOSE AUDIO IS GONE\n')
  write_wave(chapter / '19-198-0043.flac')  # no transcript line
  splits = sources.Splits(('train_clean_100',), 'dev_clean', 0.0)
  root = str(tmp_path / 'librispeech')
  problems = {
    (p['id'], p['reason'])
    for u in sources.corpus_units('speech', 'librispeech', root, splits)
    for p in sources.list_unit(u, splits)[0].problems
  }
  assert problems == {
    ('speech/19-198-0042', 'transcript line has no audio file'),
    ('speech/19-198-0043', 'utterance has no transcript line'),
  }
  silent = features.ClipRef('speech/s', 'speech', 'train', 'u', 'silent.wav', -1, 0, 0)
  with pytest.raises(features.ClipError, match='silent.wav: every sample is zero'):
    features.decode_clip(silent, audio.wav_bytes(np.zeros(4800)), 24000)
