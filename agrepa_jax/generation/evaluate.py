"""The sample and eval modes: generate held-out clips from a trained workdir, write a listening
page, and score the generations.

Both modes generate each held-out clip from its own tokens and a reference prompt cut from its own
first frames (config.sample), and vocode with config.vocoder (Griffin-Lim without a checkpoint).

Metric choices (run_eval):
- Embeddings for FAD are utterance means of frozen-teacher features over the frames that hold audio,
  computed from 24 kHz audio resampled to the teacher's rate — the same recipe as the training
  targets (data.features.teacher_features).
- 'fad' compares generated audio with the real mels vocoded by the same vocoder (resynthesis), so
  that vocoder artefacts appear on both sides; 'fad_original' compares with the clips' original
  audio (decoded from their paths, when they can be). 'fad_inf' is FAD∞ against the resynthesis.
  FAD is computed over all clips and per domain; each value's clip count is in eval.json 'counts'.
- WER: speech-domain clips with a transcript, transcribed at 16 kHz by the JAX Whisper greedy
  decoder, for the generated, resynthesized and original audio.
- mel L1: mean |generated − real| of normalized mels over the frames that hold audio and lie
  after the prompt (the prompt frames are copies).
"""

import dataclasses
import html
import itertools
import json
import logging
import math
import re

import jax
import librosa
import matplotlib
import numpy as np
import tqdm

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402
from etils import epath  # noqa: E402

from agrepa_jax import audio, checkpoint, files, losses, metrics, teachers  # noqa: E402
from agrepa_jax.data import features  # noqa: E402
from agrepa_jax.generation import fad, sampler, vocos, wer  # noqa: E402

SAMPLES_DIR = 'samples'
TRANSCRIBER_RATE = 16000
SPEECH_DOMAIN = 'speech'
MIN_FAD_INF_CLIPS = 4  # FAD∞ fits subsets of sizes between n/2 (at least 2) and n


@dataclasses.dataclass
class Generation:
  """Held-out clips and what the sampler made of them; arrays have one row per clip."""

  clips: list[dict]  # id, path, domain, text
  domain: np.ndarray  # (N,) domain indices
  num_samples: np.ndarray  # (N,) samples of audio in each 24 kHz clip
  prompt_frames: np.ndarray  # (N,) reference-prompt length
  real: np.ndarray  # (N, T, n_mels) normalized mels of the clips
  generated: np.ndarray  # (N, T, n_mels) normalized generated mels
  has_original: np.ndarray | None = None  # (N,) whether each clip's original audio was read


def select_clips(source, num_clips: int, max_samples: int, clip_list: str = '') -> np.ndarray:
  """Held-out rows whose whole audio fits in a generated clip (`max_samples`, data.clip_seconds):
  so a transcript is the text of exactly the audio scored. The ids listed in `clip_list` (one per
  line), else the first `num_clips` taking the domains in turn, so that every domain is there."""
  fits = np.asarray(source.arrays['num_samples']) <= max_samples
  if clip_list:
    ids = [
      line.strip() for line in files.as_path(clip_list).read_text().splitlines() if line.strip()
    ]
    rows = {clip['id']: i for i, clip in enumerate(source.clips)}
    missing = [i for i in ids if i not in rows]
    if missing:
      raise ValueError(f'{clip_list}: clips not in the held-out split: {missing[:5]}')
    too_long = [i for i in ids if not fits[rows[i]]]
    if too_long:
      raise ValueError(
        f'{clip_list}: clips longer than data.clip_seconds, whose transcripts would not match '
        f'the audio generated: {too_long[:5]}'
      )
    return np.array([rows[i] for i in ids], np.int64)
  per_domain = [
    np.intersect1d(source.indices_of_domain(d), np.flatnonzero(fits))
    for d in range(len(source.domains))
  ]
  in_turn = [i for group in itertools.zip_longest(*per_domain) for i in group if i is not None]
  if not in_turn:
    raise ValueError(
      f'no held-out clip fits in data.clip_seconds ({max_samples / audio.SAMPLE_RATE:g} s); '
      'raise data.clip_seconds to evaluate longer clips whole'
    )
  return np.array(in_turn[:num_clips], np.int64)


