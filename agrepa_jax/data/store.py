"""Building the feature store: every builder lists, plans and computes its share through claims.

A builder is a process of a training job, a task of a batch job (`--mode features --task I
--num_tasks N`: a SLURM array, TPU-VM workers), or a run started by hand. Builders never meet in a
collective: they share the work through claims on the store's files (claims.py) and poll for
what others are computing. The stages, each resumable:

1. Listing (sources.py): each unit of each corpus (an archive, a bucket of a folder tree) is
   listed by one builder into `listing/`: its clips, their stamps, the problems found. A unit
   already listed is reused; an archive whose size and mtime are unchanged is not read again.
   Directory trees are listed again only by a new scan (`--mode features`).
2. Plan (plan.py, `plan.json`): the clips cut into content-defined shards, each with a digest of
   its inputs (clip ids, sizes, modification times), and the tokenizer's sample.
3. Tokenizer (`tokenizer/<domain>.npy`): fitted once by one builder; kept until asked to refit.
4. Shards: a shard is done when its sidecar (`shards/<split>-<index>.json`) holds the fingerprint
   of its inputs, settings and codebooks, and the checksum of its file. A task builds its slice
   (a contiguous run of shards); the processes of a training job build their slices and then
   help with whatever is left, so they finish within about one shard of each other.
5. Index (`index.npz`, `manifest.json`, the tfds metadata, `index.json` last): written once every
   shard is done, by the builder that finds them so. A training start reads only this.
"""

import dataclasses
import functools
import gzip
import hashlib
import heapq
import itertools
import json
import logging
import time

import tqdm
from etils import epath

from agrepa_jax.data import DataError, features, plan, records, sources
from agrepa_jax.data import claims as claims_lib
from agrepa_jax.data import index as index_lib

SPLITS = index_lib.SPLITS
INDEX = index_lib.INDEX


@dataclasses.dataclass(frozen=True)
class Corpus:
  """One domain's corpus: its kind (sources.CORPORA or 'embedded'), root and splits."""

  domain: str
  kind: str
  root: str
  splits: sources.Splits

  def units(self) -> list[sources.Unit]:
    return sources.corpus_units(self.domain, self.kind, self.root, self.splits)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """How one builder takes part. task=None: a process of a training job, or a run by hand: it
  starts with its slice (`task` = its process index) and then takes any shard still free."""

  task: int | None = None
  num_tasks: int = 1
  process: int = 0  # the slice a builder without a task starts with
  num_processes: int = 1
  scan: str = ''  # list every unit again that was not listed under this scan ('' = keep them)
  refit_tokenizer: bool = False
  verify: bool = False  # check the checksums of this builder's finished shards, rebuild bad ones
  stale_after: float = 600.0  # seconds without a heartbeat after which a claim is free again
  poll_seconds: float = 2.0


def digest(value) -> str:
  return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_json(path: epath.Path):
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def write_gzip_json(path: epath.Path, value) -> None:
  blob = gzip.compress(json.dumps(value).encode(), compresslevel=6, mtime=0)
  features.atomic_write(path, lambda local: epath.Path(local).write_bytes(blob))


def read_gzip_json(path: epath.Path):
  return json.loads(gzip.decompress(path.read_bytes()))


class TokenizerSample:
  """The at most `size` training clips of a domain with the smallest id hashes, [unit key,
  position]: a fixed sample that does not grow with the corpus, kept in a bounded heap."""

  def __init__(self, size: int):
    self.size, self.heap = size, []

  def feed(self, listing) -> None:
    columns = listing.columns
    for position, (clip_id, role) in enumerate(zip(columns['id'], columns['split'], strict=True)):
      if role != 'train':
        continue
      entry = (-sources.stable_hash(clip_id), clip_id, listing.unit.key, position)
      if len(self.heap) < self.size:
        heapq.heappush(self.heap, entry)
      elif entry > self.heap[0]:
        heapq.heapreplace(self.heap, entry)

  def chosen(self) -> list:
    return sorted([unit_key, position] for _, _, unit_key, position in self.heap)


