"""Listings of local corpora: which clips each split holds, in a fixed order, with their metadata.

A listing is what a tfds builder (datasets.py) turns into a dataset; its digest covers every
file's path, size and modification time, so adding, removing or changing a file is noticed.
Paths go through `etils.epath`, so a root may be a `gs://` bucket. LibriSpeech may also be its
OpenSLR archives (`<split>.tar.gz`), read as they are: no extraction, one sequential pass.
"""

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re
import tarfile
from collections.abc import Callable, Iterator

from etils import epath

from agrepa_jax import files

AUDIO_SUFFIXES = ('.wav', '.flac', '.mp3', '.ogg', '.opus', '.m4a')
LIBRISPEECH_SPLITS = (
  'train-clean-100',
  'train-clean-360',
  'train-other-500',
  'dev-clean',
  'dev-other',
  'test-clean',
  'test-other',
)
AUDIOSET_CSVS = {
  'balanced_train': 'balanced_train_segments.csv',
  'unbalanced_train': 'unbalanced_train_segments.csv',
  'eval': 'eval_segments.csv',
}
AUDIOSET_LABELS_CSV = 'class_labels_indices.csv'
YOUTUBE_ID_LENGTH = 11


@dataclasses.dataclass(frozen=True)
class Entry:
  """One clip of a listing: its id, file, a stamp of the file (size, mtime) and the tfds fields."""

  id: str
  path: str  # the file, or '<archive>/<member>' for a member of a tar archive
  stamp: str
  fields: dict
  archive: str = ''  # the tar archive that holds the file, if any
  member: str = ''  # its name inside the archive


@dataclasses.dataclass
class Listing:
  corpus: str  # librispeech | audioset | embedded: the tfds builder and its fields
  root: str
  splits: dict  # {tfds split name: [Entry]}
  missing: int = 0  # clips the corpus lists but the root does not hold

  @property
  def name(self) -> str:
    """The corpus and its digest: names its tfds dataset."""
    return f'{self.corpus}-{self.digest}'

  @functools.cached_property
  def digest(self) -> str:
    text = json.dumps(
      [self.corpus, {s: [(e.id, e.path, e.stamp) for e in es] for s, es in self.splits.items()}]
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: epath.Path) -> str:
  info = path.stat()
  return f'{info.length}-{int(info.mtime)}'


def files_under(root: epath.Path, suffixes: tuple[str, ...]) -> list[epath.Path]:
  """Every file below `root` whose name ends in one of `suffixes`, sorted (local or gs://)."""
  return sorted(
    directory / name
    for directory, _, names in root.walk()
    for name in names
    if name.lower().endswith(suffixes)
  )


def audio_files(root: epath.Path) -> list[epath.Path]:
  return files_under(root, AUDIO_SUFFIXES)


def split_name(directory: str) -> str:
  """A tfds split name for a directory name: train-clean-100 -> train_clean_100."""
  return re.sub(r'\W', '_', directory)


def checked_root(directory: str, what: str) -> epath.Path:
  root = epath.Path(directory).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f'{what} directory does not exist: {root}')
  return root


def librispeech_listing(directory: str, cache_root: epath.Path | None = None) -> Listing:
  """LibriSpeech: an extracted tree <root>[/LibriSpeech]/<split>/<speaker>/<chapter>/*.flac, or the
  OpenSLR archives <root>/<split>.tar.gz (a split extracted next to its archive is read extracted).

  Each chapter's `<speaker>-<chapter>.trans.txt` ("<utterance id> <TRANSCRIPT>" per line) gives
  the transcripts. A tree without the official split folders or archives is one split, `train`, of
  every audio file under it (transcripts where present), so any folder of speech can be used.
  An archive is read through once to list it; with `cache_root` that listing is kept (keyed by the
  archive's size and modification time), so later starts do not read the archive again.
  """
  given = checked_root(directory, 'LibriSpeech')
  root = given / 'LibriSpeech' if (given / 'LibriSpeech').is_dir() else given
  split_dirs = {split_name(s): root / s for s in LIBRISPEECH_SPLITS if (root / s).is_dir()}
  archives = {
    split_name(s): given / f'{s}.tar.gz'
    for s in LIBRISPEECH_SPLITS
    if split_name(s) not in split_dirs and (given / f'{s}.tar.gz').exists()
  }
  if not split_dirs and not archives:
    split_dirs = {'train': root}
  splits = {name: speech_entries(folder) for name, folder in split_dirs.items()}
  for name, archive in archives.items():
    splits[name] = archive_speech_entries(archive, cache_root)
  if not any(splits.values()):
    raise FileNotFoundError(f'no audio files ({", ".join(AUDIO_SUFFIXES)}) under {root}')
  return Listing('librispeech', str(root), splits)


