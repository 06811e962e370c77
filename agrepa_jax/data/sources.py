"""Corpus listings: which clips a corpus holds, where their bytes are, and a stamp of each clip.

A corpus is cut into *units* that builders list independently (the store's claims share them
out): each LibriSpeech archive (`<split>.tar.gz` or `.tar`), or one of `BUCKETS` hash buckets of a
directory tree's files. Listing an archive reads it through once and keeps its members' offsets
and a gzip seek index (`indexed_gzip`), so any member can be read later without reading the
archive from its start. A unit's listing holds, per clip, its id, split, location (a file
relative to the corpus root, or an archive member with its offset), stamp (size and modification
time), transcript and class labels, and the problems found on the way (a transcript line with no
audio, an utterance with no transcript, a clip listed in no CSV, a CSV row with no file).

Corpus kinds (`data.datasets.<domain>`): `librispeech` (the OpenSLR archives or an extracted tree),
`audioset` (clips named by YouTube id plus the segment CSVs), `folder` (any folder of audio; class
labels from sub-folder names) and the generated `embedded` corpus.
"""

import csv
import dataclasses
import io
import logging
import os
import re
import tarfile
import zlib
from collections.abc import Iterator

import indexed_gzip
from etils import epath

from agrepa_jax.data import DataError

AUDIO_SUFFIXES = ('.wav', '.flac', '.mp3', '.ogg', '.opus', '.m4a', '.aac', '.webm')
LIBRISPEECH_SPLITS = (
  'train-clean-100',
  'train-clean-360',
  'train-other-500',
  'dev-clean',
  'dev-other',
  'test-clean',
  'test-other',
)
ARCHIVE_SUFFIXES = ('.tar.gz', '.tar')
AUDIOSET_CSVS = {
  'balanced_train': 'balanced_train_segments.csv',
  'unbalanced_train': 'unbalanced_train_segments.csv',
  'eval': 'eval_segments.csv',
}
AUDIOSET_LABELS_CSV = 'class_labels_indices.csv'
YOUTUBE_ID_LENGTH = 11
BUCKETS = 16  # a directory tree is listed in this many units (fixed: it orders the clips)
GZIP_INDEX_SPACING = 32 * 2**20  # uncompressed bytes between seek points (≈ 32 KiB each)
COLUMNS = ('id', 'split', 'path', 'offset', 'size', 'mtime', 'text', 'labels')


def stable_hash(text: str) -> int:
  return zlib.crc32(text.encode())


def split_name(directory: str) -> str:
  """A split name for a directory name: train-clean-100 -> train_clean_100."""
  return re.sub(r'\W', '_', directory)


@dataclasses.dataclass(frozen=True)
class Splits:
  """Which corpus splits a domain trains on and holds out; without a held-out split,
  `heldout_fraction` of the clips is held out by a hash of the clip id."""

  train: tuple[str, ...]
  heldout: str
  heldout_fraction: float

  def role(self, corpus_split: str, clip_id: str) -> str:
    """'train', 'heldout' or '' (a split that is not used) of a clip in `corpus_split`."""
    if self.heldout:
      if corpus_split == self.heldout:
        return 'heldout'
      return 'train' if corpus_split in self.train else ''
    if corpus_split not in self.train:
      return ''
    held = stable_hash(clip_id) % 10_000 < self.heldout_fraction * 10_000
    return 'heldout' if held else 'train'


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of a corpus that one builder lists: an archive, or a hash bucket of a tree's files."""

  domain: str
  corpus: str  # librispeech | audioset | folder | embedded
  root: str
  archive: str = ''  # archive file name under root; '' for a directory bucket
  bucket: int = 0
  split: str = ''  # the corpus split an archive holds (librispeech)

  @property
  def key(self) -> str:
    """A file-name-safe name, unique within the store."""
    return f'{self.domain}-{self.archive or "files"}-{self.bucket:02d}'


@dataclasses.dataclass
class UnitListing:
  """The clips of one unit as columns (COLUMNS), in the order they are read, and the problems
  found. `stamp` is the archive's own size and mtime ('' for directory buckets)."""

  unit: Unit
  columns: dict
  problems: list
  stamp: str = ''

  def __len__(self):
    return len(self.columns['id'])

  def to_json(self) -> dict:
    return {
      'unit': dataclasses.asdict(self.unit),
      'columns': self.columns,
      'problems': self.problems,
      'stamp': self.stamp,
    }

  @classmethod
  def from_json(cls, value: dict) -> 'UnitListing':
    return cls(Unit(**value['unit']), value['columns'], value['problems'], value['stamp'])