class Store:
  """A feature store directory and one builder's view of it."""

  def __init__(self, directory, settings, domains, corpora, load_teachers, options=None):
    self.directory = epath.Path(directory)
    self.settings, self.domains, self.corpora = settings, tuple(domains), list(corpora)
    self.load_teachers = load_teachers
    self.options = options or BuildOptions()
    self.key = features.store_key(settings)
    self.claims = claims_lib.Claims(self.directory / 'claims', self.options.stale_after)
    self.stats = {'listed': 0, 'computed': 0, 'clips': 0, 'seconds': 0.0}

  # ----- stage 1: listings -----

  @functools.cached_property
  def units(self) -> list[sources.Unit]:
    return [u for corpus in self.corpora for u in corpus.units()]

  @functools.cached_property
  def units_by_key(self) -> dict:
    return {u.key: u for u in self.units}

  def splits_of(self, unit: sources.Unit) -> sources.Splits:
    return next(c.splits for c in self.corpora if c.domain == unit.domain)

  def listing_path(self, unit_key: str, suffix: str) -> epath.Path:
    return self.directory / 'listing' / f'{unit_key}.{suffix}'

  def listing_meta(self, unit: sources.Unit) -> dict | None:
    return read_json(self.listing_path(unit.key, 'meta.json'))

  def is_listed(self, unit: sources.Unit) -> bool:
    meta = self.listing_meta(unit)
    if meta is None or meta['unit'] != dataclasses.asdict(unit):
      return False
    if unit.archive:  # its own size and mtime tell whether it changed
      return meta['stamp'] == sources.file_stamp(epath.Path(unit.root).expanduser() / unit.archive)
    return not self.options.scan or meta['scan'] == self.options.scan

  def list_unit(self, unit: sources.Unit) -> None:
    listing, gzip_index = sources.list_unit(unit, self.splits_of(unit))
    if gzip_index:
      features.atomic_write(
        self.listing_path(unit.key, 'gzindex'),
        lambda local: epath.Path(local).write_bytes(gzip_index),
      )
    content = {'columns': listing.columns}
    write_gzip_json(self.listing_path(unit.key, 'clips.json.gz'), content)
    features.write_json(self.listing_path(unit.key, 'problems.json'), listing.problems)
    meta = {
      'unit': dataclasses.asdict(unit),
      'scan': self.options.scan,
      'stamp': listing.stamp,
      'digest': digest(content),
      'num_clips': len(listing),
      'num_problems': len(listing.problems),
    }
    features.write_json(self.listing_path(unit.key, 'meta.json'), meta)  # last: marks it listed
    self.stats['listed'] += 1

  @functools.lru_cache(maxsize=4)  # noqa: B019 (one Store per build)
  def listing(self, unit_key: str) -> sources.UnitListing:
    content = read_gzip_json(self.listing_path(unit_key, 'clips.json.gz'))
    return sources.UnitListing(self.units_by_key[unit_key], content['columns'], [])

  @functools.lru_cache(maxsize=4)  # noqa: B019
  def gzip_index(self, unit_key: str) -> bytes:
    path = self.listing_path(unit_key, 'gzindex')
    return path.read_bytes() if path.exists() else b''

  def ensure_listings(self) -> None:
    units = self.in_task_order(self.units)
    self.share_work(
      [f'list-{u.key}' for u in units],
      is_done=lambda name: self.is_listed(self.units_by_key[name[len('list-') :]]),
      work=lambda name: self.list_unit(self.units_by_key[name[len('list-') :]]),
      what='listing',
    )

  # ----- stage 2: the plan -----

  def listing_digest(self) -> str:
    return digest(
      [self.settings['shard_clips'], [(u.key, self.listing_meta(u)['digest']) for u in self.units]]
    )

  def plan_is_current(self) -> bool:
    existing = read_json(self.directory / 'plan.json')
    return existing is not None and existing['listing_digest'] == self.listing_digest()

  def write_plan(self) -> None:
    """plan.json from one pass over the unit listings (one in memory at a time)."""
    previous = read_json(self.directory / 'plan.json') or {'shards': {}}
    indices = {s: {e['key']: e['index'] for e in es} for s, es in previous['shards'].items()}
    cutters = {split: plan.Cutter(split, self.settings['shard_clips']) for split in SPLITS}
    samples = {d: TokenizerSample(self.settings['tokenizer_clips']) for d in self.domains}
    clips = dict.fromkeys(self.domains, 0)
    for unit in self.units:
      listing = self.listing(unit.key)
      for cutter in cutters.values():
        cutter.feed(listing)
      samples[unit.domain].feed(listing)
      clips[unit.domain] += len(listing)
    empty = [d for d, n in clips.items() if not n]
    if empty:
      raise DataError(
        f'domain(s) {empty} have no clips; give their data or drop them from data.domains'
      )
    shards, counts = plan.assign_shards({s: c.finish() for s, c in cutters.items()}, indices)
    value = {
      'listing_digest': self.listing_digest(),
      'num_indices': counts,
      'shards': {split: [dataclasses.asdict(s) for s in ss] for split, ss in shards.items()},
      'tokenizer_sample': {d: sample.chosen() for d, sample in samples.items()},
    }
    features.write_json(self.directory / 'plan.json', value)

  def ensure_plan(self) -> dict:
    """The current plan.json: {'shards': {split: [Shard]}, 'num_indices', 'tokenizer_sample'}."""
    self.share_work(
      ['plan'],
      is_done=lambda _: self.plan_is_current(),
      work=lambda _: self.write_plan(),
      what='the shard plan',
    )
    value = json.loads((self.directory / 'plan.json').read_text())
    value['shards'] = {s: [plan.Shard(**e) for e in es] for s, es in value['shards'].items()}
    return value

  # ----- reading clips -----

  def refs(self, split: str, segments) -> list[features.ClipRef]:
    """The ClipRefs of store split `split` in the given (unit key, start, end) segments."""
    out = []
    for unit_key, start, end in segments:
      unit = self.units_by_key[unit_key]
      columns = self.listing(unit_key).columns
      for i in range(start, end):
        if columns['split'][i] != split:
          continue
        out.append(
          features.ClipRef(
            id=columns['id'][i],
            domain=unit.domain,
            split=split,
            unit=unit_key,
            path=sources.location(unit, columns['path'][i]),
            offset=columns['offset'][i],
            size=columns['size'][i],
            mtime=columns['mtime'][i],
            text=columns['text'][i],
            labels=tuple(columns['labels'][i]),
          )
        )
    return out

  def clip_bytes(self, refs):
    """Yields (ref, the file's bytes or the OSError met) in order; archive members of a unit are
    read in one forward pass from their offsets (no pass from the archive's start)."""
    for unit_key, group in itertools.groupby(refs, key=lambda r: r.unit):
      unit = self.units_by_key[unit_key]
      if unit.archive:
        archive = epath.Path(unit.root).expanduser() / unit.archive
        yield from read_archive_clips(archive, self.gzip_index(unit_key), list(group))
        continue
      for ref in group:
        try:
          yield ref, epath.Path(ref.path).read_bytes()
        except OSError as e:
          yield ref, e

  # ----- stage 3: the tokenizer -----

  def tokenizer_path(self, domain: str) -> epath.Path:
    return self.directory / 'tokenizer' / f'{domain}.npy'

  def tokenizer_is_fitted(self, domain: str) -> bool:
    """Fitted; with refit_tokenizer, fitted in this scan (the builders of a scan refit once)."""
    fitted_in = read_json(self.tokenizer_path(domain).with_suffix('.json'))
    if fitted_in is None or not self.tokenizer_path(domain).exists():
      return False
    return not self.options.refit_tokenizer or fitted_in['scan'] == self.options.scan

  def ensure_tokenizers(self, sample: dict) -> dict:
    """{domain: [(V, C) codebook]}; {} with external token files."""
    if self.settings['token_dir']:
      return {}
    if self.options.refit_tokenizer and not self.options.scan:
      raise DataError(
        '--refit_tokenizer with --task needs one scan id for all tasks: run it as a SLURM array '
        '(SLURM_ARRAY_JOB_ID) or set AGREPA_SCAN_ID'
      )

    def fit(name):
      domain = name[len('tokenizer-') :]
      refs = [
        r
        for unit, position in sample[domain]
        for r in self.refs('train', [(unit, position, position + 1)])
      ]
      seed = self.settings['seed'] + self.domains.index(domain)
      codebooks = features.fit_tokenizer(self.clip_bytes(refs), domain, self.workers(), seed)
      path = self.tokenizer_path(domain)
      features.atomic_write(path, lambda local: features.save_npy(local, codebooks))
      features.write_json(
        path.with_suffix('.json'), {'scan': self.options.scan, 'clips': len(refs)}
      )

    self.share_work(
      [f'tokenizer-{d}' for d in self.domains],
      is_done=lambda name: self.tokenizer_is_fitted(name[len('tokenizer-') :]),
      work=fit,
      what='the tokenizer',
    )
    return {d: list(features.read_npy(self.tokenizer_path(d))) for d in self.domains}

  @functools.cached_property
  def teachers(self) -> dict:
    return self.load_teachers()

  def workers(self, codebooks=None) -> features.Workers:
    return features.Workers(
      self.settings, self.domains, self.teachers, codebooks or {}, features.feature_mesh()
    )

  # ----- stage 4: shards -----

  def fingerprint(self, shard: plan.Shard, codebooks: str) -> str:
    return digest([self.key, codebooks, shard.inputs])

  def shard_is_done(self, shard: plan.Shard, codebooks: str, verify: bool = False) -> bool:
    sidecar = read_json(index_lib.sidecar_path(self.directory, shard.split, shard.index))
    if sidecar is None or sidecar['fingerprint'] != self.fingerprint(shard, codebooks):
      return False
    if verify:
      path = records.shard_path(self.directory, shard.split, shard.index)
      found = records.file_checksum(path) if path.exists() else 'missing'
      if found != sidecar['checksum']:
        logging.warning(
          '%s is damaged (checksum %s, expected %s): rebuilding it',
          path,
          found,
          sidecar['checksum'],
        )
        return False
    return True

  def build_shard(self, shard: plan.Shard, workers: features.Workers, codebooks: str) -> None:
    start = time.perf_counter()
    refs = self.refs(shard.split, shard.segments)
    built, skipped = features.build_records(self.clip_bytes(refs), workers)
    codec = records.features_dict(self.settings, self.domains)
    fingerprint = self.fingerprint(shard, codebooks)
    index_lib.write_shard(
      self.directory, codec, shard.split, shard.index, built, fingerprint, skipped
    )
    self.stats['computed'] += 1
    self.stats['clips'] += len(refs)
    self.stats['seconds'] += time.perf_counter() - start

  def ensure_shards(self, shards: list[plan.Shard], codebooks: dict) -> None:
    """Builds this builder's slice of `shards`; a builder without a task then takes every shard
    still free, so the processes of a job finish together."""
    code = features.codebook_digest(codebooks) if codebooks else 'token files'
    by_name = {s.name: s for s in shards}
    mine = [s.name for s in plan.task_slice(shards, *self.slice_position())]
    names = mine
    if self.options.task is None:
      names = mine + [name for name in by_name if name not in set(mine)]
    verify = set(mine) if self.options.verify else set()
    workers = None

    def work(name):
      nonlocal workers
      workers = workers or self.workers(codebooks)
      self.build_shard(by_name[name], workers, code)

    with tqdm.tqdm(total=len(names), desc='features (decode, mel, teachers)', unit='shard') as bar:
      self.share_work(
        names,
        is_done=lambda name: self.shard_is_done(by_name[name], code, name in verify),
        work=work,
        what='shards',
        progress=bar,
      )

  def slice_position(self) -> tuple[int, int]:
    """(slice, number of slices) of this builder: its task, or its process of the job."""
    if self.options.task is not None:
      return self.options.task, self.options.num_tasks
    return self.options.process, self.options.num_processes

  # ----- sharing work -----

  def in_task_order(self, items: list) -> list:
    """`items` rotated to start at this builder's share, so builders start on different ones."""
    task, count = self.slice_position()
    offset = len(items) * task // max(count, 1)
    return items[offset:] + items[:offset]

  def share_work(self, names, is_done, work, what: str, progress=None) -> None:
    """Runs work(name) for every name not done, each under its claim; waits for the names other
    builders hold (a stale claim is taken over)."""
    pending = list(names)
    last_log = time.monotonic()
    while pending:
      progressed = False
      for name in list(pending):
        if is_done(name):
          pending.remove(name)
          progressed = True
          if progress is not None:
            progress.update()
          continue
        if self.claims.try_claim(name):
          with self.claims.held(name):
            if not is_done(name):
              work(name)
          pending.remove(name)
          progressed = True
          if progress is not None:
            progress.update()
      if pending and not progressed:
        if time.monotonic() - last_log > 60:
          holders = {n: self.claims.holder(n) for n in pending[:3]}
          logging.info(
            'waiting for %d pieces of %s held by other builders, e.g. %s',
            len(pending),
            what,
            holders,
          )
          last_log = time.monotonic()
        time.sleep(self.options.poll_seconds)

  # ----- stage 5: the index -----

  def index_identity(self, shard_plan: dict, codebooks: dict) -> dict:
    code = features.codebook_digest(codebooks) if codebooks else 'token files'
    shards = [s for split in SPLITS for s in shard_plan['shards'][split]]
    return {'store': self.key, 'fingerprints': digest([self.fingerprint(s, code) for s in shards])}

  def index_is_current(self, identity: dict) -> bool:
    return read_json(self.directory / INDEX) == identity

  def write_index(self, shard_plan: dict, codebooks: dict, identity: dict) -> None:
    """Checks every shard, then writes empty shards for unused indices, the compact index, the
    tfds metadata, the manifest and the report; index.json last."""
    code = features.codebook_digest(codebooks) if codebooks else 'token files'
    shards = [s for split in SPLITS for s in shard_plan['shards'][split]]
    pending = [s.name for s in shards if not self.shard_is_done(s, code)]
    if pending:
      raise RuntimeError(f'{len(pending)} shards are not built yet, e.g. {pending[:3]}')
    codec = records.features_dict(self.settings, self.domains)
    for split in SPLITS:
      used = {s.index for s in shard_plan['shards'][split]}
      for index in set(range(shard_plan['num_indices'][split])) - used:
        index_lib.write_shard(self.directory, codec, split, index, [], 'empty', [])
    problems = [
      p for u in self.units for p in read_json(self.listing_path(u.key, 'problems.json')) or []
    ]
    units = {u.key: (self.listing_meta(u) or {}).get('num_clips', 0) for u in self.units}
    index_lib.write_index(
      self.directory, self.settings, self.domains, shard_plan['num_indices'], problems, units
    )
    features.write_json(self.directory / INDEX, identity)

  # ----- the whole build -----

  def build(self) -> bool:
    """Lists, plans and builds this builder's share; writes the index when every shard is done.
    Returns whether the index is written (a task whose slice finished first may leave it to a
    later builder)."""
    self.ensure_listings()
    shard_plan = self.ensure_plan()
    codebooks = self.ensure_tokenizers(shard_plan['tokenizer_sample'])
    shards = [s for split in SPLITS for s in shard_plan['shards'][split]]
    self.ensure_shards(shards, codebooks)
    identity = self.index_identity(shard_plan, codebooks)
    code = features.codebook_digest(codebooks) if codebooks else 'token files'
    if self.options.task is not None and not all(self.shard_is_done(s, code) for s in shards):
      return False
    self.share_work(
      ['index'],
      is_done=lambda _: self.index_is_current(identity),
      work=lambda _: self.write_index(shard_plan, codebooks, identity),
      what='the store index',
    )
    return True


