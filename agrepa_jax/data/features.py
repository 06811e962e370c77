"""Per-clip features of the store: decode, 24 kHz log-mel, teacher targets and tokens.

A record (records.py) holds the clip at its native length up to data.max_seconds: `mel` (T, 100)
bf16, `num_samples` (24 kHz samples of audio), `domain`, `teacher` (C_d,) float32 (the utterance
mean of its own domain's teacher), `tokens` (K, N) int32 at data.token_rate, with
data.teacher_frames `teacher_frames` (F, C_d) bf16 of its own domain only, and with teachers.online
`audio` (S,) int16 PCM at its domain's teacher rate (the teacher computed the stored targets from
exactly this audio); plus `id`, `path`, `text` and class `labels`. store.py decides which clips
each builder computes; this module computes them.
"""

import dataclasses
import hashlib
import json
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import librosa
import ml_dtypes
import numpy as np
from etils import epath

from agrepa_jax import audio, sharding
from agrepa_jax.data import DataError, tokenizer
from agrepa_jax.data import spec as spec_lib
from agrepa_jax.teachers.base import Teacher, masked_mean

STORE_VERSION = 4  # tfds records with bf16 bits, whole utterances, content-defined shards


@dataclasses.dataclass(frozen=True)
class ClipRef:
  """One clip the store is built from: where its bytes are and what the record keeps of it."""

  id: str  # unique in the store: '<domain>/<corpus id>'
  domain: str
  split: str  # train | heldout
  unit: str  # the key of the listing unit that holds it
  path: str  # where errors and originals find it: a file, or '<archive>/<member>'
  offset: int  # archive members: the byte offset of its data in the tar stream; -1 for files
  size: int
  mtime: int
  text: str = ''
  labels: tuple = ()


class ClipError(ValueError):
  """A clip that cannot be used; the message names its file and the reason."""


class NoUsableClips(DataError):
  """Some domain has no usable training clip; `domains` names them."""

  def __init__(self, domains: list[str], detail: str):
    super().__init__(f'no usable training clips of domain(s) {domains} ({detail})')
    self.domains = domains


