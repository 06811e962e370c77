"""From `config.data` and `config.teachers` to the train and held-out sources a run reads."""
import json
import pathlib

import jax

from agrepa_jax.data import cache, sources
from agrepa_jax.data.pipeline import CachedSplit


def cache_settings(config) -> dict:
  data = config.data
  return {
      'source': data.source, 'speech_dir': data.speech_dir, 'audio_dir': data.audio_dir,
      'num_speech': data.num_speech, 'num_audio': data.num_audio, 'clip_seconds': data.clip_seconds,
      'heldout_fraction': data.heldout_fraction, 'token_rate': data.token_rate,
      'codebook_size': config.model.vocab_size, 'num_codebooks': config.model.num_codebooks,
      'seed': data.seed, 'batch_size': data.feature_batch_size, 'teacher_frames': data.teacher_frames,
      'teachers': {d: dict(config.teachers[d]) for d in data.domains},
  }


def list_clips(config) -> list[sources.Clip]:
  data = config.data
  cache_root = pathlib.Path(data.cache_dir).expanduser()
  if data.source == 'embedded':
    return sources.embedded_clips(cache_root / f'embedded-{data.seed}-{data.num_speech}-{data.num_audio}-'
                                  f'{data.clip_seconds}', data.num_speech, data.num_audio, data.seed,
                                  data.clip_seconds)
  if data.source == 'directories':
    dirs = {'speech': data.speech_dir, 'audio': data.audio_dir}
    return [clip for domain in data.domains if dirs.get(domain)
            for clip in sources.directory_clips(dirs[domain], domain)]
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


def prepare(config) -> tuple[CachedSplit, CachedSplit, dict]:
  """Builds the cache on process 0 if needed (others wait), then opens its splits."""
  settings = cache_settings(config)
  directory = pathlib.Path(config.data.cache_dir).expanduser() / f'cache-{cache.cache_key(settings)}'
  domains = tuple(config.data.domains)
  if jax.process_index() == 0 and not (directory / 'COMPLETE').exists():
    cache.build_cache(list_clips(config), directory, settings, domains, load_teachers(config))
  cache.sync_processes('data-cache')
  meta = json.loads((directory / 'meta.json').read_text())
  meta['directory'] = str(directory)
  open_split = lambda split: CachedSplit(directory / split, domains, config.data.teacher_frames,
                                         config.data.token_dir or None)
  return open_split('train'), open_split('heldout'), meta
