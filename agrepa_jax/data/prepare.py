"""From `config.data` and `config.teachers` to the train and held-out sources a run reads.

corpora (listing) -> tfds datasets (datasets.py, ArrayRecord) -> feature store (features.py,
ArrayRecord shards) -> grain (pipeline.py). The embedded corpus takes the same path as LibriSpeech
and AudioSet.
"""

import functools
import json

import jax
from etils import epath

from agrepa_jax import audio
from agrepa_jax.data import datasets, features, sources
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
  }


def store_directory(config) -> epath.Path:
  return cache_root(config) / f'features-{features.store_key(store_settings(config))}'


def on_process_zero_first(name: str, fn):
  """fn() on process 0, then on the others once it is done (for work that writes shared files)."""
  if jax.process_index() != 0:
    features.sync_processes(name)
  result = fn()
  if jax.process_index() == 0:
    features.sync_processes(name)
  return result


def listings(config) -> list[tuple[sources.Listing, dict]]:
  """[(listing, {domain: (train splits, heldout split or '')})] of the configured corpora."""
  data = config.data
  if data.source == 'embedded':
    root = cache_root(config) / (
      f'embedded-{data.seed}-{data.num_speech}-{data.num_audio}-{data.clip_seconds}'
    )
    listing = on_process_zero_first(
      'embedded-corpus',
      lambda: sources.embedded_listing(
        root, data.num_speech, data.num_audio, data.seed, data.clip_seconds
      ),
    )
    return [(listing, {d: (['train'], '') for d in data.domains})]
  if data.source != 'directories':
    raise ValueError(f"data.source={data.source!r}: expected 'embedded' or 'directories'")
  out = []
  for domain in data.domains:
    directory = data.get(f'{domain}_dir', '')
    if not directory:
      raise ValueError(
        f'data.{domain}_dir is empty: give the {domain} corpus or drop {domain!r} from data.domains'
      )
    name = data.datasets[domain]
    if name not in sources.LISTINGS:
      raise ValueError(f'data.datasets.{domain}={name!r}: expected one of {list(sources.LISTINGS)}')
    list_corpus = functools.partial(sources.LISTINGS[name], directory, cache_root(config))
    listing = on_process_zero_first(f'listing-{domain}', list_corpus)  # 0 caches archive scans
    out.append((listing, {domain: chosen_splits(listing, domain, data)}))
  return out


def chosen_splits(listing: sources.Listing, domain: str, data) -> tuple[list[str], str]:
  """The configured train splits and held-out split that the listing holds."""
  wanted = [s for s in data.train_splits[domain].split('+') if s]
  train = [s for s in wanted if s in listing.splits] or (
    ['train'] if 'train' in listing.splits else []
  )
  if not train:
    raise ValueError(
      f'data.train_splits.{domain}={data.train_splits[domain]!r}: none of these splits is in '
      f'{listing.root} (it holds {sorted(listing.splits)})'
    )
  heldout = data.heldout_splits[domain]
  return train, heldout if heldout in listing.splits else ''


def clip_refs(listing: sources.Listing, plan: dict, heldout_fraction: float) -> list:
  """ClipRefs of a listing's clips for the domains and splits of `plan`."""
  refs = []
  for domain, (train_splits, heldout_split) in plan.items():
    for split in [*train_splits, heldout_split] if heldout_split else train_splits:
      for index, entry in enumerate(listing.splits[split]):
        if entry.fields.get('domain', domain) != domain:
          continue
        clip_id = f'{domain}/{entry.id}'
        if split == heldout_split:
          role = 'heldout'
        elif heldout_split:
          role = 'train'
        else:
          role = features.split_of(clip_id, heldout_fraction)
        refs.append(
          features.ClipRef(
            clip_id,
            domain,
            role,
            f'{listing.name}/{split}',
            index,
            entry.stamp,
            entry.path,
            entry.fields.get('text', ''),
          )
        )
  return refs


class TfdsBytes:
  """read_bytes(ClipRef) over the tfds datasets, each opened once per process."""

  def __init__(self, built: dict):
    self.built, self.open = built, {}

  def __call__(self, ref: features.ClipRef) -> bytes:
    if ref.source not in self.open:
      name, split = ref.source.split('/')
      self.open[ref.source] = self.built[name].as_data_source(split)
    return self.open[ref.source][ref.index]['audio']


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


def build(config) -> dict:
  """Builds, resumes or updates the tfds datasets and the feature store of `config`; every process
  takes part. Returns the store's manifest."""
  domains = tuple(config.data.domains)
  refs, built = [], {}
  for listing, plan in listings(config):
    built[listing.name] = on_process_zero_first(
      f'tfds-{listing.name}', lambda listing=listing: datasets.build(listing, cache_root(config))
    )
    refs += clip_refs(listing, plan, config.data.heldout_fraction)
  try:
    manifest = features.build_store(
      refs,
      store_directory(config),
      store_settings(config),
      domains,
      TfdsBytes(built),
      lambda: load_teachers(config),
    )
  except features.NoUsableClips as e:
    roots = {d: config.data.get(f'{d}_dir') or 'the embedded corpus' for d in e.domains}
    raise ValueError(f'{e}; no usable audio file in {roots}') from e
  manifest['missing'] = {b.listing.corpus: b.listing.missing for b in built.values()}
  for domain in domains:
    dim = int(config.teachers[domain].dim)
    if dim and dim != manifest['teacher_dims'][domain]:
      raise ValueError(
        f'teachers.{domain}.dim={dim}, but the {domain} teacher gives '
        f'{manifest["teacher_dims"][domain]}-d features'
      )
  return manifest


def open_store(config, manifest: dict) -> tuple[FeatureSplit, FeatureSplit, dict]:
  directory = store_directory(config)
  spec = spec_lib.batch_spec(config, manifest['teacher_dims'])
  domains = tuple(config.data.domains)
  meta = {**manifest, 'directory': str(directory)}
  return (
    FeatureSplit(directory, 'train', spec, domains),
    FeatureSplit(directory, 'heldout', spec, domains),
    meta,
  )


def prepare(config) -> tuple[FeatureSplit, FeatureSplit, dict]:
  """Builds what is missing or changed, then opens the store's splits.

  A finished store of the embedded corpus is opened as it is (the corpus is fixed by the settings
  its key holds); real corpora are listed again, so added, removed or changed files are built in.
  """
  manifest_path = store_directory(config) / features.MANIFEST
  if config.data.source == 'embedded' and manifest_path.exists():
    return open_store(config, json.loads(manifest_path.read_text()))
  return open_store(config, build(config))


def write_features_report(config, workdir) -> dict:
  """--mode features: builds the store and writes what it holds to DIR/features.json."""
  manifest = build(config)
  report = {
    'store': str(store_directory(config)),
    'num_clips': manifest['num_clips'],
    'clips_per_domain': manifest['clips_per_domain'],
    'missing_on_disk': manifest['missing'],
    'skipped': manifest['skipped'],
    'teacher_dims': manifest['teacher_dims'],
    'teachers': {d: dict(config.teachers[d]) for d in config.data.domains},
    'this_run': manifest['this_run'],
  }
  if jax.process_index() == 0:
    workdir = epath.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / 'features.json').write_text(json.dumps(report, indent=2, default=str))
  return report
