"""The data path at the sizes where things break; prints one JSON line.

  python bench/data_pipeline.py                  # quick: two build sizes and the reader's rate
  python bench/data_pipeline.py --rehearsal      # the real corpus sizes, 2 builders (≈ 30 min)
  python bench/data_pipeline.py --startup        # a training start on a 2 M-clip index

- quick: for each of --sizes, a LibriSpeech-layout archive of that many 1–2 s utterances is built
  into a store in a fresh process (peak RSS, clips/s; rss_ratio is the largest over the
  smallest).
- rehearsal: generates a LibriSpeech-layout train-clean-100.tar.gz of ≥ 1.5 GB (official member
  names, FLAC, 20–35 s utterances, transcripts) with a small dev-clean.tar.gz, and ≥ 2 000
  AudioSet-layout clips at 44.1/48 kHz (≥ 1 GB) with the segment CSVs as published (comment lines,
  quoted label lists, rows whose clip is missing). Then, every builder a fresh process under
  `ulimit -n 256` in this environment (no TensorFlow): builds a quarter-size corpus and the full
  corpus with 2 builder processes (peak RSS per process at both sizes), builds the full corpus
  again as 2 array tasks plus a final verifying run, kills one of 2 builders with SIGKILL midway
  and resumes it, adds 10 utterances to the archive and rebuilds (shards computed again), and
  starts training from the store (seconds from process start to the first batch, padding share of
  the batches). The teacher is a band-energy stand-in, so the figures measure the data path.
- startup: an index of --clips clips in --shards shards (all shard files one real file, hard
  linked) and a fresh process that opens it and reads the first batch: seconds and peak RSS.
"""

import argparse
import contextlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPEN_FILES = 256


class BandTeacher:
  """Frames = 8 band energies at 50 frames/s of 16 kHz audio: a cheap stand-in teacher."""

  def __init__(self):
    from agrepa_jax.teachers.base import TeacherSpec

    self.spec = TeacherSpec('bands', 8, 16000, 50.0)

  def features(self, batch, num_samples):
    batch = np.asarray(batch)
    frames = batch.shape[1] // 320
    chunks = batch[:, : frames * 320].reshape(len(batch), frames, 8, 40)
    mask = np.arange(frames)[None] * 320 < num_samples[:, None]
    return np.log1p(np.square(chunks).mean(-1)), mask


# ----- corpora -----


