"""Memory and speed of the data path; prints one JSON line.

  python bench/data_pipeline.py [--sizes 1000,5000] [--clip-seconds 1.0] [--reader-records 512]

- build: for each size, a synthetic speech folder of that many clips goes through the whole
  path (listing -> tfds dataset -> feature store) in a fresh process; peak_rss_mb is that
  process's peak resident memory, rss_ratio the largest over the smallest (memory must not grow
  with the corpus: <= 1.3), clips_per_s the feature-store rate. The teacher is a cheap band-energy
  stand-in, so the figure measures the data path, not a teacher network.
- reader: batches/s of one host at the paper's batch shape (64 clips of 10 s, random crops) from
  a store of `reader_records` 10 s records, in the trainer's process (num_workers 0) and with 2
  grain worker processes.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import flags


class BandTeacher:
  """Frames = 8 band energies at 50 frames/s of 16 kHz audio."""

  def __init__(self):
    from agrepa_jax.teachers.base import TeacherSpec

    self.spec = TeacherSpec('bands', 8, 16000, 50.0)

  def features(self, batch, num_samples):
    batch = np.asarray(batch)
    frames = batch.shape[1] // 320
    chunks = batch[:, : frames * 320].reshape(len(batch), frames, 8, 40)
    mask = np.arange(frames)[None] * 320 < num_samples[:, None]
    return np.log1p(np.square(chunks).mean(-1)), mask


def write_corpus(root: str, num_clips: int, seconds: float) -> None:
  import soundfile as sf

  rng = np.random.default_rng(0)
  t = np.arange(int(seconds * 16000)) / 16000
  for i in range(num_clips):
    folder = os.path.join(root, str(i // 1000))
    os.makedirs(folder, exist_ok=True)
    wave = np.sin(2 * np.pi * rng.uniform(100, 2000) * t) + 0.1 * rng.standard_normal(t.size)
    sf.write(os.path.join(folder, f'{i:06d}.flac'), (0.3 * wave).astype(np.float32), 16000)


def bench_config(cache_dir: str, corpus: str, seconds: float, batch_size: int):
  from agrepa_jax import config_base

  config = config_base.base_config()
  config.batch_size = batch_size
  config.model.update(vocab_size=64)
  config.data.update(
    source='directories',
    domains=('speech',),
    speech_dir=corpus,
    cache_dir=cache_dir,
    clip_seconds=seconds,
    chunk_size=64,
    shard_clips=256,
    tokenizer_clips=200,
    heldout_fraction=0.02,
  )
  return config


def build_once(num_clips: int, seconds: float) -> dict:
  """In this (fresh) process: build the store of a synthetic corpus; peak RSS and clips/s."""
  from agrepa_jax.data import prepare

  with tempfile.TemporaryDirectory() as root:
    corpus = os.path.join(root, 'corpus')
    write_corpus(corpus, num_clips, seconds)
    config = bench_config(os.path.join(root, 'cache'), corpus, seconds, 64)
    prepare.load_teachers = lambda config: {'speech': BandTeacher()}
    start = time.perf_counter()
    manifest = prepare.build(config)
    seconds_taken = time.perf_counter() - start
  return {
    'clips': num_clips,
    'stored': sum(manifest['num_clips'].values()),
    'seconds': round(seconds_taken, 1),
    'clips_per_s': round(num_clips / seconds_taken, 1),
    'peak_rss_mb': round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
  }


def reader_rate(num_records: int, num_workers: int, batches: int) -> float:
  """Batches/s of one host at batch 64 × 10 s, from a store of 10 s records."""
  import ml_dtypes

  from agrepa_jax import audio
  from agrepa_jax.data import features, pipeline, prepare
  from agrepa_jax.data import spec as spec_lib

  with tempfile.TemporaryDirectory() as root:
    config = bench_config(root, root, 10.0, 64)
    config.data.source = 'embedded'
    directory = prepare.store_directory(config)
    rng = np.random.default_rng(0)
    frames, tokens = audio.num_frames(240000), spec_lib.token_count(10.0, 25.0)
    record = lambda i: {
      'id': f'{i:06d}',
      'path': '',
      'text': '',
      'domain': np.int32(0),
      'num_samples': np.int64(240000),
      'mel': rng.standard_normal((frames, 100)).astype(ml_dtypes.bfloat16),
      'teacher': rng.standard_normal(1280).astype(np.float32),
      'tokens': rng.integers(0, 4096, (1, tokens)).astype(np.int32),
    }
    names = []
    for s in range(0, num_records, 256):
      name = features.shard_name(s // 256, -(-num_records // 256))
      records = [record(i) for i in range(s, min(s + 256, num_records))]
      features.write_shard(directory / 'train', name, records, {'fingerprint': '', 'skipped': []})
      names.append(('train', name))
    features.write_manifest(directory, names, {}, ('speech',), {})
    source = pipeline.FeatureSplit(
      directory, 'train', spec_lib.batch_spec(config, {'speech': 1280}), ('speech',)
    )
    iterator = iter(pipeline.training_dataset(source, 64, 0, num_workers=num_workers))
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
    assert batch['mel'].shape == (64, frames, 100)
    return batches / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default='1000,5000')
  parser.add_argument('--clip-seconds', type=float, default=1.0)
  parser.add_argument('--reader-records', type=int, default=512)
  parser.add_argument('--reader-batches', type=int, default=10)
  parser.add_argument('--build-one', type=int, default=0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
  if args.build_one:
    print(json.dumps(build_once(args.build_one, args.clip_seconds)))
    return
  builds = []
  for size in [int(s) for s in args.sizes.split(',')]:
    out = subprocess.run(
      [
        sys.executable,
        __file__,
        '--build-one',
        str(size),
        '--clip-seconds',
        str(args.clip_seconds),
      ],
      check=True,
      capture_output=True,
      text=True,
    ).stdout
    builds.append(json.loads(out.strip().splitlines()[-1]))
  rss = [b['peak_rss_mb'] for b in builds]
  print(
    json.dumps(
      {
        'build': builds,
        'rss_ratio': round(max(rss) / min(rss), 3),
        'reader_batch': [64, 10.0],
        'reader_batches_per_s': {
          f'workers_{w}': round(reader_rate(args.reader_records, w, args.reader_batches), 2)
          for w in (0, 2)
        },
      }
    )
  )


if __name__ == '__main__':
  main()