def batch_slices(n: int, batch_size: int) -> list[slice]:
  return [slice(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """Fills a short last batch up to `rows` by repeating its last row."""
  return np.concatenate([x, np.repeat(x[-1:], rows - len(x), axis=0)])


def generate(
  run: checkpoint.TrainedRun, rows: np.ndarray, sample_cfg, noise_std: float
) -> Generation:
  """Samples every held-out row with its own tokens and reference prompt."""
  source = run.heldout_source
  records = [source[int(i)] for i in rows]
  stack = lambda key: np.stack([r[key] for r in records])
  real, num_samples, domain, tokens = (stack(k) for k in ('mel', 'num_samples', 'domain', 'tokens'))
  prompt_frames = sampler.prompt_lengths(
    num_samples, sample_cfg.prompt_seconds, sample_cfg.prompt_fraction
  )
  prompt_mask = sampler.leading_frames_mask(prompt_frames, real.shape[1])
  lengths = np.asarray(losses.frame_mask(num_samples, real.shape[1], audio.HOP_LENGTH)).sum(1)
  devices = run.mesh.size
  batch_size = (
    -(-sample_cfg.batch_size // devices) * devices
  )  # the batch is sharded over all devices
  key = jax.random.key(sample_cfg.seed)
  generated = []
  for b, s in enumerate(
    tqdm.tqdm(batch_slices(len(rows), batch_size), desc='sample', unit='batch')
  ):
    inputs = [pad_rows(x[s], batch_size) for x in (tokens, real, domain, prompt_mask, lengths)]
    mels = sampler.sample(
      run.model.backbone,
      *inputs[:3],
      jax.random.fold_in(key, b),
      inputs[3],
      num_points=sample_cfg.num_points,
      sway=sample_cfg.sway,
      cfg_weight=sample_cfg.cfg_weight,
      cfg_form=sample_cfg.cfg_form,
      noise_std=noise_std,
      mesh=run.mesh,
      lengths=inputs[4],
    )
    generated.append(np.asarray(mels)[: s.stop - s.start])
  return Generation(
    [source.clips[int(i)] for i in rows],
    domain,
    num_samples,
    prompt_frames,
    real,
    np.concatenate(generated),
  )


def open_vocoder(checkpoint: str) -> vocos.Vocoder:
  vocoder = vocos.load_vocoder(checkpoint or None)
  logging.log(logging.INFO if checkpoint else logging.WARNING, 'vocoder: %s', vocoder.name)
  return vocoder


def zero_past(waves: np.ndarray, num_samples: np.ndarray) -> np.ndarray:
  return np.where(np.arange(waves.shape[1])[None, :] < num_samples[:, None], waves, 0.0).astype(
    np.float32
  )


def vocode(
  vocoder: vocos.Vocoder,
  mels: np.ndarray,
  num_samples: np.ndarray,
  clip_samples: int,
  batch_size: int,
  desc: str,
) -> np.ndarray:
  """(N, clip_samples) 24 kHz audio of normalized mels, zero past each clip's num_samples."""
  waves = [
    vocoder.vocode(mels[s])
    for s in tqdm.tqdm(batch_slices(len(mels), batch_size), desc=desc, unit='batch')
  ]
  return zero_past(audio.fit_length(np.concatenate(waves), clip_samples), num_samples)


def load_originals(config, clips: list[dict], clip_seconds: float) -> tuple[np.ndarray, np.ndarray]:
  """(N, samples) 24 kHz original audio of the clips, read as the store read them (files or
  archive members) and cut to `clip_seconds`, and (N,) whether each could be read: a clip whose
  original is unreadable is left out of the metrics against originals, alone."""
  from agrepa_jax.data import prepare

  samples = round(clip_seconds * audio.SAMPLE_RATE)
  waves = np.zeros((len(clips), samples), np.float32)
  available = np.zeros(len(clips), bool)
  for i, (clip, data) in enumerate(
    zip(clips, prepare.source_bytes(config, [c['path'] for c in clips]), strict=True)
  ):
    try:
      if isinstance(data, Exception):
        raise audio.AudioDecodeError(f'{clip["path"]}: cannot read the file ({data})')
      waves[i] = audio.fit_length(audio.decode_audio(data, clip['path']), samples)
      available[i] = True
    except audio.AudioDecodeError as e:
      logging.warning(
        'original of %s unavailable, left out of the metrics against originals: %s', clip['id'], e
      )
  return waves, available


def mel_l1(
  real: np.ndarray, generated: np.ndarray, num_samples: np.ndarray, prompt_frames: np.ndarray
) -> np.ndarray:
  """(N,) mean |generated − real| over each clip's audio frames after its prompt."""
  frame = np.arange(real.shape[1])[None, :]
  scored = (frame * audio.HOP_LENGTH < num_samples[:, None]) & (frame >= prompt_frames[:, None])
  per_frame = np.abs(generated - real).mean(-1)
  return (per_frame * scored).sum(1) / np.maximum(scored.sum(1), 1)


def domain_groups(domain: np.ndarray, domain_names) -> dict[str, np.ndarray]:
  """'all' and each domain present -> the rows of its clips."""
  groups = {'all': np.arange(len(domain))}
  for d, name in enumerate(domain_names):
    if (domain == d).any():
      groups[name] = np.flatnonzero(domain == d)
  return groups


def embedding_teachers(config) -> dict[str, teachers.Teacher]:
  """The FAD embedding models of config.eval.embeddings, each loaded once, labelled by their
  spec name (e.g. 'whisper-tiny.en'; the config entry is appended when two share a name).

  An entry is a key of config.teachers (its name and checkpoint) or a teacher name (its default
  checkpoint); () means every domain's configured teacher.
  """
  entries = {}
  for entry in config.eval.embeddings or config.data.domains:
    spec = config.teachers[entry] if entry in config.teachers else {'name': entry, 'checkpoint': ''}
    entries.setdefault((spec['name'], spec['checkpoint']), entry)
  out = {}
  for (name, path), entry in entries.items():
    teacher = teachers.load_teacher(name, path or None)
    out[teacher.spec.name if teacher.spec.name not in out else f'{teacher.spec.name}_{entry}'] = (
      teacher
    )
  return out


def utterance_embeddings(
  teacher: teachers.Teacher, waves: np.ndarray, num_samples: np.ndarray, batch_size: int
) -> np.ndarray:
  """Utterance-mean teacher features of 24 kHz audio, computed as the training targets are."""
  mesh = features.feature_mesh()
  return np.concatenate(
    [
      features.teacher_features(teacher, waves[s], num_samples[s], mesh)[0]
      for s in batch_slices(len(waves), batch_size)
    ]
  )


def fad_scores(
  embeddings: dict[str, dict[str, np.ndarray]],
  groups: dict[str, np.ndarray],
  fad_inf_points: int,
  has_original: np.ndarray | None = None,
) -> tuple[dict, dict]:
  """Scalar FAD metrics and the FAD∞ fits, per embedding model and clip group.

  embeddings: label -> {'generated', 'resynthesis'[, 'original']: (N, C)}; fad_original covers
  the clips whose original was read (has_original).
  """
  scores, fits = {}, {}
  for label, sets in embeddings.items():
    for group, rows in groups.items():
      if len(rows) < 2:
        continue
      generated = sets['generated'][rows]
      scores[f'fad/{label}/{group}'] = fad.fad(sets['resynthesis'][rows], generated)
      with_original = rows[has_original[rows]] if has_original is not None else rows
      if 'original' in sets and len(with_original) >= 2:
        scores[f'fad_original/{label}/{group}'] = fad.fad(
          sets['original'][with_original], sets['generated'][with_original]
        )
      if len(rows) >= MIN_FAD_INF_CLIPS:
        fit = fad.fad_infinity(sets['resynthesis'][rows], generated, num_points=fad_inf_points)
        scores[f'fad_inf/{label}/{group}'] = fit.value
        fits[f'{label}/{group}'] = dataclasses.asdict(fit)
  return scores, fits


def load_transcriber(checkpoint: str) -> tuple[wer.Transcriber | None, str]:
  """The JAX Whisper greedy transcriber, or None and the reason it is unavailable."""
  try:
    from agrepa_jax.teachers.whisper_decode import load_transcriber as load

    return load(checkpoint or None), ''
  except (ImportError, OSError, ValueError) as e:
    return None, f'no Whisper transcriber ({e})'


def transcribe(
  transcriber: wer.Transcriber,
  waves: np.ndarray,
  num_samples: np.ndarray,
  batch_size: int,
  desc: str,
) -> list[str]:
  """Texts of 24 kHz clips, resampled to the transcriber's 16 kHz."""
  resampled = librosa.resample(
    waves, orig_sr=audio.SAMPLE_RATE, target_sr=TRANSCRIBER_RATE, res_type='soxr_hq', axis=-1
  )
  resampled_samples = np.ceil(num_samples * TRANSCRIBER_RATE / audio.SAMPLE_RATE).astype(np.int64)
  resampled = zero_past(resampled, resampled_samples)
  texts = []
  for s in tqdm.tqdm(batch_slices(len(waves), batch_size), desc=desc, unit='batch'):
    texts += transcriber.transcribe(resampled[s], resampled_samples[s])
  return texts


def speech_wer(
  transcriber_checkpoint: str,
  clips: list[dict],
  waves: dict[str, np.ndarray],
  num_samples: np.ndarray,
  batch_size: int,
  has_original: np.ndarray | None = None,
) -> tuple[dict, list[dict], str]:
  """Corpus WER of each audio kind on the speech clips that have a transcript (the original audio
  on those whose original was read), every such clip's transcripts, and '' — or no scores and the
  reason WER was skipped."""
  rows = [i for i, clip in enumerate(clips) if clip['domain'] == SPEECH_DOMAIN and clip.get('text')]
  if not rows:
    return {}, [], 'no speech clips with a transcript'
  transcriber, skipped = load_transcriber(transcriber_checkpoint)
  if transcriber is None:
    return {}, [], skipped
  scored = {
    kind: [i for i in rows if kind != 'original' or has_original is None or has_original[i]]
    for kind in waves
  }
  hypotheses = {
    kind: dict(
      zip(
        scored[kind],
        transcribe(
          transcriber, w[scored[kind]], num_samples[scored[kind]], batch_size, f'transcribe {kind}'
        ),
        strict=True,
      )
    )
    for kind, w in waves.items()
    if scored[kind]
  }
  scores = {
    f'wer/{kind}': wer.corpus_wer([clips[i]['text'] for i in h], list(h.values()))
    for kind, h in hypotheses.items()
  }
  per_clip = [
    {
      'id': clips[row]['id'],
      'text': clips[row]['text'],
      **{kind: h[row] for kind, h in hypotheses.items() if row in h},
    }
    for row in rows
  ]
  return scores, per_clip, ''


def restore(config, workdir: epath.Path, step: int) -> checkpoint.TrainedRun:
  run = checkpoint.restore_trained(config, workdir, None if step < 0 else step)
  logging.info('restored %s at step %d', workdir, run.step)
  return run


def sampler_settings(config) -> dict:
  keys = (
    'num_points',
    'sway',
    'cfg_weight',
    'cfg_form',
    'prompt_seconds',
    'prompt_fraction',
    'seed',
  )
  return {**{k: config.sample[k] for k in keys}, 'noise_std': config.flow.noise_std}


def generate_and_vocode(config, run, rows, batch_size: int, real_kind: str):
  """Generates the clips `rows`; returns the generation, the vocoder, and waves {'generated',
  real_kind (the real mel through the same vocoder), and 'original' when any clip's original
  decodes (generation.has_original says which)}."""
  generation = generate(run, rows, config.sample, config.flow.noise_std)
  vocoder = open_vocoder(config.vocoder.checkpoint)
  clip_samples = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  waves = {
    kind: vocode(vocoder, mels, generation.num_samples, clip_samples, batch_size, f'vocode {kind}')
    for kind, mels in (('generated', generation.generated), (real_kind, generation.real))
  }
  original, generation.has_original = load_originals(
    config, generation.clips, config.data.clip_seconds
  )
  if generation.has_original.any():
    waves['original'] = zero_past(original, generation.num_samples)
  return generation, vocoder, waves


def run_eval(config, workdir: epath.Path) -> dict:
  """Generates config.eval.num_clips held-out clips and writes eval.json and a metrics.jsonl row.

  Returns the eval.json contents. Metric keys: mel_l1/<group>, fad/<embedding>/<group>,
  fad_original/…, fad_inf/…, wer/<generated|resynthesis|original>; groups are 'all' and domains.
  """
  workdir = files.as_path(workdir)
  run = restore(config, workdir, config.eval.step)
  batch_size = config.eval.batch_size
  clip_samples = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  rows = select_clips(run.heldout_source, config.eval.num_clips, clip_samples)
  generation, vocoder, waves = generate_and_vocode(config, run, rows, batch_size, 'resynthesis')
  num_samples = generation.num_samples

  groups = domain_groups(generation.domain, config.data.domains)
  per_clip_l1 = mel_l1(generation.real, generation.generated, num_samples, generation.prompt_frames)
  scores = {f'mel_l1/{group}': float(per_clip_l1[rows].mean()) for group, rows in groups.items()}
  embeddings = {
    label: {
      kind: utterance_embeddings(teacher, w, num_samples, batch_size) for kind, w in waves.items()
    }
    for label, teacher in embedding_teachers(config).items()
  }
  fad_values, fad_inf_fits = fad_scores(
    embeddings, groups, config.eval.fad_inf_points, generation.has_original
  )
  scores.update(fad_values)

  wer_values, transcripts, wer_skipped = speech_wer(
    config.eval.whisper_checkpoint,
    generation.clips,
    waves,
    num_samples,
    batch_size,
    generation.has_original,
  )
  scores.update(wer_values)
  if wer_skipped:
    logging.warning('WER skipped: %s', wer_skipped)

  report = {
    'step': run.step,
    'vocoder': vocoder.name,
    'sampler': sampler_settings(config),
    'metrics': scores,
    'counts': {group: len(rows) for group, rows in groups.items()}
    | {'wer': len(transcripts), 'with_original': int(generation.has_original.sum())},
    'clips_evaluated': (
      f'held-out clips whose whole audio fits in data.clip_seconds={config.data.clip_seconds:g} s '
      f'({int((run.heldout_source.arrays["num_samples"] <= clip_samples).sum())} of '
      f'{len(run.heldout_source)}): each is generated whole, so its transcript is the text of '
      'exactly the audio scored'
    ),
    'fad_real_reference': 'fad: real mels through the same vocoder; fad_original: original audio',
    'embeddings': list(embeddings),
    'fad_infinity': fad_inf_fits,
    'wer_skipped': wer_skipped,
    'transcripts': transcripts,
    'clip_ids': [clip['id'] for clip in generation.clips],
  }
  if jax.process_index() == 0:
    (workdir / 'eval.json').write_text(files.json_text(report, indent=2))
    writer = metrics.MetricWriter(workdir)
    writer.write(
      run.step,
      {f'eval/{k}': v for k, v in scores.items()} | {'eval/num_clips': len(generation.clips)},
    )
    writer.close()
  logging.info('eval at step %d: %s', run.step, json.dumps(scores))
  return report


def file_stem(clip_id: str) -> str:
  """A clip id as a file name (ids of directory sources hold slashes)."""
  return re.sub(r'[^A-Za-z0-9._-]', '_', clip_id)


def mel_color_range(
  reference: np.ndarray, generated: np.ndarray, audio_frames: int, percentiles=(0.5, 99.5)
) -> tuple[float, float]:
  """One color range for both (T, n_mels) mels: the given percentiles of their frames that hold
  audio, so that a loud clip keeps its detail and both panels read on the same scale."""
  values = np.concatenate([reference[:audio_frames].ravel(), generated[:audio_frames].ravel()])
  low, high = np.percentile(values, percentiles)
  return float(low), float(max(high, low + 1e-3))


def plot_mels(
  path: epath.Path,
  reference: np.ndarray,
  generated: np.ndarray,
  prompt_frames: int,
  audio_frames: int,
  title: str,
):
  """Reference and generated normalized mels side by side on one color scale; lines mark the
  prompt's end and the audio's."""
  vmin, vmax = mel_color_range(reference, generated, audio_frames)
  fig, axes = plt.subplots(1, 2, figsize=(12, 3), sharey=True)
  for ax, mel, name in zip(axes, (reference, generated), ('reference', 'generated')):
    image = ax.imshow(mel.T, origin='lower', aspect='auto', vmin=vmin, vmax=vmax, cmap='magma')
    ax.axvline(prompt_frames - 0.5, color='cyan', lw=1)
    ax.axvline(audio_frames - 0.5, color='white', lw=1, ls='--')
    ax.set_title(name)
    ax.set_xlabel('frame')
  axes[0].set_ylabel('mel band')
  fig.colorbar(image, ax=axes, fraction=0.03, label='normalized log-mel')
  fig.suptitle(title, fontsize=9)
  files.save_figure(fig, path, dpi=80, bbox_inches='tight')
  plt.close(fig)


def clip_captions(clips: list[dict]) -> list[str]:
  """Per clip what it should sound like: a speech clip's transcript, an audio clip's class labels
  (AudioSet display names, a folder's sub-folder), or ''."""
  captions = []
  for clip in clips:
    labels = ', '.join(clip.get('labels') or ())
    captions.append(clip.get('text') or (f'label: {labels}' if labels else ''))
  return captions


PAGE_STYLE = """body{font-family:sans-serif;margin:8px}
.clip{display:flex;gap:12px;align-items:flex-start;border-bottom:1px solid #ccc;padding:6px 0}
.info{flex:0 0 300px} .info audio{width:290px;display:block;margin:2px 0 6px}
.mels{flex:1 1 auto;min-width:0} .mels img{width:100%;height:auto}"""


def index_html(rows: list[dict], step: int, vocoder_name: str, settings: dict) -> str:
  """The listening page: per clip its transcript or class label, the audio players and the
  spectrogram image, laid out to fit a 1400-px window without sideways scrolling."""
  players = lambda row: ''.join(
    f'{kind}<br><audio controls preload="none" src="{html.escape(row[kind])}"></audio>'
    for kind in ('original', 'reference', 'generated')
    if row.get(kind)
  )
  body = '\n'.join(
    f'<div class="clip"><div class="info"><b>{html.escape(r["id"])}</b>'
    f' ({html.escape(r["domain"])}, prompt {r["prompt_seconds"]:.2f} s)<br>'
    f'<i>{html.escape(r["caption"])}</i><br>{players(r)}'
    f'</div><div class="mels"><img src="{html.escape(r["image"])}"></div></div>'
    for r in rows
  )
  settings_text = ', '.join(f'{k} {v}' for k, v in settings.items())
  return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>agrepa_jax samples, step {step}</title>
<style>{PAGE_STYLE}</style>
</head><body>
<h1>Samples at step {step}</h1>
<p>Vocoder: <b>{html.escape(vocoder_name)}</b>. Sampler: {html.escape(settings_text)}.</p>
<p>original: the clip's audio; reference: its real mel through the same vocoder; generated: the
model's mel from the clip's tokens and the reference prompt (left of the cyan line), vocoded.
Both mels of a clip share one color scale (0.5th to 99.5th percentile of their audio frames).</p>
{body}
</body></html>
"""


def run_sample(config, workdir: epath.Path) -> epath.Path:
  """Writes workdir/samples/: <id>_generated.wav, <id>_reference.wav (real mel, same vocoder),
  <id>_original.wav (when decodable), <id>.png and index.html. Returns that directory."""
  workdir = files.as_path(workdir)
  run = restore(config, workdir, config.sample.step)
  clip_samples = round(config.data.clip_seconds * audio.SAMPLE_RATE)
  rows = select_clips(
    run.heldout_source, config.sample.num_clips, clip_samples, config.sample.clip_list
  )
  generation, vocoder, waves = generate_and_vocode(
    config, run, rows, config.sample.batch_size, 'reference'
  )
  num_samples = generation.num_samples

  out = workdir / SAMPLES_DIR
  if jax.process_index() != 0:
    return out
  out.mkdir(parents=True, exist_ok=True)
  page_rows = []
  captions = clip_captions(generation.clips)
  for i, clip in enumerate(tqdm.tqdm(generation.clips, desc='write samples', unit='clip')):
    stem = file_stem(clip['id'])
    entry = {
      'id': clip['id'],
      'domain': clip['domain'],
      'caption': captions[i],
      'prompt_seconds': generation.prompt_frames[i] * audio.HOP_LENGTH / audio.SAMPLE_RATE,
      'image': f'{stem}.png',
    }
    for kind, w in waves.items():
      if kind == 'original' and not generation.has_original[i]:
        continue
      entry[kind] = f'{stem}_{kind}.wav'
      (out / entry[kind]).write_bytes(audio.wav_bytes(np.clip(w[i, : num_samples[i]], -1, 1)))
    plot_mels(
      out / entry['image'],
      generation.real[i],
      generation.generated[i],
      generation.prompt_frames[i],
      math.ceil(num_samples[i] / audio.HOP_LENGTH),
      f'{clip["id"]} ({clip["domain"]}) {captions[i]}',
    )
    page_rows.append(entry)
  (out / 'index.html').write_text(
    index_html(page_rows, run.step, vocoder.name, sampler_settings(config))
  )
  logging.info('wrote %d samples to %s (vocoder: %s)', len(page_rows), out, vocoder.name)
  return out
