"""The feature store: one record per clip in sharded ArrayRecord files that every host writes.

A record (msgpack of numpy arrays) holds the clip at its native length (up to data.max_seconds):
`mel` (T, 100) bf16, `num_samples` (24 kHz samples of audio), `domain`, `teacher` (C_d,) float32
(the utterance mean of its own domain's teacher), `tokens` (K, N) int32 at data.token_rate, with
data.teacher_frames `teacher_frames` (F, C_d) bf16, and with teachers.online `audio` (S,) int16 PCM
at its domain's teacher rate (the teacher computed the stored targets from exactly this audio);
plus `id`, `path`, `text`.

Layout of a store directory:
  tokenizer/<domain>-<digest>.npy   (K, V, C) codebooks of the built-in tokenizer
  <split>/shard-IIIII-of-NNNNN.array_record  the records of the clips whose id hashes to shard I
  <split>/shard-IIIII-of-NNNNN.json  its sidecar: fingerprint, per-record id/domain/num_samples/
                                     path/text, and the clips skipped with their reasons
  manifest.json                     counts, teacher widths, skipped clips (written last)

Clips go to shards by a hash of their id and shard I is built by host I mod process_count, so no
host assembles anything and a changed input list changes only the shards whose clips changed. A
shard is done when its sidecar holds the fingerprint of its inputs (clip ids and file stamps,
settings, codebooks); files are written under a temporary name and renamed, so a build resumed
after a crash gives exactly the result of a clean build.
"""

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import time
import zlib

import jax
import jax.numpy as jnp
import librosa
import ml_dtypes
import numpy as np
import tqdm
from array_record.python import array_record_module
from etils import epath
from flax import serialization

from agrepa_jax import audio, sharding
from agrepa_jax.data import spec as spec_lib
from agrepa_jax.data import tokenizer
from agrepa_jax.teachers.base import Teacher, masked_mean

STORE_VERSION = 3  # settings (the store key) say whether records hold audio
SPLITS = ('train', 'heldout')
MANIFEST = 'manifest.json'


@dataclasses.dataclass(frozen=True)
class ClipRef:
  """One clip the store is built from."""

  id: str  # unique in the store
  domain: str
  split: str  # train | heldout
  source: str  # the tfds split holding its bytes, e.g. 'librispeech/train_clean_100'
  index: int  # its example index there
  stamp: str  # size and modification time of the file: a changed file changes its shard
  path: str
  text: str = ''


class ClipError(ValueError):
  """A clip that cannot be used; the message names its file and the reason."""


class NoUsableClips(ValueError):
  """Some domain has no usable training clip; `domains` names them."""

  def __init__(self, domains: list[str], detail: str):
    super().__init__(f'no usable training clips of domain(s) {domains} ({detail})')
    self.domains = domains