def store_key(settings: dict) -> str:
  blob = json.dumps({'version': STORE_VERSION, **settings}, sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def atomic_write(path: epath.Path, write_local) -> None:
  """Calls write_local(local file path), then moves the file to `path` (local or remote) at once.
  The file is readable by the group and others as the user's umask allows (not mkstemp's 0600)."""
  path.parent.mkdir(parents=True, exist_ok=True)
  local_dir = str(path.parent) if os.path.isdir(str(path.parent)) else None
  handle, temporary = tempfile.mkstemp(prefix=f'.{path.name}.', dir=local_dir)
  os.close(handle)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(temporary, 0o666 & ~umask)
  try:
    write_local(temporary)
    if local_dir:
      os.replace(temporary, str(path))
    else:
      epath.Path(temporary).copy(path, overwrite=True)
  finally:
    if os.path.exists(temporary):
      os.remove(temporary)


def write_json(path: epath.Path, value) -> None:
  atomic_write(path, lambda local: epath.Path(local).write_text(json.dumps(value, default=str)))


# ----- decoding, mels, teachers, tokens -----


def decode_clip(ref: ClipRef, data: bytes, max_samples: int, via_rate: int = 0):
  """(the clip's 24 kHz waveform, at most max_samples long; with via_rate (the official front end,
  data.mel_via_rate) also the clip at via_rate, which the teachers then read as the official code
  does, else None). Raises ClipError for any bad file."""
  try:
    wave = audio.decode_audio(data, ref.path, via_rate=via_rate)[:max_samples]
    at_via = None
    if via_rate:
      at_via = audio.decode_audio(data, ref.path, via_rate, via_rate=via_rate)
      at_via = at_via[: -(-max_samples * via_rate // audio.SAMPLE_RATE)]
  except audio.AudioDecodeError as e:
    raise ClipError(str(e)) from e
  except Exception as e:  # anything else a file can do (e.g. a resampler error) is this file's
    raise ClipError(f'{ref.path}: {type(e).__name__}: {e}') from e
  if not np.any(wave):
    raise ClipError(f'{ref.path}: every sample is zero (a silent clip)')
  return wave, at_via


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
  at_rate: tuple | None = None,
):
  """Utterance means (N, C) over frames holding audio, frame features (N, F, C) and their mask.

  waves (N, S) are 24 kHz, zero past num_samples; they are resampled to the teacher's rate, padded
  to `rows` rows rounded up to a multiple of the mesh size (one shape: the teacher compiles once)
  and sharded over the mesh. Clips longer than the teacher's longest input (Whisper: 30 s) are
  read in consecutive windows of that length, their frames concatenated. pcm: `teacher_audio(waves,
  num_samples, rate)`, which the teacher then reads instead: exactly the audio the store keeps for
  online teachers, so stored and online targets agree. at_rate: (waves (N, S') at the teacher's
  rate, their sample counts), read instead of resampling `waves` (the official front end's).
  """
  rate = teacher.spec.sample_rate
  if pcm is not None:
    pcm16, teacher_samples = pcm
    resampled = pcm16.astype(np.float32) / spec_lib.PCM_SCALE
  elif at_rate is not None:
    resampled, teacher_samples = at_rate
  else:
    resampled = librosa.resample(
      waves, orig_sr=audio.SAMPLE_RATE, target_sr=rate, res_type='soxr_hq', axis=-1
    )
    teacher_samples = np.ceil(num_samples * rate / audio.SAMPLE_RATE).astype(np.int64)
  rows = -(-max(rows, len(waves)) // mesh.devices.size) * mesh.devices.size
  resampled = pad_rows(resampled.astype(np.float32), rows)
  teacher_samples = pad_rows(teacher_samples, rows)
  limit = round(teacher.spec.max_seconds * rate) or resampled.shape[1]
  frames, mask = [], []
  for start in range(0, resampled.shape[1], limit):  # a teacher's longest input at a time
    chunk = jax.device_put(resampled[:, start : start + limit], sharding.batch_sharding(mesh))
    counts = np.clip(teacher_samples - start, 0, chunk.shape[1])
    # a clip that ended before this chunk reads one sample of silence (no teacher attends to
    # nothing); its frames are masked out here
    chunk_frames, chunk_mask = teacher.features(chunk, np.maximum(counts, 1))
    frames.append(np.asarray(chunk_frames, np.float32))
    mask.append(np.asarray(chunk_mask) & (counts > 0)[:, None])
  frames = np.concatenate(frames, axis=1)[: len(waves)]
  mask = np.concatenate(mask, axis=1)[: len(waves)]
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
    raise DataError(f'token file for clip {ref.id!r} not found: {path}')
  with path.open('rb') as f:
    tokens = np.atleast_2d(np.load(f))
  vocab, num_codebooks = settings['codebook_size'], settings['num_codebooks']
  if tokens.shape[0] != num_codebooks:
    raise DataError(
      f'{path}: holds {tokens.shape[0]} codebooks, model.num_codebooks={num_codebooks}'
    )
  if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab):
    raise DataError(
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


BUCKET_SAMPLES = 5 * audio.SAMPLE_RATE  # a batch is padded to a multiple of 5 s


def batch_length(num_samples: np.ndarray, max_samples: int) -> int:
  """The padded length of a batch: a multiple of BUCKET_SAMPLES that leaves at least half an STFT
  window of zeros after its longest clip (so every kept mel frame equals the one of a clip padded
  to max_samples), at most max_samples. A few lengths, so the mel and teachers compile a few
  shapes, and 10 s clips do not pay for 35 s of padding."""
  needed = int(num_samples.max()) + audio.N_FFT // 2
  return min(max_samples, -(-needed // BUCKET_SAMPLES) * BUCKET_SAMPLES)


def batch_targets(decoded: list[tuple], workers: Workers, domain: str):
  """(num_samples, padded 24 kHz waves, teacher-rate PCM or None, (utterance, frames, mask)) of a
  batch of decoded clips (decode_clip's pairs) of one domain."""
  settings = workers.settings
  waves = [wave for wave, _ in decoded]
  num_samples = np.array([len(w) for w in waves])
  padded = pad_waves(waves, batch_length(num_samples, settings['max_samples']))
  teacher = workers.teachers[domain]
  rate = teacher.spec.sample_rate
  pcm = teacher_audio(padded, num_samples, rate) if settings.get('teacher_audio') else None
  at_rate = None
  if settings.get('mel_via_rate') == rate:  # the official front end: the teacher reads the clip
    at_via = [clip for _, clip in decoded]  # at the detour's rate, not resampled back from 24 kHz
    length = -(-padded.shape[1] * rate // audio.SAMPLE_RATE)
    at_rate = (pad_waves(at_via, length), np.array([len(a) for a in at_via]))
  targets = teacher_features(
    teacher, padded, num_samples, workers.mesh, settings['chunk_size'], pcm=pcm, at_rate=at_rate
  )
  return num_samples, padded, pcm, targets


def clip_records(refs: list[ClipRef], decoded: list[tuple], workers: Workers) -> list[dict]:
  """Records of decoded clips (decode_clip's pairs) of one domain (a teacher batch)."""
  settings, domain = workers.settings, refs[0].domain
  num_samples, padded, pcm, (utterance, frames, mask) = batch_targets(decoded, workers, domain)
  mel = np.asarray(audio.log_mel(jnp.asarray(pad_rows(padded, settings['chunk_size']))))
  valid = mask.sum(1)
  if settings['token_dir']:
    tokens = [
      read_token_file(settings['token_dir'], ref, settings)[
        :, : spec_lib.token_count(n / audio.SAMPLE_RATE, settings['token_rate'])
      ]
      for ref, n in zip(refs, num_samples, strict=True)
    ]
  else:
    pooled = [
      token_features(frames[i], int(valid[i]), num_samples[i], settings['token_rate'])
      for i in range(len(refs))
    ]
    tokens = tokenizer.assign_token_lists(pooled, workers.codebooks[domain])
  records = []
  for i, ref in enumerate(refs):
    record = {
      'id': ref.id,
      'path': ref.path,
      'text': ref.text,
      'labels': list(ref.labels),
      'domain': np.int32(workers.domains.index(domain)),
      'num_samples': np.int64(num_samples[i]),
      'mel': mel[i, : audio.num_frames(int(num_samples[i]))].astype(ml_dtypes.bfloat16),
      'teacher': utterance[i].astype(np.float32),
      'tokens': np.asarray(tokens[i], np.int32),
    }
    if settings['teacher_frames']:
      record['teacher_frames'] = frames[i, : max(int(valid[i]), 1)].astype(ml_dtypes.bfloat16)
    if pcm is not None:
      record['audio'] = pcm[0][i, : pcm[1][i]]
    records.append(record)
  return records


def decoded_batches(clips, settings: dict, skipped: list, warn: bool = True):
  """Yields (refs, decode_clip's pairs) of up to chunk_size decodable clips of one domain from
  `clips`, an iterable of (ClipRef, its file's bytes, or the OSError met reading them). Bad clips
  go to `skipped` as {'id', 'path', 'reason'} (and to the log once, with `warn`)."""
  pending = {}
  for ref, data in clips:
    try:
      if isinstance(data, Exception):
        raise ClipError(f'{ref.path}: cannot read the file ({data})')
      wave = decode_clip(ref, data, settings['max_samples'], settings.get('mel_via_rate', 0))
    except ClipError as e:
      if warn:
        logging.warning('skipping clip %s: %s', ref.id, e)
      skipped.append({'id': ref.id, 'path': ref.path, 'reason': str(e)})
      continue
    kept, waves = pending.setdefault(ref.domain, ([], []))
    kept.append(ref)
    waves.append(wave)
    if len(kept) == settings['chunk_size']:
      yield pending.pop(ref.domain)
  yield from (batch for batch in pending.values() if batch[0])


def build_records(clips, workers: Workers) -> tuple[list[dict], list[dict]]:
  """(records, skipped clips) of (ClipRef, bytes) pairs; records keep the order of `clips`."""
  skipped, records = [], []
  for batch_refs, waves in decoded_batches(clips, workers.settings, skipped):
    records += clip_records(batch_refs, waves, workers)
  return records, skipped


# ----- the tokenizer -----


def fit_tokenizer(clips, domain: str, workers: Workers, seed: int) -> np.ndarray:
  """(K, V, C) residual k-means codebooks on the teacher frames, pooled to the token rate, of the
  clips (ClipRef, bytes) of `domain`."""
  settings, pooled, skipped = workers.settings, [], []
  for batch_refs, decoded in decoded_batches(clips, settings, skipped, warn=False):
    num_samples, _, _, (_, frames, mask) = batch_targets(decoded, workers, domain)
    pooled += [
      token_features(frames[i], int(mask[i].sum()), num_samples[i], settings['token_rate'])
      for i in range(len(batch_refs))
    ]
  if not pooled:
    reasons = [s['reason'] for s in skipped[:3]]
    raise NoUsableClips([domain], f'{len(skipped)} sampled for the tokenizer; e.g. {reasons}')
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


def codebook_digest(codebooks: dict) -> str:
  h = hashlib.sha256()
  for d in sorted(codebooks):
    for c in codebooks[d]:
      h.update(np.ascontiguousarray(c).tobytes())
  return h.hexdigest()[:16]