def source_bytes(directory: epath.Path, paths: list[str]) -> list:
  """The bytes of clips' source files by the paths a store records — a file, or
  '<archive>/<member>' read through the archive's seek index kept in the store — or the OSError
  met reading each: an unreadable one costs that clip only."""
  listing = directory / 'listing'
  metas = [read_json(p) for p in listing.glob('*.meta.json')] if listing.exists() else []
  archives = {}
  for meta in metas:
    unit = sources.Unit(**meta['unit'])
    if unit.archive:
      archives[sources.location(unit, '')] = unit
  out = []
  for path in paths:
    prefix = next((p for p in archives if path.startswith(p)), None)
    if prefix is None:
      try:
        out.append(epath.Path(path).read_bytes())
      except OSError as e:
        out.append(e)
      continue
    unit = archives[prefix]
    columns = read_gzip_json(listing / f'{unit.key}.clips.json.gz')['columns']
    member = path[len(prefix) :]
    if member not in columns['path']:
      out.append(FileNotFoundError(f'{path}: the listing of {unit.archive} has no such member'))
      continue
    i = columns['path'].index(member)
    ref = features.ClipRef(
      '', unit.domain, '', unit.key, path, columns['offset'][i], columns['size'][i], 0
    )
    index_path = listing / f'{unit.key}.gzindex'
    gzip_index = index_path.read_bytes() if index_path.exists() else b''
    archive = epath.Path(unit.root).expanduser() / unit.archive
    out += [data for _, data in read_archive_clips(archive, gzip_index, [ref])]
  return out


def read_archive_clips(archive: epath.Path, gzip_index: bytes, refs):
  """(ref, bytes or OSError) of archive members, read forward from their offsets; a damaged
  region costs the members in it only."""
  try:
    stream = sources.open_archive_stream(archive, gzip_index or None)
  except OSError as e:
    yield from ((ref, e) for ref in refs)
    return
  with stream:
    for ref in refs:
      try:
        stream.seek(ref.offset)
        data = stream.read(ref.size)
        if len(data) != ref.size:
          raise OSError(f'the archive ends {ref.size - len(data)} bytes early')
        yield ref, data
      except Exception as e:  # noqa: BLE001 zlib and indexed_gzip raise their own types
        yield ref, OSError(f'{type(e).__name__}: {e}')
