"""From `config.data` and `config.teachers` to the train and held-out sources a run reads."""

import json
import pathlib

import jax

from agrepa_jax.data import cache, sources
from agrepa_jax.data.pipeline import CachedSplit


def cache_settings(config) -> dict:
  data = config.data
  return {
    'source': data.source,
    'domains': list(data.domains),
    'speech_dir': data.speech_dir,
    'audio_dir': data.audio_dir,
    'num_speech': data.num_speech,
    'num_audio': data.num_audio,
    'clip_seconds': data.clip_seconds,
    'heldout_fraction': data.heldout_fraction,
    'token_rate': data.token_rate,
    'codebook_size': config.model.vocab_size,
    'num_codebooks': config.model.num_codebooks,
    'seed': data.seed,
    'chunk_size': data.chunk_size,
    'teacher_frames': data.teacher_frames,
    'teachers': {d: dict(config.teachers[d]) for d in data.domains},
  }


def list_clips(config) -> list[sources.Clip]:
  data = config.data
  cache_root = pathlib.Path(data.cache_dir).expanduser()
  if data.source == 'embedded':
    if jax.process_index() != 0:  # process 0 generates the corpus; the others read it
      cache.sync_processes('embedded-corpus')
    clips = sources.embedded_clips(
      cache_root / f'embedded-{data.seed}-{data.num_speech}-{data.num_audio}-{data.clip_seconds}',
      data.num_speech,
      data.num_audio,
      data.seed,
      data.clip_seconds,
    )
    if jax.process_index() == 0:
      cache.sync_processes('embedded-corpus')
    return clips
  if data.source == 'directories':
    dirs = {'speech': data.speech_dir, 'audio': data.audio_dir}
    return [
      clip
      for domain in data.domains
      if dirs.get(domain)
      for clip in sources.directory_clips(dirs[domain], domain)
    ]
  raise ValueError(f"data.source={data.source!r}: expected 'embedded' or 'directories'")


def load_teachers(config) -> dict:
  """One teacher per domain; domains naming the same teacher and checkpoint share one instance."""
  from agrepa_jax.teachers import load_teacher

  by_key, per_domain = {}, {}
  for domain in config.data.domains:
    spec = config.teachers[domain]
    key = (spec.name, spec.checkpoint)
    if key not in by_key:
      by_key[key] = load_teacher(spec.name, spec.checkpoint or None)
    per_domain[domain] = by_key[key]
  return per_domain


def cache_directory(config) -> pathlib.Path:
  return (
    pathlib.Path(config.data.cache_dir).expanduser()
    / f'cache-{cache.cache_key(cache_settings(config))}'
  )


def build(config) -> dict:
  """Builds (or resumes building) the data cache of `config`; every process takes part. Returns meta."""
  domains = tuple(config.data.domains)
  configured_dims = {d: int(config.teachers[d].dim) for d in domains}
  directory = cache_directory(config)
  if (directory / 'COMPLETE').exists():
    meta = json.loads((directory / 'meta.json').read_text())
  else:
    meta = cache.build_cache(
      list_clips(config), directory, cache_settings(config), domains, lambda: load_teachers(config)
    )
  for domain, dim in configured_dims.items():
    if dim and dim != meta['teacher_dims'][domain]:
      raise ValueError(
        f'teachers.{domain}.dim={dim}, but the {domain} teacher gives {meta["teacher_dims"][domain]}-d '
        'features'
      )
  return meta


def prepare(config) -> tuple[CachedSplit, CachedSplit, dict]:
  """Builds the cache if needed, then opens its splits."""
  directory = cache_directory(config)
  meta = build(config)
  meta['directory'] = str(directory)
  open_split = lambda split: CachedSplit(
    directory / split,
    tuple(config.data.domains),
    config.data.teacher_frames,
    config.data.token_dir or None,
    config.model.vocab_size,
  )
  return open_split('train'), open_split('heldout'), meta


def write_features_report(config, workdir: pathlib.Path) -> dict:
  """--mode features: builds the cache and writes what it holds to DIR/features.json."""
  was_complete = (cache_directory(config) / 'COMPLETE').exists()
  meta = build(config)
  report = {
    'cache': str(cache_directory(config)),
    'num_clips': meta['num_clips'],
    'skipped': len(meta['skipped']),
    'teacher_dims': meta['teacher_dims'],
    'teachers': {d: dict(config.teachers[d]) for d in config.data.domains},
    'this_run': 'the cache was already complete' if was_complete else meta['feature_stats'],
  }
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'features.json').write_text(json.dumps(report, indent=2, default=str))
  return report
