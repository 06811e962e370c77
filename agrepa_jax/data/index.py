"""The feature store's files: shards with their sidecars, and the compact index a training start
reads.

  agrepa_features/<version>/agrepa_features-<split>.array_record-<index>   records (records.py)
  agrepa_features/<version>/dataset_info.json, features.json              tfds metadata
  shards/<split>-<index>.json   sidecar: fingerprint, checksum, per-record id/domain/length/path/
                                text/labels, the clips skipped with their reasons (written last)
  index.npz                     per split: records per shard, each record's domain and length
  manifest.json                 settings, domains, teacher widths, counts (small)
  report.json                   skipped clips and source problems, by id and reason
"""

import json
import logging

import numpy as np
from etils import epath

from agrepa_jax.data import features, records

SPLITS = ('train', 'heldout')
INDEX = 'index.json'  # written last: the store is complete


def sidecar_path(directory: epath.Path, split: str, index: int) -> epath.Path:
  return directory / 'shards' / f'{split}-{index:05d}.json'


def write_shard(directory, codec, split: str, index: int, built: list, fingerprint: str, skipped):
  """Writes a shard's records, then its sidecar (which marks the shard done)."""
  path = records.shard_path(directory, split, index)
  encoded = [records.encode(codec, r) for r in built]
  features.atomic_write(path, lambda local: records.write_shard_file(local, encoded))
  sidecar = {
    'fingerprint': fingerprint,
    'checksum': records.file_checksum(path),
    'num_records': len(built),
    'ids': [r['id'] for r in built],
    'domain': [int(r['domain']) for r in built],
    'num_samples': [int(r['num_samples']) for r in built],
    'paths': [r['path'] for r in built],
    'texts': [r['text'] for r in built],
    'labels': [list(r.get('labels', ())) for r in built],
    'skipped': skipped,
  }
  features.write_json(sidecar_path(directory, split, index), sidecar)


def shard_file_index(name: str, split: str) -> int | None:
  """The shard index in the name of a sidecar or a shard file of `split`, else None."""
  for prefix in (f'{split}-', f'{records.DATASET}-{split}.array_record-'):
    if name.startswith(prefix):
      digits = name[len(prefix) :].split('.')[0]
      if digits.isdigit():
        return int(digits)
  return None


def remove_stale_shards(directory: epath.Path, split: str, num_shards: int) -> None:
  """Shard files and sidecars of `split` at or past index `num_shards` (the corpus shrank)."""
  for folder in (directory / 'shards', records.dataset_dir(directory)):
    if folder.exists():
      for path in folder.iterdir():
        index = shard_file_index(path.name, split)
        if index is not None and index >= num_shards:
          path.unlink()


def save_arrays(local: str, arrays: dict) -> None:
  with open(local, 'wb') as f:
    np.savez(f, **arrays)


def write_index(directory, settings, domains, num_shards: dict, problems=(), units=None):
  """Reads every sidecar and writes the tfds metadata, index.npz, report.json and manifest.json.

  num_shards: {split: shards}. Raises NoUsableClips when a domain has no training record.
  """
  codec = records.features_dict(settings, domains)
  sidecars = {}
  for split in SPLITS:
    remove_stale_shards(directory, split, num_shards.get(split, 0))
    for index in range(num_shards.get(split, 0)):
      sidecars[split, index] = json.loads(sidecar_path(directory, split, index).read_text())
  lengths = {
    split: [sidecars[split, i]['num_records'] for i in range(num_shards.get(split, 0))]
    for split in SPLITS
  }
  arrays = {}
  for split in SPLITS:
    columns = [sidecars[split, i] for i in range(num_shards.get(split, 0))]
    arrays[f'{split}/shard_lengths'] = np.array(lengths[split], np.int64)
    arrays[f'{split}/domain'] = np.array([d for c in columns for d in c['domain']], np.int8)
    arrays[f'{split}/num_samples'] = np.array(
      [n for c in columns for n in c['num_samples']], np.int64
    )
  counts = {
    split: {d: int((arrays[f'{split}/domain'] == i).sum()) for i, d in enumerate(domains)}
    for split in SPLITS
  }
  skipped = [s for sidecar in sidecars.values() for s in sidecar['skipped']]
  empty = [d for d in domains if not counts['train'][d]]
  if empty:
    reasons = [s['reason'] for s in skipped[:3]]
    raise features.NoUsableClips(empty, f'{len(skipped)} clips skipped, e.g. {reasons}')
  manifest = {
    'settings': settings,
    'domains': list(domains),
    'teacher_dims': teacher_dims(directory, codec, sidecars, domains),
    'num_clips': {s: sum(c.values()) for s, c in counts.items()},
    'clips_per_domain': counts,
    'num_shards': {s: num_shards.get(s, 0) for s in SPLITS},
  }
  report = {'skipped': skipped, 'problems': list(problems), 'units': units or {}}
  records.write_tfds_metadata(directory, codec, lengths)
  features.atomic_write(directory / 'index.npz', lambda local: save_arrays(local, arrays))
  features.write_json(directory / 'report.json', report)
  features.write_json(directory / 'manifest.json', manifest)
  logging.info(
    'feature store ready in %s: %s clips, %d skipped, %d source problems',
    directory,
    manifest['num_clips'],
    len(skipped),
    len(report['problems']),
  )
  return manifest, report


def teacher_dims(directory, codec, sidecars: dict, domains) -> dict:
  """{domain: C_d} read off the first record of each domain."""
  dims = {}
  for (split, index), sidecar in sidecars.items():
    for position, d in enumerate(sidecar['domain']):
      if domains[d] not in dims:
        path = records.shard_path(directory, split, index)
        source = records.ShardedRecords([str(path)], [sidecar['num_records']], max_open=1)
        dims[domains[d]] = int(records.decode(codec, source[position])['teacher'].shape[-1])
    if len(dims) == len(domains):
      break
  return dims


def import_records(directory, settings, domains, splits: dict, shard_records: int = 256):
  """A finished store of given records {split: [record]} (records.py's fields), cut into shards
  of `shard_records`: for tests, benchmarks and stores computed elsewhere."""
  codec = records.features_dict(settings, domains)
  num_shards = {}
  for split, split_records in splits.items():
    chunks = [
      split_records[i : i + shard_records] for i in range(0, len(split_records), shard_records)
    ]
    for index, chunk in enumerate(chunks):
      write_shard(directory, codec, split, index, chunk, 'imported', [])
    num_shards[split] = len(chunks)
  manifest, _ = write_index(directory, settings, domains, num_shards)
  features.write_json(directory / INDEX, {'store': 'imported'})
  return manifest
