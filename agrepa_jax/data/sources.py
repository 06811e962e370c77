"""Listings of local corpora: which clips each split holds, in a fixed order, with their metadata.

A listing is what a tfds builder (datasets.py) turns into a dataset; its digest covers every
file's path, size and modification time, so adding, removing or changing a file is noticed.
Paths go through `etils.epath`, so a root may be a `gs://` bucket.
"""

import csv
import dataclasses
import functools
import hashlib
import io
import json
import logging
import re

from etils import epath

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
  path: str
  stamp: str
  fields: dict


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


def librispeech_listing(directory: str) -> Listing:
  """An extracted LibriSpeech tree: <root>[/LibriSpeech]/<split>/<speaker>/<chapter>/*.flac.

  Each chapter's `<speaker>-<chapter>.trans.txt` ("<utterance id> <TRANSCRIPT>" per line) gives
  the transcripts. A tree without the official split folders is one split, `train`, of every
  audio file under it (transcripts where present), so any folder of speech can be used.
  """
  root = checked_root(directory, 'LibriSpeech')
  if (root / 'LibriSpeech').is_dir():
    root = root / 'LibriSpeech'
  split_dirs = {split_name(s): root / s for s in LIBRISPEECH_SPLITS if (root / s).is_dir()}
  if not split_dirs:
    split_dirs = {'train': root}
  splits = {name: speech_entries(folder) for name, folder in split_dirs.items()}
  if not any(splits.values()):
    raise FileNotFoundError(f'no audio files ({", ".join(AUDIO_SUFFIXES)}) under {root}')
  return Listing('librispeech', str(root), splits)


def speech_entries(folder: epath.Path) -> list[Entry]:
  transcripts = {}
  for listing in files_under(folder, ('.trans.txt',)):
    for line in listing.read_text().splitlines():
      utterance, _, text = line.partition(' ')
      transcripts[utterance] = text.strip()
  entries = []
  for path in audio_files(folder):
    speaker, chapter = (path.stem.split('-') + ['', ''])[:2]
    entries.append(
      Entry(
        path.stem,
        str(path),
        file_stamp(path),
        {
          'id': path.stem,
          'path': str(path),
          'text': transcripts.get(path.stem, ''),
          'speaker_id': int(speaker) if speaker.isdigit() else -1,
          'chapter_id': int(chapter) if chapter.isdigit() else -1,
        },
      )
    )
  return entries


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


def audioset_listing(directory: str) -> Listing:
  """A local AudioSet tree: the segment CSVs and class_labels_indices.csv at the root, clips
  anywhere below it named by YouTube id (`<ytid>_<start>.*` or `Y<ytid>_<start>_<end>.*`).

  A split is each segment CSV present; a clip the CSV lists but the tree does not hold is counted in
  `missing` (and logged), not an error.
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