class ListingBuilder:
  """Accumulates the clips and problems of one unit."""

  def __init__(self, unit: Unit, splits: Splits):
    self.unit, self.splits = unit, splits
    self.columns = {c: [] for c in COLUMNS}
    self.problems = []

  def add(self, corpus_id, corpus_split, path, offset, size, mtime, text='', labels=()):
    clip_id = f'{self.unit.domain}/{corpus_id}'
    role = self.splits.role(corpus_split, clip_id)
    if not role:
      return
    for column, value in zip(
      COLUMNS, (clip_id, role, path, offset, size, mtime, text, list(labels)), strict=True
    ):
      self.columns[column].append(value)

  def problem(self, corpus_id: str, path: str, reason: str):
    self.problems.append({'id': f'{self.unit.domain}/{corpus_id}', 'path': path, 'reason': reason})

  def finish(self, stamp: str = '') -> UnitListing:
    return UnitListing(self.unit, self.columns, self.problems, stamp)


def file_stamp(path: epath.Path) -> str:
  info = path.stat()
  return f'{info.length}-{int(info.mtime)}'


def checked_root(directory: str, what: str) -> epath.Path:
  root = epath.Path(directory).expanduser()
  if not root.is_dir():
    raise DataError(f'{what} directory does not exist: {root}')
  return root


# ----- walking directory trees -----


def relative_files(root: epath.Path, top: str = '') -> Iterator[str]:
  """Paths relative to `root` of every file below root/top, sorted; names only (no stat)."""
  base = root / top if top else root
  if os.path.isdir(os.fspath(base)):  # local: scandir reports types without a stat per file
    stack = [os.fspath(base)]
    found = []
    while stack:
      with os.scandir(stack.pop()) as entries:
        for entry in entries:
          if entry.is_dir(follow_symlinks=True):
            stack.append(entry.path)
          elif entry.is_file(follow_symlinks=True):
            found.append(os.path.relpath(entry.path, os.fspath(root)))
    yield from sorted(found)
    return
  found = [
    os.path.relpath(os.fspath(directory / name), os.fspath(root))
    for directory, _, names in base.walk()
    for name in names
  ]
  yield from sorted(found)


def size_and_mtime(root: epath.Path, relative: str) -> tuple[int, int]:
  if '://' not in os.fspath(root):
    info = os.stat(os.path.join(os.fspath(root), relative))
    return info.st_size, int(info.st_mtime)
  info = (root / relative).stat()
  return info.length, int(info.mtime)


def is_audio(name: str) -> bool:
  return name.lower().endswith(AUDIO_SUFFIXES)


def stem_of(relative: str) -> str:
  name = os.path.basename(relative)
  return name[: -len(os.path.splitext(name)[1])] if '.' in name else name


# ----- archives -----


def open_archive_stream(path: epath.Path, gzip_index: bytes | None = None):
  """A seekable binary stream of an archive's tar bytes: the file itself for .tar, an
  `indexed_gzip` reader for .tar.gz (with `gzip_index`, seeks need no pass from the start)."""
  raw = path.open('rb')
  if not path.name.endswith('.gz'):
    return raw
  stream = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=GZIP_INDEX_SPACING)
  if gzip_index is not None:
    stream.import_index(fileobj=io.BytesIO(gzip_index))
  return stream


def scan_archive(path: epath.Path) -> tuple[list[tarfile.TarInfo], dict, bytes]:
  """(file members in archive order, {member name: bytes} of its transcripts, gzip seek index).

  Two sequential passes and nothing extracted. A damaged archive raises a ValueError naming it.
  """
  members, transcripts = [], {}
  try:
    with path.open('rb') as raw, tarfile.open(fileobj=raw, mode='r|*') as tar:
      for member in tar:
        if not member.isfile():
          continue
        members.append(member)
        if member.name.endswith('.trans.txt'):
          transcripts[member.name] = tar.extractfile(member).read()
    gzip_index = b''
    if path.name.endswith('.gz'):
      with open_archive_stream(path) as stream:
        stream.build_full_index()
        buffer = io.BytesIO()
        stream.export_index(fileobj=buffer)
        gzip_index = buffer.getvalue()
  except (tarfile.TarError, EOFError, OSError, indexed_gzip.ZranError) as e:
    raise DataError(f'{path}: cannot read the archive ({e}); download it again') from e
  return members, transcripts, gzip_index


