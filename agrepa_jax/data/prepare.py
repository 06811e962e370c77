"""From `config.data` and `config.teachers` to the feature store and the splits a run reads.

corpora (sources.py: listings) -> feature store (store.py: plan, tokenizer, shards, index) ->
grain (pipeline.py). The embedded corpus takes the same path as LibriSpeech, AudioSet and plain
folders of audio. A training start opens the store's index and reads nothing else; only
`--mode features` lists the corpora again, so added, removed or changed files are picked up there.
"""

import json
import logging
import os
import time

import jax
import numpy as np
from etils import epath

from agrepa_jax import audio
from agrepa_jax.data import DataError, claims, features, sources, store
from agrepa_jax.data import spec as spec_lib
from agrepa_jax.data.pipeline import FeatureSplit


def cache_root(config) -> epath.Path:
  return epath.Path(config.data.cache_dir).expanduser()


def store_settings(config) -> dict:
  """Everything that shapes the records of the store (its directory is keyed by these)."""
  data = config.data
  max_seconds = data.max_seconds or data.clip_seconds
  # online teachers: records keep audio (a new store; offline stores keep their key)
  online = {'teacher_audio': True} if config.teachers.online else {}
  return {
    'source': data.source,
    'domains': list(data.domains),
    'datasets': {d: data.datasets[d] for d in data.domains} if data.source != 'embedded' else {},
    'splits': {d: [data.train_splits[d], data.heldout_splits[d]] for d in data.domains}
    if data.source != 'embedded'
    else {},
    'max_samples': round(max_seconds * audio.SAMPLE_RATE),
    'heldout_fraction': data.heldout_fraction,
    'token_rate': data.token_rate,
    'token_dir': data.token_dir,
    'codebook_size': config.model.vocab_size,
    'num_codebooks': config.model.num_codebooks,
    'tokenizer_clips': data.tokenizer_clips,
    'seed': data.seed,
    'chunk_size': data.chunk_size,
    'shard_clips': data.shard_clips,
    'teacher_frames': data.teacher_frames,
    'teachers': {d: dict(config.teachers[d]) for d in data.domains},
    **online,
    # the official front end (fidelity='official'); absent otherwise, so stores keep their keys
    **({'mel_via_rate': data.mel_via_rate} if data.mel_via_rate else {}),
    **({'teacher_padding': config.teachers.padding} if config.teachers.padding != 'masked' else {}),
  }


def store_directory(config) -> epath.Path:
  return cache_root(config) / f'features-{features.store_key(store_settings(config))}'


def embedded_root(config) -> epath.Path:
  data = config.data
  return cache_root(config) / (
    f'embedded-{data.seed}-{data.num_speech}-{data.num_audio}-{data.clip_seconds}'
  )


def generate_embedded_corpus(config) -> None:
  """The embedded corpus, generated once (one builder generates, the others wait for it)."""
  from agrepa_jax.data import synth

  data, root = config.data, embedded_root(config)
  holder = claims.Claims(cache_root(config) / 'claims', stale_after=600.0)
  claims.run_once(
    holder,
    root.name,
    is_done=(root / synth.STAMP_NAME).exists,
    work=lambda: synth.build_embedded_corpus(
      root, data.num_speech, data.num_audio, data.seed, seconds=data.clip_seconds
    ),
  )


def corpora(config) -> list[store.Corpus]:
  """One Corpus per configured domain."""
  data = config.data
  fraction = data.heldout_fraction
  if data.source == 'embedded':
    generate_embedded_corpus(config)
    root = str(embedded_root(config))
    return [
      store.Corpus(d, 'embedded', root, sources.Splits(('train',), '', fraction))
      for d in data.domains
    ]
  if data.source != 'directories':
    raise DataError(f"data.source={data.source!r}: expected 'embedded' or 'directories'")
  out = []
  for domain in data.domains:
    root = data.get(f'{domain}_dir', '')
    if not root:
      raise DataError(
        f'data.{domain}_dir is empty: give the {domain} corpus or drop {domain!r} from data.domains'
      )
    kind = data.datasets[domain]
    if kind not in sources.CORPORA:
      raise DataError(f'data.datasets.{domain}={kind!r}: expected one of {list(sources.CORPORA)}')
    configured = sources.Splits(
      tuple(s for s in data.train_splits[domain].split('+') if s),
      data.heldout_splits.get(domain, ''),
      fraction,
    )
    out.append(
      store.Corpus(domain, kind, root, sources.resolve_splits(domain, kind, root, configured))
    )
  return out


def load_teachers(config) -> dict:
  """One teacher per domain; domains naming the same teacher and checkpoint share one instance."""
  from agrepa_jax.teachers import load_teacher

  by_key, per_domain = {}, {}
  for domain in config.data.domains:
    spec = config.teachers[domain]
    key = (spec.name, spec.checkpoint)
    if key not in by_key:
      try:
        by_key[key] = load_teacher(
          spec.name, spec.checkpoint or None, padding=config.teachers.padding
        )
      except (ValueError, OSError) as e:  # a missing or unreadable checkpoint, an unknown name
        raise DataError(f'teachers.{domain} ({spec.name}, {spec.checkpoint!r}): {e}') from e
    per_domain[domain] = by_key[key]
  return per_domain


