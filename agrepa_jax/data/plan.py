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
import hashlib
import json
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


class Cutter:
  """Cuts the clips of one store split into shards, fed one unit listing at a time (so planning
  holds one listing in memory, whatever the corpus size)."""

  def __init__(self, split: str, shard_clips: int):
    self.split, self.shard_clips = split, shard_clips
    self.shards = []  # [(key, segments, clips, inputs digest)]
    self.key, self.segments, self.count = '', [], 0
    self.inputs = hashlib.sha256()

  def close_shard(self):
    self.shards.append((self.key, self.segments, self.count, self.inputs.hexdigest()[:16]))
    self.segments, self.count, self.inputs = [], 0, hashlib.sha256()

  def feed(self, listing) -> None:
    columns, unit_key = listing.columns, listing.unit.key
    start = None
    for position, role in enumerate(columns['split']):
      if role != self.split:
        continue
      clip_id = columns['id'][position]
      if self.count and cut_hash(clip_id) % self.shard_clips == 0:
        if start is not None:
          self.segments.append((unit_key, start, position))
        self.close_shard()
        self.key, start = clip_id, None
      if start is None:
        start = position
      stamp = (clip_id, columns['size'][position], columns['mtime'][position])
      self.inputs.update(json.dumps(stamp).encode())
      self.count += 1
      last = position
    if start is not None:
      self.segments.append((unit_key, start, last + 1))

  def finish(self) -> list[tuple]:
    if self.count:
      self.close_shard()
    return self.shards


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


def plan_shards(listings, splits: tuple[str, ...], shard_clips: int, previous: dict):
  """{split: [Shard in listing order]} and {split: number of shard indices}; an index below that
  number that no shard has holds an empty shard.

  listings: unit listings in order (any iterable: each is read once); previous: {split: {key:
  index}} of the last plan.
  """
  cutters = {split: Cutter(split, shard_clips) for split in splits}
  for listing in listings:
    for cutter in cutters.values():
      cutter.feed(listing)
  return assign_shards({s: c.finish() for s, c in cutters.items()}, previous)


def assign_shards(cut: dict, previous: dict):
  """`plan_shards` from the cut shards {split: [(key, segments, clips, inputs)]}."""
  plan, counts = {}, {}
  for split, shards in cut.items():
    indices = assign_indices(shards, previous.get(split, {}))
    plan[split] = [
      Shard(split, index, key, segments, n, inputs)
      for index, (key, segments, n, inputs) in zip(indices, shards, strict=True)
    ]
    counts[split] = max(indices, default=-1) + 1
  return plan, counts


def task_slice(shards: list[Shard], task: int, num_tasks: int) -> list[Shard]:
  """Task `task` of `num_tasks`: a contiguous run of the shards, of about equal clip counts."""
  before = np.cumsum([0] + [s.num_clips for s in shards])  # clips before shard i
  bounds = np.searchsorted(before, before[-1] * np.arange(num_tasks + 1) / num_tasks)
  bounds[-1] = len(shards)
  return shards[bounds[task] : bounds[task + 1]]
