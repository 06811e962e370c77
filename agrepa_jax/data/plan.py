"""The store's shards: which clips each holds, cut so that a change to the corpus changes few.

Per store split, the clips are taken in listing order (domains in config order, then units, then
the order a unit lists them: archive order, or folder by folder) and cut into shards by content:
a clip starts a new shard when a hash of its id falls in 1 of `shard_clips` (content-defined
chunking, as backup tools cut files). So shards hold `shard_clips` clips on average; an added or
removed clip changes only the shard it falls in (two if it is itself a cut), whatever the corpus
size; and a shard is a contiguous run of its units, so an archive shard is read in one forward
pass. A shard keeps its tfds shard index across rebuilds (it is named by its first clip's id);
indices freed by removed shards are reused, and any left over hold an empty shard.
"""

import dataclasses
import zlib

import numpy as np


def cut_hash(clip_id: str) -> int:
  return zlib.crc32(b'shard:' + clip_id.encode())


@dataclasses.dataclass
class Shard:
  """Clips `split` of store split `split` in unit positions [start, end) of each segment."""

  split: str
  index: int  # the tfds shard index
  key: str  # the id of its first clip ('' for a split's first shard)
  segments: list  # [(unit key, start, end)]: positions in that unit's listing
  num_clips: int
  inputs: str = ''  # a digest of its clips' ids, sizes and modification times

  @property
  def name(self) -> str:
    return f'{self.split}-{self.index:05d}'


def cut_shards(split: str, listings: list, shard_clips: int) -> list[tuple[str, list, int]]:
  """[(key, segments, clips)] of one store split, in listing order."""
  shards = []
  key, segments, count = '', [], 0
  for listing in listings:
    roles = listing.columns['split']
    ids = listing.columns['id']
    start = None
    for position, role in enumerate(roles):
      if role != split:
        continue
      if count and cut_hash(ids[position]) % shard_clips == 0:
        if start is not None:
          segments.append((listing.unit.key, start, position))
        shards.append((key, segments, count))
        key, segments, count, start = ids[position], [], 0, None
      if start is None:
        start = position
      count += 1
      last = position
    if start is not None:
      segments.append((listing.unit.key, start, last + 1))
  if count:
    shards.append((key, segments, count))
  return shards


def assign_indices(cut: list, previous: dict) -> list[int]:
  """Shard indices for the cut shards [(key, ...)]: a key's previous index where it had one,
  then the freed indices, then new ones. previous: {key: index}."""
  keys = [key for key, *_ in cut]
  kept = {k: previous[k] for k in keys if k in previous}
  free = iter(sorted(set(previous.values()) - set(kept.values())))
  next_new = max(previous.values(), default=-1) + 1
  indices = []
  for key in keys:
    if key in kept:
      indices.append(kept[key])
      continue
    index = next(free, None)
    if index is None:
      index, next_new = next_new, next_new + 1
    indices.append(index)
  return indices


def plan_shards(listings: list, splits: tuple[str, ...], shard_clips: int, previous: dict):
  """{split: [Shard in listing order]} and {split: number of shard indices}; an index below that
  number that no shard has holds an empty shard.

  previous: {split: {key: index}} of the last plan.
  """
  plan, counts = {}, {}
  for split in splits:
    cut = cut_shards(split, listings, shard_clips)
    indices = assign_indices(cut, previous.get(split, {}))
    plan[split] = [
      Shard(split, index, key, segments, n)
      for index, (key, segments, n) in zip(indices, cut, strict=True)
    ]
    counts[split] = max(indices, default=-1) + 1
  return plan, counts


def task_slice(shards: list[Shard], task: int, num_tasks: int) -> list[Shard]:
  """Task `task` of `num_tasks`: a contiguous run of the shards, of about equal clip counts."""
  before = np.cumsum([0] + [s.num_clips for s in shards])  # clips before shard i
  bounds = np.searchsorted(before, before[-1] * np.arange(num_tasks + 1) / num_tasks)
  bounds[-1] = len(shards)
  return shards[bounds[task] : bounds[task + 1]]