def feature_store(config, options: store.BuildOptions | None = None) -> store.Store:
  return store.Store(
    store_directory(config),
    store_settings(config),
    config.data.domains,
    corpora(config),
    lambda: load_teachers(config),
    options,
  )


def job_options(config, **overrides) -> store.BuildOptions:
  """Build options of this process of a (possibly multi-process) job."""
  return store.BuildOptions(
    process=jax.process_index(),
    num_processes=jax.process_count(),
    stale_after=config.data.claim_timeout,
    **overrides,
  )


def build(config, options: store.BuildOptions | None = None) -> dict:
  """Builds, resumes or updates the feature store of `config` (this builder's share; every
  process of a job takes part). Returns the store's manifest with this builder's figures
  (`this_run`) and, when the index is written, the report (`skipped`, `problems`)."""
  built = feature_store(config, options or job_options(config))
  try:
    complete = built.build()
  except features.NoUsableClips as e:
    roots = {d: config.data.get(f'{d}_dir') or 'the embedded corpus' for d in e.domains}
    raise DataError(f'{e}; no usable audio file in {roots}') from e
  stats = {
    **built.stats,
    'clips_per_second': built.stats['clips'] / max(built.stats['seconds'], 1e-9),
  }
  if not complete:
    return {'complete': False, 'this_run': stats}
  manifest = json.loads((built.directory / 'manifest.json').read_text())
  report = json.loads((built.directory / 'report.json').read_text())
  check_teacher_dims(config, manifest['teacher_dims'])
  return {'complete': True, **manifest, **report, 'this_run': stats}


def check_teacher_dims(config, found: dict) -> None:
  for domain in config.data.domains:
    dim = int(config.teachers[domain].dim)
    if dim and dim != found[domain]:
      raise DataError(
        f'teachers.{domain}.dim={dim}, but the {domain} teacher gives {found[domain]}-d features'
      )


def open_store(config) -> tuple[FeatureSplit, FeatureSplit, dict]:
  directory = store_directory(config)
  manifest = json.loads((directory / 'manifest.json').read_text())
  check_teacher_dims(config, manifest['teacher_dims'])
  spec = spec_lib.batch_spec(config, manifest['teacher_dims'])
  domains = tuple(config.data.domains)
  meta = {**manifest, 'directory': str(directory)}
  return (
    FeatureSplit(directory, 'train', spec, domains),
    FeatureSplit(directory, 'heldout', spec, domains),
    meta,
  )


def prepare(config) -> tuple[FeatureSplit, FeatureSplit, dict]:
  """Opens the store; builds it first where it has no index yet (the first start of a run whose
  store was not built with --mode features, or whose batch build left the index to it).

  An existing index is used as it is: corpus changes are picked up by `--mode features`.
  """
  if not (store_directory(config) / store.INDEX).exists():
    build(config)
  return open_store(config)


def source_bytes(config, paths: list[str]) -> list:
  """The bytes of clips' source files (store.source_bytes), or the OSError met."""
  return store.source_bytes(store_directory(config), paths)


def scan_id(task: int | None) -> str:
  """One id for one scan of the corpora by every builder: AGREPA_SCAN_ID, or a SLURM array's job
  id; the processes of a job take process 0's clock. Tasks without a shared id ('') list only
  the units not listed yet (and archives that changed)."""
  for variable in ('AGREPA_SCAN_ID', 'SLURM_ARRAY_JOB_ID'):
    if os.environ.get(variable):
      return os.environ[variable]
  if task is not None:
    return ''
  now = np.int64(time.time_ns())
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    now = multihost_utils.broadcast_one_to_all(now)
  return f'scan-{int(now)}'


def write_features_report(
  config, workdir, task: int | None = None, num_tasks: int = 1, refit_tokenizer: bool = False
) -> dict:
  """--mode features: lists the corpora again, builds what changed (this task's slice with
  `task`), verifies the checksums of finished shards, and when every shard is done writes the
  index and DIR/features.json."""
  if task is not None and not 0 <= task < num_tasks:
    raise DataError(f'--task={task} must be in 0..{num_tasks - 1} (--num_tasks={num_tasks})')
  scan = scan_id(task)
  options = job_options(
    config, task=task, num_tasks=num_tasks, scan=scan, verify=True, refit_tokenizer=refit_tokenizer
  )
  manifest = build(config, options)
  if not manifest['complete']:
    logging.info(
      'features: task %d of %d done (%s); the index is written once every shard is built',
      task,
      num_tasks,
      manifest['this_run'],
    )
    return manifest
  report = {
    'store': str(store_directory(config)),
    'num_clips': manifest['num_clips'],
    'clips_per_domain': manifest['clips_per_domain'],
    'num_shards': manifest['num_shards'],
    'missing_on_disk': missing_counts(manifest['problems']),
    'skipped': manifest['skipped'],
    'problems': manifest['problems'],
    'teacher_dims': manifest['teacher_dims'],
    'teachers': {d: dict(config.teachers[d]) for d in config.data.domains},
    'this_run': manifest['this_run'],
  }
  if jax.process_index() == 0:
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    features.write_json(workdir / 'features.json', report)
  return report


def missing_counts(problems: list) -> dict:
  """{domain: clips a corpus lists (an AudioSet CSV row) that are not on disk}."""
  counts = {}
  for problem in problems:
    if problem['reason'].endswith('but not on disk'):
      domain = problem['id'].split('/')[0]
      counts[domain] = counts.get(domain, 0) + 1
  return counts