def parse_transcripts(text: str) -> dict[str, str]:
  """{utterance id: transcript} of a LibriSpeech .trans.txt."""
  pairs = (line.partition(' ') for line in text.splitlines())
  return {utterance: rest.strip() for utterance, _, rest in pairs if utterance}


def speech_entry(stem: str, path: str, stamp: str, transcripts: dict, **archive) -> Entry:
  speaker, chapter = (stem.split('-') + ['', ''])[:2]
  fields = {
    'id': stem,
    'path': path,
    'text': transcripts.get(stem, ''),
    'speaker_id': int(speaker) if speaker.isdigit() else -1,
    'chapter_id': int(chapter) if chapter.isdigit() else -1,
  }
  return Entry(stem, path, stamp, fields, **archive)


def speech_entries(folder: epath.Path) -> list[Entry]:
  transcripts = {}
  for path in files_under(folder, ('.trans.txt',)):
    transcripts.update(parse_transcripts(path.read_text()))
  return [
    speech_entry(path.stem, str(path), file_stamp(path), transcripts)
    for path in audio_files(folder)
  ]


def archive_speech_entries(archive: epath.Path, cache_root: epath.Path | None) -> list[Entry]:
  """The audio members of a LibriSpeech archive, in archive order (the order it is read in)."""
  stamp = file_stamp(archive)
  scan = scan_archive(archive, stamp, cache_root)
  return [
    speech_entry(
      epath.Path(member).stem,
      f'{archive}/{member}',
      stamp,
      scan['transcripts'],
      archive=str(archive),
      member=member,
    )
    for member in scan['audio']
  ]


def archive_members(archive: epath.Path) -> Iterator[tuple[str, Callable[[], bytes]]]:
  """(name, read) of each regular file of a tar archive (compressed or not), in archive order.

  One sequential pass and nothing extracted; `read()` works while its member is the current one.
  A damaged archive raises a ValueError naming it.
  """
  try:
    with archive.open('rb') as f, tarfile.open(fileobj=f, mode='r|*') as tar:
      for member in tar:
        if member.isfile():
          yield member.name, lambda m=member: tar.extractfile(m).read()
  except (tarfile.TarError, EOFError, OSError) as e:
    raise ValueError(f'{archive}: cannot read the archive ({e}); download it again') from e


def scan_archive(archive: epath.Path, stamp: str, cache_root: epath.Path | None) -> dict:
  """{'audio': [audio member names, in archive order], 'transcripts': {utterance: text}} of the
  archive with file stamp `stamp`."""
  key = hashlib.sha256(str(archive).encode()).hexdigest()[:8]
  cached = cache_root / 'archives' / f'{archive.name}-{key}-{stamp}.json' if cache_root else None
  if cached is not None and cached.exists():
    return json.loads(cached.read_text())
  logging.info('listing %s (read once; the listing is kept in %s)', archive, cached)
  audio, transcripts = [], {}
  for name, read in archive_members(archive):
    if name.lower().endswith(AUDIO_SUFFIXES):
      audio.append(name)
    elif name.endswith('.trans.txt'):
      transcripts.update(parse_transcripts(read().decode()))
  scan = {'audio': audio, 'transcripts': transcripts}
  if cached is not None:
    cached.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(cached, json.dumps(scan))
  return scan