def read_members(path: epath.Path, gzip_index: bytes, spans: list[tuple[int, int]]):
  """Yields the bytes of each (offset, size) span of an archive's tar stream, in the given order
  (sorted by offset, they are read in one forward pass)."""
  with open_archive_stream(path, gzip_index or None) as stream:
    for offset, size in spans:
      stream.seek(offset)
      yield stream.read(size)


# ----- LibriSpeech -----


def parse_transcripts(text: str) -> dict[str, str]:
  """{utterance id: transcript} of a LibriSpeech .trans.txt."""
  pairs = (line.partition(' ') for line in text.splitlines())
  return {utterance: rest.strip() for utterance, _, rest in pairs if utterance}


def librispeech_layout(directory: str) -> tuple[epath.Path, dict, dict]:
  """(tree root, {split: extracted folder}, {split: archive file name}) of a LibriSpeech root.

  A split extracted next to its archive is read extracted; a tree with neither official split
  folders nor archives is one split, `train`, of every audio file under it.
  """
  given = checked_root(directory, 'LibriSpeech')
  root = given / 'LibriSpeech' if (given / 'LibriSpeech').is_dir() else given
  folders = tree_splits(root)
  archives = {}
  for s in LIBRISPEECH_SPLITS:
    for suffix in ARCHIVE_SUFFIXES:
      if split_name(s) not in folders and (given / f'{s}{suffix}').exists():
        archives.setdefault(split_name(s), f'{s}{suffix}')
  if not folders and not archives:
    folders = {'train': ''}
  return root, folders, archives


def tree_splits(root: epath.Path) -> dict:
  """{split: folder} of the official split folders extracted under a LibriSpeech tree root."""
  return {split_name(s): s for s in LIBRISPEECH_SPLITS if (root / s).is_dir()}


def librispeech_units(domain: str, directory: str, splits: Splits) -> list[Unit]:
  root, folders, archives = librispeech_layout(directory)
  wanted = {*splits.train, splits.heldout}
  units = [
    Unit(domain, 'librispeech', directory, archive=name, split=split)
    for split, name in sorted(archives.items())
    if split in wanted
  ]
  if any(split in wanted for split in folders):
    units += [Unit(domain, 'librispeech', str(root), bucket=b) for b in range(BUCKETS)]
  return units


def add_utterances(builder, split, audio, transcripts, official: bool, location):
  """Adds LibriSpeech utterances: audio [(relative or member name, offset, size, mtime)],
  transcripts {utterance: text}; records the problems of an official layout."""
  stems = set()
  for name, offset, size, mtime in audio:
    stem = stem_of(name)
    stems.add(stem)
    if official and stem not in transcripts:
      builder.problem(stem, location(name), 'utterance has no transcript line')
    builder.add(stem, split, name, offset, size, mtime, transcripts.get(stem, ''))
  for stem in sorted(set(transcripts) - stems):
    builder.problem(stem, location(stem), 'transcript line has no audio file')


def list_librispeech_archive(unit: Unit, splits: Splits):
  path = epath.Path(unit.root).expanduser() / unit.archive
  members, transcript_files, gzip_index = scan_archive(path)
  transcripts = {}
  for content in transcript_files.values():
    transcripts.update(parse_transcripts(content.decode()))
  audio = [(m.name, m.offset_data, m.size, int(m.mtime)) for m in members if is_audio(m.name)]
  builder = ListingBuilder(unit, splits)
  add_utterances(builder, unit.split, audio, transcripts, True, lambda name: f'{path}/{name}')
  return builder.finish(file_stamp(path)), gzip_index