def synthetic_wave(rng, seconds: float, rate: int) -> np.ndarray:
  """A voiced-sounding signal with noise, so FLAC compresses it about as much as speech."""
  t = np.arange(int(seconds * rate)) / rate
  pitch = rng.uniform(90, 250) * (1 + 0.05 * np.sin(2 * np.pi * rng.uniform(0.2, 1.0) * t))
  phase = 2 * np.pi * np.cumsum(pitch) / rate
  wave = sum(np.sin(k * phase) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(1.3 * t) ** 2)
  return (0.25 * wave + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def flac_bytes(wave: np.ndarray, rate: int) -> bytes:
  import soundfile as sf

  buffer = io.BytesIO()
  sf.write(buffer, wave, rate, format='FLAC', subtype='PCM_16')
  return buffer.getvalue()


def add_member(tar, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size, info.mtime = len(data), 1_300_000_000
  tar.addfile(info, io.BytesIO(data))


def chapter_members(split, speaker, chapter, utterances, seed, seconds=(20.0, 35.0)):
  """[(member name, bytes)] of one LibriSpeech chapter: its FLACs and its .trans.txt."""
  rng = np.random.default_rng(seed)
  folder = f'LibriSpeech/{split}/{speaker}/{chapter}'
  members, lines = [], []
  for u in range(utterances):
    stem = f'{speaker}-{chapter}-{u:04d}'
    wave = synthetic_wave(rng, rng.uniform(*seconds), 16000)
    members.append((f'{folder}/{stem}.flac', flac_bytes(wave, 16000)))
    lines.append(f'{stem} SYNTHETIC UTTERANCE {u} OF CHAPTER {chapter}')
  members.append((f'{folder}/{speaker}-{chapter}.trans.txt', ('\n'.join(lines) + '\n').encode()))
  return members


def write_librispeech(root, split, utterances, seed, seconds=(20.0, 35.0)) -> None:
  """<root>/<split>.tar.gz: chapters of 25 utterances of `seconds`, 5 chapters a speaker."""
  os.makedirs(root, exist_ok=True)
  with tarfile.open(os.path.join(root, f'{split}.tar.gz'), 'w:gz') as tar:
    for c in range(-(-utterances // 25)):
      speaker, chapter = 100 + c // 5, 1000 + c
      count = min(25, utterances - 25 * c)
      members = chapter_members(split, speaker, chapter, count, seed * 10_000 + c, seconds)
      for name, data in members:
        add_member(tar, name, data)


def add_chapter(archive: str, utterances: int) -> None:
  """Rewrites the archive with a new chapter of `utterances` after the first speaker's chapters."""
  split = os.path.basename(archive).split('.')[0]
  new = chapter_members(split, 100, 999, utterances, seed=7)
  temporary = archive + '.new'
  with tarfile.open(archive, 'r|gz') as old, tarfile.open(temporary, 'w:gz') as tar:
    inserted = False
    for member in old:
      if not inserted and member.name > f'LibriSpeech/{split}/100/999/~':
        for name, data in new:
          add_member(tar, name, data)
        inserted = True
      tar.addfile(member, old.extractfile(member) if member.isfile() else None)
    if not inserted:
      for name, data in new:
        add_member(tar, name, data)
  os.replace(temporary, archive)


def youtube_id(rng) -> str:
  alphabet = np.array(list('ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'))
  return ''.join(rng.choice(alphabet, 11))


def write_audioset(root: str, clips: int, seed: int) -> None:
  """Clips at 44.1 and 48 kHz (3 % shorter than 10 s, as some AudioSet clips are), and the
  published CSVs: balanced_train (with 2 % of rows whose clip is missing) and eval."""
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, 'audio'), exist_ok=True)
  classes = [(f'/m/0{i:04x}', f'Class {i}') for i in range(24)]
  with open(os.path.join(root, 'class_labels_indices.csv'), 'w') as f:
    f.write('index,mid,display_name\n')
    f.writelines(f'{i},{mid},"{name}"\n' for i, (mid, name) in enumerate(classes))
  rows = {'balanced_train': [], 'eval': []}
  for i in range(clips + clips // 50):
    ytid, start = youtube_id(rng), int(rng.integers(0, 300))
    labels = ','.join(classes[j][0] for j in rng.choice(len(classes), rng.integers(1, 4), False))
    split = 'eval' if i % 20 == 0 else 'balanced_train'
    rows[split].append(f'{ytid}, {start}.000, {start + 10}.000, "{labels}"')
    if i >= clips:
      continue  # listed, never downloaded
    rate = (44100, 48000)[i % 2]
    seconds = rng.uniform(2, 10) if rng.random() < 0.03 else 10.0
    name = f'Y{ytid}_{start}.000_{start + 10}.000.flac' if i % 2 else f'{ytid}_{start}.flac'
    with open(os.path.join(root, 'audio', name), 'wb') as f:
      f.write(flac_bytes(synthetic_wave(rng, seconds, rate), rate))
  for split, lines in rows.items():
    with open(os.path.join(root, f'{split}_segments.csv'), 'w') as f:
      f.write(
        f'# Segments csv created Sun Mar  5 10:54:25 2017\n# num_ytids={len(lines)}, '
        f'num_segs={len(lines)}, num_unique_labels={len(classes)}\n'
        '# YTID, start_seconds, end_seconds, positive_labels\n'
      )
      f.writelines(line + '\n' for line in lines)


def directory_size(root: str) -> int:
  return sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(root) for n in ns)


# ----- configs and workers (each a fresh process) -----


def bench_config(cache_dir: str, speech_dir: str, audio_dir: str, seconds: float = 10.0):
  from agrepa_jax import config_base

  config = config_base.base_config()
  config.batch_size = 64
  config.model.update(vocab_size=64)
  domains = ('speech', 'audio') if audio_dir else ('speech',)
  config.data.update(
    source='directories',
    domains=domains,
    speech_dir=speech_dir,
    audio_dir=audio_dir,
    cache_dir=cache_dir,
    clip_seconds=seconds,
    max_seconds=35.0,
    chunk_size=16,
    shard_clips=64,
    tokenizer_clips=200,
    heldout_fraction=0.02,
    claim_timeout=60.0,
  )
  config.data.train_splits = {'speech': 'train_clean_100', 'audio': 'balanced_train'}
  return config


def run_worker(args) -> dict:
  """One builder, reader or training start, in this process."""
  from agrepa_jax.data import prepare, store

  config = bench_config(args.cache, args.speech, args.audio, args.seconds)
  prepare.load_teachers = lambda config: {d: BandTeacher() for d in config.data.domains}
  if args.worker == 'build':
    options = store.BuildOptions(
      task=args.task,
      num_tasks=args.num_tasks,
      process=args.process,
      num_processes=args.processes,
      scan=args.scan,
      verify=True,
      stale_after=config.data.claim_timeout,
    )
    result = prepare.build(config, options)
    return {'complete': result['complete'], **result['this_run']}
  return first_batch(config, args.started)


def first_batch(config, started: float) -> dict:
  from agrepa_jax import audio
  from agrepa_jax.data import pipeline, prepare

  train_split, _, _ = prepare.prepare(config)
  batches = iter(pipeline.training_dataset(train_split, config.batch_size, 0))
  batch = next(batches)
  seconds = time.time() - started
  crop = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  real = [int(next(batches)['num_samples'].sum()) for _ in range(9)] + [batch['num_samples'].sum()]
  return {
    'seconds_to_first_batch': round(seconds, 2),
    'padding_share': round(1 - sum(real) / (10 * config.batch_size * crop), 4),
    'open_shard_files': train_split.source.open_files(),
  }


def limit_open_files():
  resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))