def read_csv_rows(path: epath.Path) -> list[list[str]]:
  """Rows of an AudioSet CSV without its '#' comment lines, fields stripped."""
  lines = [line for line in path.read_text().splitlines() if line and not line.startswith('#')]
  return [
    [f.strip() for f in row]
    for row in csv.reader(io.StringIO('\n'.join(lines)), skipinitialspace=True)
  ]


def youtube_ids_of(stem: str) -> tuple[str, ...]:
  """The YouTube ids a clip's file name may start with: 'abc..._30' or 'Yabc..._30.000_40.000'."""
  candidates = [stem[:YOUTUBE_ID_LENGTH]]
  if stem.startswith('Y'):
    candidates.append(stem[1 : 1 + YOUTUBE_ID_LENGTH])
  return tuple(candidates)


def audioset_listing(directory: str, cache_root: epath.Path | None = None) -> Listing:
  """A local AudioSet tree: the segment CSVs and class_labels_indices.csv at the root, clips
  anywhere below it named by YouTube id (`<ytid>_<start>.*` or `Y<ytid>_<start>_<end>.*`).

  A split is each segment CSV present; a clip the CSV lists but the tree does not hold is counted in
  `missing` (and logged), not an error. (`cache_root` is not needed: AudioSet comes as files.)
  """
  root = checked_root(directory, 'AudioSet')
  labels_csv = root / AUDIOSET_LABELS_CSV
  if not labels_csv.exists():
    raise FileNotFoundError(f'AudioSet class-label CSV not found: {labels_csv}')
  names = {row[1]: row[2] for row in read_csv_rows(labels_csv)[1:]}  # index, mid, display_name
  files = {}
  for path in audio_files(root):
    for youtube_id in youtube_ids_of(path.stem):
      files.setdefault(youtube_id, path)
  splits, missing = {}, 0
  for split, csv_name in AUDIOSET_CSVS.items():
    if not (root / csv_name).exists():
      continue
    entries = []
    for youtube_id, start, _, labels in read_csv_rows(root / csv_name):
      path = files.get(youtube_id)
      if path is None:
        missing += 1
        continue
      mids = [m for m in labels.split(',') if m]
      clip_id = f'{youtube_id}_{int(float(start))}'
      fields = {
        'id': clip_id,
        'path': str(path),
        'text': '',
        'labels': [names.get(m, m) for m in mids],
        'label_ids': mids,
        'youtube_id': youtube_id,
        'start_seconds': float(start),
      }
      entries.append(Entry(clip_id, str(path), file_stamp(path), fields))
    splits[split] = entries
  if not splits:
    raise FileNotFoundError(
      f'no AudioSet segment CSV ({", ".join(AUDIOSET_CSVS.values())}) in {root}'
    )
  if missing:
    logging.warning('AudioSet: %d clips listed in the CSVs are not under %s', missing, root)
  return Listing('audioset', str(root), splits, missing)


def embedded_listing(
  root: epath.Path, num_speech: int, num_audio: int, seed: int, seconds: float
) -> Listing:
  """Generates (once) and lists the embedded corpus: eSpeak NG speech and synthetic sound events."""
  from agrepa_jax.data import synth

  corpus = synth.build_embedded_corpus(
    root, num_speech=num_speech, num_audio=num_audio, seed=seed, seconds=seconds
  )
  entries = [
    Entry(
      e['id'],
      str(e['path']),
      file_stamp(epath.Path(e['path'])),
      {'id': e['id'], 'path': str(e['path']), 'text': e.get('text', ''), 'domain': e['domain']},
    )
    for e in corpus
  ]
  return Listing('embedded', str(root), {'train': entries})


LISTINGS = {'librispeech': librispeech_listing, 'audioset': audioset_listing}
