"""Where clips come from: the generated embedded corpus, or directories of real audio."""

import dataclasses
import pathlib

AUDIO_SUFFIXES = ('.wav', '.flac', '.mp3', '.ogg', '.opus', '.m4a')


@dataclasses.dataclass(frozen=True)
class Clip:
  id: str
  path: str
  domain: str
  text: str = ''


def embedded_clips(
  root: pathlib.Path, num_speech: int, num_audio: int, seed: int, seconds: float
) -> list[Clip]:
  """Generates (once) and lists the embedded corpus: eSpeak NG speech and synthetic sound events."""
  from agrepa_jax.data import synth

  entries = synth.build_embedded_corpus(
    root, num_speech=num_speech, num_audio=num_audio, seed=seed, seconds=seconds
  )
  return [Clip(e['id'], str(e['path']), e['domain'], e.get('text', '')) for e in entries]


def directory_clips(directory: str, domain: str) -> list[Clip]:
  """Every audio file under `directory` (recursively), sorted by path.

  LibriSpeech-style `*.trans.txt` files ("<utterance-id> <TRANSCRIPT>" per line) supply transcripts.
  """
  root = pathlib.Path(directory).expanduser()
  if not root.is_dir():
    raise FileNotFoundError(f'data directory for domain {domain!r} does not exist: {root}')
  transcripts = {}
  for listing in root.rglob('*.trans.txt'):
    for line in listing.read_text().splitlines():
      utterance, _, text = line.partition(' ')
      transcripts[utterance] = text.strip()
  files = sorted(p for p in root.rglob('*') if p.suffix.lower() in AUDIO_SUFFIXES)
  if not files:
    raise FileNotFoundError(f'no audio files ({", ".join(AUDIO_SUFFIXES)}) under {root}')
  return [
    Clip(
      f'{domain}/{p.relative_to(root).with_suffix("")}', str(p), domain, transcripts.get(p.stem, '')
    )
    for p in files
  ]
