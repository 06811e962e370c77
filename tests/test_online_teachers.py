"""Online teachers (teachers.online=True): the teachers run in the jitted step on each crop's audio.

The store is built by the test from small LibriSpeech/AudioSet-layout trees with the real teacher
of the default config (the bundled Whisper tiny.en, both domains). Tolerances:
- utterance targets: the store keeps them in float32, computed by the same teacher on the same
  int16 audio, only batched differently (8 padded rows while building, the domain's rows in the
  step), so they agree to float32 rounding through 4 blocks (measured: 6e-7 of the largest
  |value|): rtol 1e-5 and atol 1e-5 · the largest |value|.
- frame targets: the store keeps teacher_frames as bf16 (8 significant bits: round to nearest
  errs by up to 2**-8 of the value; measured 0.0039), so frames agree to rtol 2**-8 and atol
  2**-8 · the largest |value|.
- losses: the offline step reads the bf16 frames, the online step float32 ones; one step's frame
  REPA loss agrees to rtol 1e-3 (measured 8.5e-6: the rounding mostly cancels in the cosine),
  the total to 1e-4 (measured 1.1e-6), BiT-C (utterance targets) to 1e-5, L_FM (no targets) 1e-6.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from agrepa_jax import aot, sharding, train
from agrepa_jax import state as state_lib
from agrepa_jax.data import pipeline, prepare
from agrepa_jax.data import spec as spec_lib
from agrepa_jax.teachers import beats, whisper
from agrepa_jax.teachers import online as online_lib
from tests.test_data import FakeTeacher, corpus_config, write_audioset, write_librispeech

BATCH = 16  # 8 devices x one period (speech, audio) of the 1:1 layout


def online_config(root, **overrides):
  return corpus_config(
    root,
    **{
      'teachers.online': True,
      'data.teacher_frames': True,  # the stored frames the online ones are compared with
      'data.crop': 'start',
      'data.max_seconds': 0.5,  # crops cover whole stored clips: online = stored targets
      'batch_size': BATCH,
      **overrides,
    },
  )


@pytest.fixture(scope='module')
def store(tmp_path_factory):
  root = tmp_path_factory.mktemp('online')
  write_librispeech(root / 'librispeech', bad=False)
  write_audioset(root / 'audioset')
  config = online_config(root)
  prepare.build(config)
  return root


def first_batch(config):
  train_source, _, _ = prepare.prepare(config)
  data = pipeline.training_dataset(train_source, config.batch_size, 0, crop=config.data.crop)
  return train_source, next(iter(data))


def test_store_keeps_teacher_rate_pcm_and_its_settings_change_the_store_key(store):
  config = online_config(store)
  train_source, batch = first_batch(config)
  record = train_source.record(0)
  assert record['audio'].dtype == np.int16
  assert len(record['audio']) == -(-int(record['num_samples']) * 16000 // 24000)
  assert batch['audio'].shape == (BATCH, 8000) and batch['audio'].dtype == np.int16
  np.testing.assert_array_equal(batch['domain'], np.arange(BATCH) % 2)  # the 1:1 layout
  offline = online_config(store, **{'teachers.online': False})
  assert prepare.store_directory(offline) != prepare.store_directory(config)


def mesh8():
  return sharding.make_mesh({'data': 8, 'fsdp': 1}, jax.devices()[:8])


def online_targets(config, batch, train_source, by_layout=True):
  mesh = mesh8()
  online, params = train.online_teachers(config, train_source.spec, mesh)
  fn = jax.jit(lambda p, b: online.targets(p, b, by_layout))
  return jax.device_get(fn(*params, sharding.global_batch(batch, mesh)))


def assert_close(online, stored, rtol):
  scale = np.abs(stored).max()
  np.testing.assert_allclose(online, stored, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize('granularity', ['utterance', 'frame'])
def test_online_targets_equal_the_stored_ones(store, granularity):
  config = online_config(store, **{'repa.granularity': granularity})
  train_source, batch = first_batch(config)
  for by_layout in (True, False):  # the train step's per-domain rows, the eval step's all rows
    targets = online_targets(config, batch, train_source, by_layout)
    stored = spec_lib.unpack_frames(batch['teacher_frames'], train_source.spec.frame_shapes)
    for i, d in enumerate(config.data.domains):
      assert_close(targets['teacher'][d], batch['teacher'][d], 1e-5)
      if granularity == 'frame':
        own = batch['domain'] == i  # a stored row packs its own domain's frames only
        frames = targets['teacher_frames'][d]
        assert frames.shape == stored[d].shape == (BATCH, 25, 384)
        assert_close(frames[own], stored[d][own], 2**-8)
        assert not np.any(frames[~own])
    assert ('teacher_frames' in targets) == (granularity == 'frame')


def step_losses(config, batch, train_source, online: bool):
  mesh = mesh8()
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state, shardings = state_lib.sharded_init(config, (384, 384), tx, mesh)
  teachers, params = (
    train.online_teachers(config, train_source.spec, mesh) if online else (None, ())
  )
  step = train.jit_train_step(
    graphdef,
    tx,
    schedule,
    train.StepConfig.from_config(config, train_source.spec),
    shardings,
    mesh,
    teachers,
  )
  _, parts = step(state, sharding.global_batch(batch, mesh), *params)
  return jax.device_get(parts)


@pytest.mark.slow
def test_online_train_step_gives_the_offline_loss_on_8_devices(store):
  # frame REPA reads the frame targets, BiT-C the utterance targets: one step checks both
  config = online_config(store, **{'repa.granularity': 'frame'})
  train_source, batch = first_batch(config)
  offline = step_losses(config, batch, train_source, online=False)
  online = step_losses(config, batch, train_source, online=True)
  assert online['loss_repa'] > 0 and online['loss_bitc'] > 0
  for key, rtol in (('loss', 1e-4), ('loss_repa', 1e-3), ('loss_bitc', 1e-5), ('loss_fm', 1e-6)):
    np.testing.assert_allclose(online[key], offline[key], rtol=rtol, err_msg=key)


@pytest.mark.slow
def test_training_loop_with_online_teachers_trains_and_evaluates(store, tmp_path):
  config = online_config(
    store,
    **{
      'repa.granularity': 'frame',
      'data.crop': 'random',
      'num_steps': 2,
      'eval_every': 2,
      'eval_batches': 1,
      'checkpoint_every': 2,
    },
  )
  train.train_and_evaluate(config, tmp_path / 'run')
  rows = [
    json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  ]
  assert rows[-1]['step'] == 2 and np.isfinite(rows[-1]['eval_loss'])
  assert all(row['loss_repa'] > 0 for row in rows)


@pytest.mark.slow
def test_aot_compiles_the_online_step_from_the_spec(store):
  config = online_config(
    store,
    **{
      'repa.granularity': 'frame',
      'data.teacher_frames': False,
      'teachers.speech.dim': 384,
      'teachers.audio.dim': 384,
    },
  )
  _, report = aot.compile_train_step(config)
  assert report['params_online_teachers'] > 7_000_000  # Whisper tiny.en's encoder, shared
  assert report['argument_bytes'] >= 4 * report['params_online_teachers']  # replicated, float32


def test_teachers_run_inside_jit_as_they_do_outside():
  rng = np.random.default_rng(0)
  wave = (0.1 * rng.standard_normal((2, 8000))).astype(np.float32)
  wave[1, 5000:] = 0
  num_samples = np.array([8000, 5000])
  tiny_beats = beats.BeatsConfig(
    embed_dim=16,
    encoder_layers=2,
    encoder_embed_dim=32,
    encoder_ffn_embed_dim=64,
    encoder_attention_heads=4,
    conv_pos=8,
    conv_pos_groups=4,
  )
  teachers = [
    whisper.load(),
    beats.BeatsTeacher(beats.Beats(tiny_beats, rngs=nnx.Rngs(0))),
  ]
  for teacher in teachers:
    frames, mask = teacher.features(wave, num_samples)
    apply, params = teacher.online()
    traced, traced_mask = jax.jit(apply)(params, wave, num_samples)
    np.testing.assert_array_equal(traced_mask, mask)
    np.testing.assert_allclose(traced, frames, rtol=1e-5, atol=1e-5)


def test_bad_online_settings_name_the_config_field(tmp_path):
  config = online_config(tmp_path)
  spec = spec_lib.batch_spec(config, {'speech': 8, 'audio': 8})
  with pytest.raises(ValueError, match=r"teachers.speech.name='whisper' cannot run inside"):
    online_lib.online_teachers(config, spec, {'speech': FakeTeacher(), 'audio': FakeTeacher()})
  teacher = whisper.load()
  spec = spec_lib.batch_spec(config, {'speech': 384, 'audio': 384})
  online, _ = online_lib.online_teachers(config, spec, {'speech': teacher, 'audio': teacher})
  with pytest.raises(ValueError, match=r'batch_size=8 over the 8 batch shards.*multiple of 16'):
    online.check_batch(8, mesh8())
  config.data.domain_weights = (0.7, 0.3)
  with pytest.raises(ValueError, match=r'data.domain_weights=\(0.7, 0.3\) must be a whole-number'):
    spec_lib.batch_spec(config, {'speech': 384, 'audio': 384})
  config.data.domain_weights = (3.0, 1.0)
  assert spec_lib.batch_spec(config, {'speech': 384, 'audio': 384}).layout == (0, 0, 0, 1)