def start_worker(common: list[str], *extra: str) -> subprocess.Popen:
  command = [sys.executable, __file__, *common, *extra, '--started', str(time.time())]
  return subprocess.Popen(
    command,
    stdout=subprocess.PIPE,
    stderr=subprocess.DEVNULL,
    text=True,
    preexec_fn=limit_open_files,
  )


def open_files(pid: int) -> int:
  with contextlib.suppress(OSError):
    return len(os.listdir(f'/proc/{pid}/fd'))
  return 0


def finish(processes: list[subprocess.Popen], kill_after: float | None = None) -> list[dict]:
  """Waits for the workers; per worker its JSON line, peak RSS (MB) and most open files."""
  results = {p.pid: {'most_open_files': 0} for p in processes}
  started, alive = time.time(), list(processes)
  while alive:
    for p in list(alive):
      results[p.pid]['most_open_files'] = max(results[p.pid]['most_open_files'], open_files(p.pid))
      if kill_after is not None and time.time() - started > kill_after and p is processes[-1]:
        p.send_signal(signal.SIGKILL)
        kill_after = None
      pid, status, usage = os.wait4(p.pid, os.WNOHANG)
      if pid:
        alive.remove(p)
        line = (p.stdout.read().strip().splitlines() or ['{}'])[-1]
        results[p.pid].update(json.loads(line) if status == 0 else {'killed': status})
        results[p.pid]['peak_rss_mb'] = round(usage.ru_maxrss / 1024)
    time.sleep(0.2)
  return [results[p.pid] for p in processes]


def build_with(common, processes: int = 2, tasks=None, scan: str = '', kill_after=None):
  """Runs `processes` builder processes of one job, or the given array `tasks` (of 2), at once;
  with kill_after, the last one is killed (SIGKILL) that many seconds in."""
  if tasks is None:
    extra = [['--process', str(i), '--processes', str(processes)] for i in range(processes)]
  else:
    extra = [['--task', str(i), '--num_tasks', '2'] for i in tasks]
  started = time.time()
  workers = [start_worker(common, '--worker', 'build', '--scan', scan, *e) for e in extra]
  return finish(workers, kill_after), round(time.time() - started, 1)