def store_key(settings: dict) -> str:
  blob = json.dumps({'version': STORE_VERSION, **settings}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def stable_hash(text: str) -> int:
  return zlib.crc32(text.encode())


def split_of(clip_id: str, heldout_fraction: float) -> str:
  """Deterministic split by a hash of the clip id, stable when clips are added."""
  return 'heldout' if stable_hash(clip_id) % 10_000 < heldout_fraction * 10_000 else 'train'


def num_shards_for(num_clips: int, shard_clips: int) -> int:
  """A power of two near num_clips / shard_clips: it changes (and reshards) only when the corpus
  doubles or halves."""
  return 1 << max(0, round(np.log2(max(num_clips / shard_clips, 1.0))))


def shard_name(index: int, count: int) -> str:
  return f'shard-{index:05d}-of-{count:05d}'


# ----- records -----


def encode_record(record: dict) -> bytes:
  return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict:
  return serialization.msgpack_restore(data)


def atomic_write(path: epath.Path, write_local) -> None:
  """Calls write_local(local file path), then moves the file to `path` (local or remote) at once."""
  path.parent.mkdir(parents=True, exist_ok=True)
  local_dir = str(path.parent) if os.path.isdir(str(path.parent)) else None
  handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', dir=local_dir)
  os.close(handle)
  try:
    write_local(temporary)
    if local_dir:
      os.replace(temporary, str(path))
    else:
      epath.Path(temporary).copy(path, overwrite=True)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_records(path: epath.Path, records: list[bytes]) -> None:
  def write(local):
    writer = array_record_module.ArrayRecordWriter(local, 'group_size:1')
    for record in records:
      writer.write(record)
    writer.close()

  atomic_write(path, write)


def write_json(path: epath.Path, value) -> None:
  atomic_write(path, lambda local: epath.Path(local).write_text(json.dumps(value, default=str)))


def write_shard(directory: epath.Path, name: str, records: list[dict], sidecar: dict) -> None:
  """Writes a shard's records, then its sidecar (which marks the shard done)."""
  write_records(directory / f'{name}.array_record', [encode_record(r) for r in records])
  columns = {
    'ids': [r['id'] for r in records],
    'domain': [int(r['domain']) for r in records],
    'num_samples': [int(r['num_samples']) for r in records],
    'paths': [r['path'] for r in records],
    'texts': [r['text'] for r in records],
  }
  write_json(directory / f'{name}.json', {**sidecar, **columns, 'num_records': len(records)})


# ----- decoding, mels, teachers, tokens -----


def decode_clip(ref: ClipRef, data: bytes, max_samples: int) -> np.ndarray:
  """The clip's 24 kHz waveform, at most max_samples long. Raises ClipError for any bad file."""
  try:
    return audio.decode_audio(data, ref.path)[:max_samples]
  except audio.AudioDecodeError as e:
    raise ClipError(str(e)) from e
  except Exception as e:  # anything else a file can do (e.g. a resampler error) is this file's
    raise ClipError(f'{ref.path}: {type(e).__name__}: {e}') from e


def feature_mesh():
  """This host's devices along the batch axes: teacher batches are sharded over them."""
  return sharding.make_mesh({'data': -1, 'fsdp': 1}, jax.local_devices())


def pad_rows(batch: np.ndarray, rows: int) -> np.ndarray:
  """Zero rows appended up to `rows`."""
  extra = rows - len(batch)
  return (
    np.concatenate([batch, np.zeros((extra, *batch.shape[1:]), batch.dtype)]) if extra else batch
  )


def pad_waves(waves: list[np.ndarray], length: int) -> np.ndarray:
  out = np.zeros((len(waves), length), np.float32)
  for i, wave in enumerate(waves):
    out[i, : len(wave)] = wave
  return out


def teacher_audio(waves: np.ndarray, num_samples: np.ndarray, rate: int):
  """(N, S) 24 kHz waves -> (N, S') int16 PCM at `rate`, zero past each clip's end, and the
  (N,) sample counts at `rate`: what the store keeps for online teachers."""
  resampled = librosa.resample(
    waves, orig_sr=audio.SAMPLE_RATE, target_sr=rate, res_type='soxr_hq', axis=-1
  )
  teacher_samples = np.ceil(num_samples * rate / audio.SAMPLE_RATE).astype(np.int64)
  inside = np.arange(resampled.shape[-1])[None, :] < teacher_samples[:, None]
  return np.where(inside, spec_lib.to_pcm16(resampled), 0).astype(np.int16), teacher_samples


def teacher_features(
  teacher: Teacher,
  waves: np.ndarray,
  num_samples: np.ndarray,
  mesh,
  rows: int = 0,
  pcm: tuple | None = None,
):
  """Utterance means (N, C) over frames holding audio, frame features (N, F, C) and their mask.

  waves (N, S) are 24 kHz, zero past num_samples; they are resampled to the teacher's rate, padded
  to `rows` rows rounded up to a multiple of the mesh size (one shape: the teacher compiles once)
  and sharded over the mesh. pcm: `teacher_audio(waves, num_samples, rate)`, which the teacher then
  reads instead: exactly the audio the store keeps for online teachers, so stored and online
  targets agree.
  """
  rate = teacher.spec.sample_rate
  if pcm is not None:
    pcm16, teacher_samples = pcm
    resampled = pcm16.astype(np.float32) / spec_lib.PCM_SCALE
  else:
    resampled = librosa.resample(
      waves, orig_sr=audio.SAMPLE_RATE, target_sr=rate, res_type='soxr_hq', axis=-1
    )
    teacher_samples = np.ceil(num_samples * rate / audio.SAMPLE_RATE).astype(np.int64)
  rows = -(-max(rows, len(waves)) // mesh.devices.size) * mesh.devices.size
  batch = jax.device_put(
    pad_rows(resampled.astype(np.float32), rows), sharding.batch_sharding(mesh)
  )
  frames, mask = teacher.features(batch, pad_rows(teacher_samples, rows))
  frames, mask = np.asarray(frames, np.float32)[: len(waves)], np.asarray(mask)[: len(waves)]
  return masked_mean(frames, mask), frames, mask


def token_features(frames: np.ndarray, valid: int, num_samples: int, token_rate: float):
  """(F, C) teacher frames of a clip -> (N, C) means at the token rate over its `valid` frames."""
  seconds = num_samples / audio.SAMPLE_RATE
  return tokenizer.pool_to_rate(frames[: max(valid, 1)], spec_lib.token_count(seconds, token_rate))


def read_token_file(token_dir: str, ref: ClipRef, settings: dict) -> np.ndarray:
  """External tokens `<token_dir>/<clip id>.npy`, (N,) or (K, N) at data.token_rate, cut to the
  clip's stored audio (never stretched)."""
  path = epath.Path(token_dir) / f'{ref.id}.npy'
  if not path.exists():
    raise FileNotFoundError(f'token file for clip {ref.id!r} not found: {path}')
  with path.open('rb') as f:
    tokens = np.atleast_2d(np.load(f))
  vocab, num_codebooks = settings['codebook_size'], settings['num_codebooks']
  if tokens.shape[0] != num_codebooks:
    raise ValueError(
      f'{path}: holds {tokens.shape[0]} codebooks, model.num_codebooks={num_codebooks}'
    )
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
    raise ValueError(
      f'{path}: token ids in [{tokens.min()}, {tokens.max()}] are outside 0..{vocab - 1} '
      '(model.vocab_size)'
    )
  return tokens.astype(np.int32)


@dataclasses.dataclass
class Workers:
  """What building records needs: per-domain teachers and codebooks, the local mesh, settings."""

  settings: dict
  domains: tuple[str, ...]
  teachers: dict
  codebooks: dict  # {domain: [(V, C)] per codebook}, or {} with external token files
  mesh: object


def clip_records(refs: list[ClipRef], waves: list[np.ndarray], workers: Workers) -> list[dict]:
  """Records of decoded clips of one domain (a teacher batch)."""
  settings, domain = workers.settings, refs[0].domain
  num_samples = np.array([len(w) for w in waves])
  padded = pad_waves(waves, settings['max_samples'])
  mel = np.asarray(audio.log_mel(jnp.asarray(padded)))
  teacher = workers.teachers[domain]
  store_audio = settings.get('teacher_audio', False)
  pcm = teacher_audio(padded, num_samples, teacher.spec.sample_rate) if store_audio else None
  utterance, frames, mask = teacher_features(
    teacher, padded, num_samples, workers.mesh, settings['chunk_size'], pcm=pcm
  )
  records = []
  for i, ref in enumerate(refs):
    valid = int(mask[i].sum())
    if settings['token_dir']:
      tokens = read_token_file(settings['token_dir'], ref, settings)
      tokens = tokens[
        :, : spec_lib.token_count(num_samples[i] / audio.SAMPLE_RATE, settings['token_rate'])
      ]
    else:
      pooled = token_features(frames[i], valid, num_samples[i], settings['token_rate'])
      tokens = tokenizer.assign_tokens(pooled, workers.codebooks[domain])
    record = {
      'id': ref.id,
      'path': ref.path,
      'text': ref.text,
      'domain': np.int32(workers.domains.index(domain)),
      'num_samples': np.int64(num_samples[i]),
      'mel': mel[i, : audio.num_frames(int(num_samples[i]))].astype(ml_dtypes.bfloat16),
      'teacher': utterance[i].astype(np.float32),
      'tokens': np.asarray(tokens, np.int32),
    }
    if settings['teacher_frames']:
      record['teacher_frames'] = frames[i, : max(valid, 1)].astype(ml_dtypes.bfloat16)
    if pcm is not None:
      record['audio'] = pcm[0][i, : pcm[1][i]]
    records.append(record)
  return records


def decoded_batches(refs: list[ClipRef], read_bytes, settings: dict, skipped: list):
  """Yields (refs, waves) of up to chunk_size decodable clips of one domain; bad clips go to
  `skipped` as {'id', 'path', 'reason'}."""
  by_domain = {}
  for ref in refs:
    by_domain.setdefault(ref.domain, []).append(ref)
  for domain_refs in by_domain.values():
    kept, waves = [], []
    for ref in domain_refs:
      try:
        waves.append(decode_clip(ref, read_bytes(ref), settings['max_samples']))
        kept.append(ref)
      except ClipError as e:
        logging.warning('skipping clip %s: %s', ref.id, e)
        skipped.append({'id': ref.id, 'path': ref.path, 'reason': str(e)})
      if len(kept) == settings['chunk_size']:
        yield kept, waves
        kept, waves = [], []
    if kept:
      yield kept, waves


def build_shard_records(refs, read_bytes, workers: Workers) -> tuple[list[dict], list[dict]]:
  """(records sorted by id, skipped clips) of one shard's clips."""
  skipped, records = [], []
  for batch_refs, waves in decoded_batches(refs, read_bytes, workers.settings, skipped):
    records += clip_records(batch_refs, waves, workers)
  return sorted(records, key=lambda r: r['id']), skipped


# ----- the tokenizer -----


def tokenizer_sample(refs: list[ClipRef], domain: str, cap: int) -> list[ClipRef]:
  """At most `cap` training clips of `domain`: those with the smallest id hashes (a fixed sample
  that a few added clips barely change, whatever the corpus size)."""
  own = [r for r in refs if r.domain == domain and r.split == 'train']
  return sorted(own, key=lambda r: (stable_hash(r.id), r.id))[:cap]


def tokenizer_path(
  directory: epath.Path, domain: str, sample: list[ClipRef], settings
) -> epath.Path:
  blob = json.dumps([settings, [(r.id, r.stamp) for r in sample]], sort_keys=True, default=str)
  return directory / 'tokenizer' / f'{domain}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.npy'


def fit_tokenizer(sample, domain: str, read_bytes, workers: Workers, seed: int) -> np.ndarray:
  """(K, V, C) residual k-means codebooks on the sample's teacher frames at the token rate."""
  settings, pooled, skipped = workers.settings, [], []
  for batch_refs, waves in decoded_batches(sample, read_bytes, settings, skipped):
    num_samples = np.array([len(w) for w in waves])
    padded = pad_waves(waves, settings['max_samples'])
    teacher = workers.teachers[batch_refs[0].domain]
    pcm = None
    if settings.get('teacher_audio', False):
      pcm = teacher_audio(padded, num_samples, teacher.spec.sample_rate)
    _, frames, mask = teacher_features(
      teacher, padded, num_samples, workers.mesh, settings['chunk_size'], pcm=pcm
    )
    pooled += [
      token_features(frames[i], int(mask[i].sum()), num_samples[i], settings['token_rate'])
      for i in range(len(batch_refs))
    ]
  if not pooled:
    reasons = [s['reason'] for s in skipped[:3]]
    raise NoUsableClips([domain], f'{len(sample)} sampled for the tokenizer; e.g. {reasons}')
  return np.stack(
    tokenizer.fit_codebooks(
      np.concatenate(pooled), settings['codebook_size'], settings['num_codebooks'], seed
    )
  )


def save_npy(local: str, array: np.ndarray) -> None:
  with open(local, 'wb') as f:  # a file object: np.save would append '.npy' to a path
    np.save(f, array, allow_pickle=False)


def read_npy(path: epath.Path) -> np.ndarray:
  with path.open('rb') as f:
    return np.load(f)


def ensure_tokenizers(refs, directory, settings, domains, read_bytes, workers_fn) -> dict:
  """{domain: codebook list}, fitted by process 0 where missing. {} with external token files."""
  if settings['token_dir']:
    return {}
  paths = {
    d: tokenizer_path(
      directory, d, tokenizer_sample(refs, d, settings['tokenizer_clips']), settings
    )
    for d in domains
  }
  if jax.process_index() == 0:
    for d, (name, path) in enumerate(paths.items()):
      if not path.exists():
        sample = tokenizer_sample(refs, name, settings['tokenizer_clips'])
        codebooks = fit_tokenizer(sample, name, read_bytes, workers_fn(), settings['seed'] + d)
        atomic_write(path, lambda local, c=codebooks: save_npy(local, c))
  sync_processes('data-tokenizer')
  return {d: list(read_npy(p)) for d, p in paths.items()}


def codebook_digest(codebooks: dict) -> str:
  h = hashlib.sha256()
  for d in sorted(codebooks):
    for c in codebooks[d]:
      h.update(np.ascontiguousarray(c).tobytes())
  return h.hexdigest()[:16]


# ----- the store -----


def plan_shards(refs: list[ClipRef], shard_clips: int) -> dict:
  """{(split, shard name): [ClipRef sorted by id]} of every shard of the store."""
  plan = {}
  for split in SPLITS:
    own = sorted((r for r in refs if r.split == split), key=lambda r: r.id)
    count = num_shards_for(len(own), shard_clips)
    groups = [[] for _ in range(count)]
    for ref in own:
      groups[stable_hash(ref.id) % count].append(ref)
    plan.update({(split, shard_name(i, count)): g for i, g in enumerate(groups)})
  return plan


def shard_fingerprint(refs: list[ClipRef], key: str, codebooks: str) -> str:
  blob = json.dumps([key, codebooks, [(r.id, r.stamp) for r in refs]])
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_sidecar(path: epath.Path) -> dict | None:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def check_domains(refs: list[ClipRef], domains: tuple[str, ...]) -> None:
  unknown = sorted({r.domain for r in refs} - set(domains))
  if unknown:
    raise ValueError(f'clips of domains {unknown} are not in data.domains={list(domains)}')
  empty = [d for d in domains if not any(r.domain == d for r in refs)]
  if empty:
    raise ValueError(
      f'domain(s) {empty} have no clips; give their data or drop them from data.domains'
    )


def build_store(refs, directory: epath.Path, settings: dict, domains, read_bytes, load_teachers):
  """Builds, resumes or updates the store in `directory`; every process calls it. Returns the
  manifest.

  refs: every clip of the store; read_bytes(ClipRef) -> the file's bytes; load_teachers() ->
  {domain: Teacher}, called only if something must be computed.
  """
  check_domains(refs, domains)
  key = store_key(settings)
  cache = {}

  def workers(codebooks=None):
    if 'workers' not in cache:
      cache['workers'] = Workers(settings, domains, load_teachers(), {}, feature_mesh())
    if codebooks is not None:
      cache['workers'].codebooks = codebooks
    return cache['workers']

  codebooks = ensure_tokenizers(refs, directory, settings, domains, read_bytes, workers)
  digest = codebook_digest(codebooks)
  plan = plan_shards(refs, settings['shard_clips'])
  names = sorted(plan)
  mine = [n for i, n in enumerate(names) if i % jax.process_count() == jax.process_index()]
  stats = {'shards': len(mine), 'computed': 0, 'clips': 0, 'seconds': 0.0}
  start = time.perf_counter()
  for split, name in tqdm.tqdm(
    mine, desc='features (decode, mel, teachers)', unit='shard', disable=jax.process_index() != 0
  ):
    fingerprint = shard_fingerprint(plan[split, name], key, digest)
    sidecar = read_sidecar(directory / split / f'{name}.json')
    if sidecar and sidecar.get('fingerprint') == fingerprint:
      continue
    records, skipped = build_shard_records(plan[split, name], read_bytes, workers(codebooks))
    write_shard(directory / split, name, records, {'fingerprint': fingerprint, 'skipped': skipped})
    stats['computed'] += 1
    stats['clips'] += len(plan[split, name])
  stats['seconds'] = time.perf_counter() - start
  if stats['computed']:
    logging.info(
      'features: %d shards computed (%d clips in %.1f s, %.2f clips/s)',
      stats['computed'],
      stats['clips'],
      stats['seconds'],
      stats['clips'] / max(stats['seconds'], 1e-9),
    )
  sync_processes('data-shards')
  if jax.process_index() == 0:
    write_manifest(directory, names, settings, domains, codebooks)
  sync_processes('data-manifest')
  manifest = json.loads((directory / MANIFEST).read_text())
  manifest['this_run'] = stats
  return manifest


def remove_stale(directory: epath.Path, names: list) -> None:
  """Deletes shard files of an earlier plan (a changed shard count) that no plan entry names."""
  keep = {f'{name}{suffix}' for _, name in names for suffix in ('.json', '.array_record')}
  for split in SPLITS:
    if (directory / split).exists():
      for path in (directory / split).iterdir():
        if path.name.startswith('shard-') and path.name not in keep:
          path.unlink()


def write_manifest(directory, names, settings, domains, codebooks) -> dict:
  """Counts, teacher widths and skipped clips of the finished shards -> manifest.json."""
  remove_stale(directory, names)
  counts = {split: {d: 0 for d in domains} for split in SPLITS}
  skipped, shards = [], {split: [] for split in SPLITS}
  for split, name in names:
    sidecar = json.loads((directory / split / f'{name}.json').read_text())
    skipped += sidecar['skipped']
    for d in sidecar['domain']:
      counts[split][domains[d]] += 1
    shards[split].append({'name': name, 'num_records': sidecar['num_records']})
  empty = [d for d in domains if not counts['train'][d]]
  if empty:
    reasons = [s['reason'] for s in skipped[:3]]
    raise NoUsableClips(empty, f'{len(skipped)} clips skipped, e.g. {reasons}')
  manifest = {
    'settings': settings,
    'domains': list(domains),
    'teacher_dims': teacher_dims(directory, shards, domains),
    'num_clips': {s: sum(c.values()) for s, c in counts.items()},
    'clips_per_domain': counts,
    'shards': shards,
    'tokenizer': codebook_digest(codebooks) if codebooks else 'token files',
    'skipped': skipped,
  }
  write_json(directory / MANIFEST, manifest)
  logging.info(
    'feature store ready in %s: %s clips, %d skipped',
    directory,
    manifest['num_clips'],
    len(skipped),
  )
  return manifest


def teacher_dims(directory, shards: dict, domains) -> dict:
  """{domain: C_d} read off the first record of each domain."""
  dims = {}
  for split, entries in shards.items():
    for entry in entries:
      if len(dims) == len(domains):
        return dims
      if not entry['num_records']:
        continue
      sidecar = json.loads((directory / split / f'{entry["name"]}.json').read_text())
      missing = {domains[d] for d in sidecar['domain']} - set(dims)
      if not missing:
        continue
      reader = array_record_module.ArrayRecordReader(
        str(directory / split / f'{entry["name"]}.array_record')
      )
      for i, d in enumerate(sidecar['domain']):
        if domains[d] not in dims:
          record = decode_record(reader.read([i])[0])
          dims[domains[d]] = int(record['teacher'].shape[-1])
      reader.close()
  return dims


def sync_processes(name: str):
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