def list_librispeech_bucket(unit: Unit, splits: Splits):
  """The chapters (every file of a folder) that hash to the unit's bucket."""
  root = epath.Path(unit.root)
  folders = tree_splits(root)
  official = bool(folders)
  folders = folders or {'train': ''}
  builder = ListingBuilder(unit, splits)
  for split, folder in sorted(folders.items()):
    if not (split in splits.train or split == splits.heldout):
      continue
    by_chapter = {}
    for relative in relative_files(root, folder):
      chapter = os.path.dirname(relative)
      if stable_hash(chapter) % BUCKETS == unit.bucket:
        by_chapter.setdefault(chapter, []).append(relative)
    for _, names in sorted(by_chapter.items()):
      transcripts = {}
      for name in names:
        if name.endswith('.trans.txt'):
          transcripts.update(parse_transcripts((root / name).read_text()))
      audio = [(n, -1, *size_and_mtime(root, n)) for n in names if is_audio(n)]
      add_utterances(builder, split, audio, transcripts, official, lambda n: str(root / n))
  return builder.finish(), b''


# ----- AudioSet -----


def read_csv_rows(path: epath.Path) -> list[list[str]]:
  """Rows of an AudioSet CSV without its '#' comment lines, fields stripped."""
  lines = [line for line in path.read_text().splitlines() if line and not line.startswith('#')]
  return [
    [f.strip() for f in row]
    for row in csv.reader(io.StringIO('\n'.join(lines)), skipinitialspace=True)
  ]


def youtube_id_of(stem: str) -> str:
  """The YouTube id a clip's file name starts with: 'abc..._30' or 'Yabc..._30.000_40.000'."""
  if stem.startswith('Y') and len(stem) > YOUTUBE_ID_LENGTH and stem[YOUTUBE_ID_LENGTH + 1] == '_':
    return stem[1 : 1 + YOUTUBE_ID_LENGTH]
  return stem[:YOUTUBE_ID_LENGTH]


def audioset_rows(root: epath.Path) -> tuple[dict, dict]:
  """({youtube id: [(csv split, start seconds, [label mids])]}, {mid: display name})."""
  labels_csv = root / AUDIOSET_LABELS_CSV
  if not labels_csv.exists():
    raise DataError(
      f'AudioSet class-label CSV not found: {labels_csv} (a folder of clips without the AudioSet '
      "CSVs is data.datasets.<domain>='folder')"
    )
  names = {row[1]: row[2] for row in read_csv_rows(labels_csv)[1:]}  # index, mid, display_name
  rows = {}
  for split, csv_name in AUDIOSET_CSVS.items():
    if (root / csv_name).exists():
      for youtube_id, start, _, labels in read_csv_rows(root / csv_name):
        rows.setdefault(youtube_id, []).append((split, float(start), labels.split(',')))
  if not rows:
    raise DataError(f'no AudioSet segment CSV ({", ".join(AUDIOSET_CSVS.values())}) in {root}')
  return rows, names


def list_audioset_bucket(unit: Unit, splits: Splits):
  """The clips whose YouTube id hashes to the unit's bucket, and that bucket's CSV rows without
  a file."""
  root = checked_root(unit.root, 'AudioSet')
  rows, names = audioset_rows(root)
  builder = ListingBuilder(unit, splits)
  found = set()
  for relative in relative_files(root):
    if not is_audio(relative):
      continue
    youtube_id = youtube_id_of(stem_of(relative))
    if stable_hash(youtube_id) % BUCKETS != unit.bucket:
      continue
    if youtube_id not in rows:
      builder.problem(stem_of(relative), str(root / relative), 'clip is listed in no segment CSV')
      continue
    if youtube_id in found:
      builder.problem(stem_of(relative), str(root / relative), 'a second file of this clip')
      continue
    found.add(youtube_id)
    size, mtime = size_and_mtime(root, relative)
    for split, start, mids in rows[youtube_id]:
      labels = [names.get(m, m) for m in mids if m]
      builder.add(f'{youtube_id}_{int(start)}', split, relative, -1, size, mtime, '', labels)
  for youtube_id in sorted(set(rows) - found):
    if stable_hash(youtube_id) % BUCKETS == unit.bucket:
      for split, start, _ in rows[youtube_id]:
        if splits.role(split, f'{unit.domain}/{youtube_id}_{int(start)}'):
          builder.problem(f'{youtube_id}_{int(start)}', '', f'listed in {split} but not on disk')
  return builder.finish(), b''


# ----- any folder of audio -----