def summary(results: list[dict]) -> dict:
  return {
    'clips_per_s': [round(r.get('clips', 0) / max(r.get('seconds', 0), 1e-9), 1) for r in results],
    'peak_rss_mb': [r['peak_rss_mb'] for r in results],
    'most_open_files': max(r['most_open_files'] for r in results),
    'computed': [r.get('computed') for r in results],
  }


def rehearsal(args) -> dict:
  import importlib.util

  root = args.root
  speech, audio_root = os.path.join(root, 'librispeech'), os.path.join(root, 'audioset')
  small_speech = os.path.join(root, 'librispeech-small')
  small_audio = os.path.join(root, 'audioset-small')
  utterances = int(args.speech_gb * 2**30 / 620_000)
  if not os.path.exists(os.path.join(speech, 'train-clean-100.tar.gz')):
    write_librispeech(speech, 'train-clean-100', utterances, seed=1)
    write_librispeech(speech, 'dev-clean', 40, seed=2)
    write_audioset(audio_root, args.audio_clips, seed=3)
    write_librispeech(small_speech, 'train-clean-100', utterances // 4, seed=1)
    write_librispeech(small_speech, 'dev-clean', 40, seed=2)
    write_audioset(small_audio, args.audio_clips // 4, seed=3)
  out = {
    'tensorflow_installed': importlib.util.find_spec('tensorflow') is not None,
    'open_file_limit': OPEN_FILES,
    'corpus': {
      'speech_archive_gb': round(
        os.path.getsize(os.path.join(speech, 'train-clean-100.tar.gz')) / 2**30, 2
      ),
      'audioset_gb': round(directory_size(audio_root) / 2**30, 2),
      'audioset_clips': args.audio_clips,
    },
  }
  common = lambda cache, s=speech, a=audio_root: ['--cache', cache, '--speech', s, '--audio', a]
  with tempfile.TemporaryDirectory(dir=root) as caches:
    cache = lambda name: os.path.join(caches, name)
    small, small_seconds = build_with(common(cache('small'), small_speech, small_audio), scan='s')
    full, full_seconds = build_with(common(cache('full')), scan='f')
    out['two_processes'] = {'quarter': summary(small), 'full': summary(full)}
    out['two_processes']['seconds'] = [small_seconds, full_seconds]
    out['rss_ratio_full_to_quarter'] = round(
      max(summary(full)['peak_rss_mb']) / max(summary(small)['peak_rss_mb']), 3
    )
    tasks, task_seconds = build_with(common(cache('tasks')), tasks=(0, 1))
    final, final_seconds = build_with(common(cache('tasks')), processes=1, scan='final')
    out['array_tasks'] = {**summary(tasks), 'seconds': task_seconds}
    out['final_run'] = {**summary(final), 'seconds': final_seconds}
    killed, _ = build_with(common(cache('killed')), tasks=(0, 1), kill_after=full_seconds / 3)
    resumed, _ = build_with(common(cache('killed')), tasks=(1,))
    out['task_killed_and_resumed'] = {
      'killed_status': killed[-1].get('killed'),
      'other_task_computed': killed[0].get('computed'),
      'resumed_task_computed': resumed[0].get('computed'),
      'index_written': resumed[0].get('complete'),
    }
    add_chapter(os.path.join(speech, 'train-clean-100.tar.gz'), 10)
    changed, _ = build_with(common(cache('full')), scan='after-10-utterances')
    out['shards_recomputed_after_10_utterances'] = sum(r.get('computed', 0) for r in changed)
    out['training_start'] = finish([start_worker(common(cache('full')), '--worker', 'first')])[0]
  return out


def startup(args) -> dict:
  """A fresh process opening an index of args.clips clips in args.shards shards."""
  from agrepa_jax.data import index, prepare
  from agrepa_jax.data import records as records_lib

  with tempfile.TemporaryDirectory() as root:
    config = bench_config(os.path.join(root, 'cache'), root, '', seconds=1.0)
    config.data.domains = ('speech',)
    directory = prepare.store_directory(config)
    per_shard = -(-args.clips // args.shards)
    rng = np.random.default_rng(0)
    one = [synthetic_record(i, rng) for i in range(per_shard)]
    index.import_records(
      directory, prepare.store_settings(config), ('speech',), {'train': one}, per_shard
    )
    first = records_lib.shard_path(directory, 'train', 0)
    for s in range(1, args.shards):
      os.link(first, records_lib.shard_path(directory, 'train', s))
    lengths = np.full(args.shards, per_shard, np.int64)
    arrays = {
      'train/shard_lengths': lengths,
      'train/domain': np.zeros(per_shard * args.shards, np.int8),
      'train/num_samples': np.full(per_shard * args.shards, 24000, np.int64),
      'heldout/shard_lengths': np.zeros(0, np.int64),
      'heldout/domain': np.zeros(0, np.int8),
      'heldout/num_samples': np.zeros(0, np.int64),
    }
    index.save_arrays(os.fspath(directory / 'index.npz'), arrays)
    worker = start_worker(
      ['--cache', os.path.join(root, 'cache'), '--speech', root, '--audio', '', '--seconds', '1.0'],
      '--worker',
      'first',
    )
    result = finish([worker])[0]
  return {'clips': per_shard * args.shards, 'shards': args.shards, **result}


def synthetic_record(i: int, rng) -> dict:
  import ml_dtypes

  return {
    'id': f'speech/{i:07d}',
    'path': '',
    'text': '',
    'labels': [],
    'domain': np.int32(0),
    'num_samples': np.int64(24000),
    'mel': rng.standard_normal((94, 100)).astype(ml_dtypes.bfloat16),
    'teacher': rng.standard_normal(8).astype(np.float32),
    'tokens': rng.integers(0, 64, (1, 25)).astype(np.int32),
  }


def quick(args) -> dict:
  builds = []
  with tempfile.TemporaryDirectory() as root:
    for size in [int(s) for s in args.sizes.split(',')]:
      speech = os.path.join(root, f'speech-{size}')
      write_librispeech(speech, 'train-clean-100', size, seed=size, seconds=(1.0, 2.0))
      result, seconds = build_with(
        [
          '--cache',
          os.path.join(root, f'cache-{size}'),
          '--speech',
          speech,
          '--audio',
          '',
        ],
        processes=1,
      )
      builds.append({'clips': size, 'seconds': seconds, **summary(result)})
  rss = [max(b['peak_rss_mb']) for b in builds]
  return {'build': builds, 'rss_ratio': round(max(rss) / min(rss), 3)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rehearsal', action='store_true')
  parser.add_argument('--startup', action='store_true')
  parser.add_argument('--root', default=os.path.join(tempfile.gettempdir(), 'agrepa_rehearsal'))
  parser.add_argument('--speech_gb', type=float, default=1.5)
  parser.add_argument('--audio_clips', type=int, default=2000)
  parser.add_argument('--clips', type=int, default=2_000_000)
  parser.add_argument('--shards', type=int, default=8192)
  parser.add_argument('--sizes', default='500,2000')
  # a worker process's arguments
  parser.add_argument('--worker', default='', help=argparse.SUPPRESS)
  parser.add_argument('--cache', help=argparse.SUPPRESS)
  parser.add_argument('--speech', help=argparse.SUPPRESS)
  parser.add_argument('--audio', default='', help=argparse.SUPPRESS)
  parser.add_argument('--seconds', type=float, default=10.0, help=argparse.SUPPRESS)
  parser.add_argument('--task', type=int, default=None, help=argparse.SUPPRESS)
  parser.add_argument('--num_tasks', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--process', type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument('--processes', type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument('--scan', default='', help=argparse.SUPPRESS)
  parser.add_argument('--started', type=float, default=0.0, help=argparse.SUPPRESS)
  args = parser.parse_args()
  sys.path.insert(0, REPOSITORY)
  if args.worker:
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain's worker processes read absl flags
    print(json.dumps(run_worker(args)))
    return
  os.makedirs(args.root, exist_ok=True)
  if args.rehearsal:
    result = rehearsal(args)
  elif args.startup:
    result = startup(args)
  else:
    result = quick(args)
  print(json.dumps(result))


if __name__ == '__main__':
  main()