def list_folder_bucket(unit: Unit, splits: Splits):
  """Every audio file below the root; with sub-folders named like the configured splits, those
  are the splits; a file's first sub-folder (below its split's) is its class label."""
  root = checked_root(unit.root, 'Audio folder')
  split_folders = {*splits.train, splits.heldout} - {''}
  by_split = any((root / s).is_dir() for s in split_folders)
  builder = ListingBuilder(unit, splits)
  for relative in relative_files(root):
    if not is_audio(relative) or stable_hash(relative) % BUCKETS != unit.bucket:
      continue
    parts = relative.split(os.sep)
    split = parts.pop(0) if by_split and len(parts) > 1 else 'train'
    labels = parts[:1] if len(parts) > 1 else []
    corpus_id = os.path.splitext(relative)[0]
    builder.add(corpus_id, split, relative, -1, *size_and_mtime(root, relative), '', labels)
  return builder.finish(), b''


# ----- the embedded corpus -----


def list_embedded(unit: Unit, splits: Splits):
  """The generated clips of the unit's domain (the corpus manifest lists them)."""
  from agrepa_jax.data import synth

  root = epath.Path(unit.root)
  builder = ListingBuilder(unit, splits)
  for entry in synth.read_manifest(root / unit.domain):
    relative = os.path.relpath(entry['path'], os.fspath(root))
    size, mtime = size_and_mtime(root, relative)
    labels = entry.get('labels', [])
    builder.add(entry['id'], 'train', relative, -1, size, mtime, entry.get('text', ''), labels)
  return builder.finish(), b''


def list_unit(unit: Unit, splits: Splits) -> tuple[UnitListing, bytes]:
  """(listing, gzip seek index or b'') of one unit."""
  if unit.archive:
    return list_librispeech_archive(unit, splits)
  listers = {
    'librispeech': list_librispeech_bucket,
    'audioset': list_audioset_bucket,
    'folder': list_folder_bucket,
    'embedded': list_embedded,
  }
  listing, gzip_index = listers[unit.corpus](unit, splits)
  logging.debug('listed %s: %d clips', unit.key, len(listing))
  return listing, gzip_index


def corpus_units(domain: str, corpus: str, root: str, splits: Splits) -> list[Unit]:
  """The units of one domain's corpus (cheap: no file below the root is read or stat'ed)."""
  if corpus == 'librispeech':
    return librispeech_units(domain, root, splits)
  if corpus == 'embedded':
    return [Unit(domain, corpus, root)]
  checked_root(root, {'audioset': 'AudioSet', 'folder': 'Audio folder'}[corpus])
  return [Unit(domain, corpus, root, bucket=b) for b in range(BUCKETS)]


CORPORA = ('librispeech', 'audioset', 'folder')


def available_splits(corpus: str, root: str) -> set[str]:
  """The splits a corpus root holds: LibriSpeech's extracted folders and archives, AudioSet's
  segment CSVs, a folder's sub-folders (or `train`: the whole folder)."""
  if corpus == 'librispeech':
    _, folders, archives = librispeech_layout(root)
    return {*folders, *archives}
  directory = epath.Path(root).expanduser()
  if corpus == 'audioset':
    return {s for s, name in AUDIOSET_CSVS.items() if (directory / name).exists()}
  if corpus == 'folder':
    return {p.name for p in checked_root(root, 'Audio folder').iterdir() if p.is_dir()} | {'train'}
  return {'train'}


def resolve_splits(domain: str, corpus: str, root: str, configured: Splits) -> Splits:
  """The configured splits that the corpus holds; a corpus without any of the configured training
  splits but with a `train` split (a plain tree or folder) trains on that."""
  available = available_splits(corpus, root)
  train = tuple(s for s in configured.train if s in available)
  if not train and 'train' in available:
    train = ('train',)
  if not train:
    raise DataError(
      f'data.train_splits.{domain}={"+".join(configured.train)!r}: none of these splits is in '
      f'{root} (it holds {sorted(available)})'
    )
  heldout = configured.heldout if configured.heldout in available else ''
  return Splits(train, heldout, configured.heldout_fraction)


def unit_is_current(unit: Unit, listing: UnitListing | None) -> bool:
  """Whether a kept listing still describes the unit without reading it again: an archive whose
  size and modification time are unchanged (directory buckets are always listed again)."""
  if listing is None or not unit.archive:
    return False
  return listing.stamp == file_stamp(epath.Path(unit.root).expanduser() / unit.archive)


def location(unit: Unit, path: str) -> str:
  """The name a clip's problems and errors show: its file, or '<archive>/<member>'."""
  root = epath.Path(unit.root).expanduser()
  return f'{root / unit.archive}/{path}' if unit.archive else str(root / path)
