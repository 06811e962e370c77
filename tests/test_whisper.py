"""Whisper teacher: CTranslate2 reader, front end, encoder vs CTranslate2, loaders, Teacher API."""

import copy
import dataclasses
import importlib.util
import json
import os
import shutil
import struct
import sys

import librosa
import numpy as np
import pytest

from agrepa_jax.teachers import base, bundled_whisper_tiny_en, ct2, load_teacher, whisper

TINY_EN = bundled_whisper_tiny_en()


def synthetic_utterance(seconds: float, seed: int = 0) -> np.ndarray:
  """Deterministic speech-like 16 kHz signal: a gliding harmonic tone in syllable bursts + noise."""
  rng = np.random.default_rng(seed)
  t = np.arange(round(seconds * whisper.SAMPLE_RATE)) / whisper.SAMPLE_RATE
  pitch_phase = 2 * np.pi * (120 * t + 15 * np.sin(2 * np.pi * 0.7 * t))
  voiced = sum(np.sin(k * pitch_phase) / k for k in range(1, 12))
  syllables = np.clip(np.sin(2 * np.pi * 3.1 * t + seed), 0, None) ** 2
  wave = 0.2 * voiced * syllables + 0.01 * rng.standard_normal(t.size)
  return wave.astype(np.float32)


def write_ct2_file(path, spec_name: str, variables: dict, aliases: dict = (), version: int = 6):
  """Writes a CTranslate2 model.bin by its published layout (dtype ids f32 0 i8 1 i16 2 f16 4)."""
  type_ids = {
    np.dtype('float32'): 0,
    np.dtype('int8'): 1,
    np.dtype('int16'): 2,
    np.dtype('int32'): 3,
    np.dtype('float16'): 4,
  }

  def string(text):
    return struct.pack('<H', len(text) + 1) + text.encode() + b'\0'

  out = struct.pack('<I', version) + string(spec_name) + struct.pack('<II', 1, len(variables))
  for name, value in variables.items():
    value = np.asarray(value)
    out += string(name) + struct.pack('<B', value.ndim)
    out += b''.join(struct.pack('<I', d) for d in value.shape)
    out += struct.pack('<BI', type_ids[value.dtype], value.nbytes) + value.tobytes()
  out += struct.pack('<I', len(aliases)) + b''.join(
    string(a) + string(t) for a, t in dict(aliases).items()
  )
  with open(path, 'wb') as f:
    f.write(out)


@pytest.fixture(scope='module')
def tiny_encoder():
  return whisper.load_whisper_encoder(TINY_EN)


# --- CTranslate2 reader ---------------------------------------------------------------------------


def test_ct2_reader_parses_every_dtype_and_alias(tmp_path):
  weights = np.arange(6, dtype=np.float16).reshape(2, 3) / 4
  write_ct2_file(
    tmp_path / 'model.bin',
    'ToySpec',
    {
      'w': weights,
      'heads': np.int16(6),
      'flag': np.int8(-1),
      'bias': np.array([1.5, -2.25], np.float32),
    },
    aliases={'w_alias': 'w'},
  )
  model = ct2.read_ct2_model(tmp_path)
  assert (model.spec_name, model.spec_revision) == ('ToySpec', 1)
  assert model['w'].dtype == np.float32 and model['w'].tolist() == [[0, 0.25, 0.5], [0.75, 1, 1.25]]
  assert model['w_alias'] is model['w']
  assert model['heads'].dtype == np.int16 and int(model['heads']) == 6
  assert int(model['flag']) == -1
  assert model['bias'].tolist() == [1.5, -2.25]
  assert ct2.read_ct2_model(tmp_path, as_float32=False)['w'].dtype == np.float16


def test_ct2_reader_reads_bfloat16_bits():
  bits = np.array([0x3F80, 0xC040, 0x0000], np.uint16)  # 1.0, -3.0, 0.0
  assert ct2.bfloat16_to_float32(bits).tolist() == [1.0, -3.0, 0.0]


def test_ct2_reader_on_bundled_tiny_en():
  model = ct2.read_ct2_model(os.path.join(TINY_EN, 'model.bin'))
  assert (model.spec_name, model.spec_revision) == ('WhisperSpec', 3)
  assert len(model.variables) == 149  # 148 stored + the projection alias of the embeddings
  assert model['decoder/projection/weight'] is model['decoder/embeddings/weight']
  assert model['encoder/conv1/weight'].shape == (384, 80, 3)
  assert model['encoder/layer_3/self_attention/linear_0/weight'].shape == (1152, 384)
  assert model['encoder/conv1/bias'][:2].tolist() == pytest.approx([0.33935547, -0.6479492])


def test_ct2_reader_rejects_truncated_and_foreign_files(tmp_path):
  write_ct2_file(tmp_path / 'model.bin', 'ToySpec', {'w': np.ones((4, 4), np.float32)})
  data = (tmp_path / 'model.bin').read_bytes()
  (tmp_path / 'model.bin').write_bytes(data[:-20])
  with pytest.raises(ct2.CT2FormatError, match='truncated'):
    ct2.read_ct2_model(tmp_path)
  (tmp_path / 'model.bin').write_bytes(b'PK\x03\x04' + data[4:])
  with pytest.raises(ct2.CT2FormatError, match='supported binary version'):
    ct2.read_ct2_model(tmp_path)


# --- Front end ------------------------------------------------------------------------------------


def reference_log_mel(audio: np.ndarray, n_mels: int) -> np.ndarray:
  """Whisper's log_mel_spectrogram recomputed in float64 with librosa."""
  spectrum = librosa.stft(
    audio.astype(np.float64),
    n_fft=400,
    hop_length=160,
    window='hann',
    center=True,
    pad_mode='reflect',
  )
  power = np.abs(spectrum[:, :-1]) ** 2
  filters = librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels, dtype=np.float64)
  log_mel = np.log10(np.maximum(filters @ power, 1e-10))
  return (np.maximum(log_mel, log_mel.max() - 8.0) + 4.0) / 4.0


@pytest.mark.parametrize('n_mels', [80, 128])
def test_log_mel_matches_librosa_reference(n_mels):
  half_silent = 0.1 * synthetic_utterance(2.0, seed=2)
  half_silent[16000:] = 0.0
  audio = np.stack([synthetic_utterance(2.0, seed=1), half_silent])
  log_mel = np.asarray(whisper.whisper_log_mel(audio, n_mels))
  assert log_mel.shape == (2, n_mels, 200)
  for example, wave in zip(log_mel, audio):
    reference = reference_log_mel(wave, n_mels)
    assert np.abs(example - reference).max() < 2e-5
  # Silence is clamped to 8 decades (2.0 after scaling) below its own example's maximum.
  assert log_mel[1].max() - log_mel[1].min() == pytest.approx(2.0, abs=1e-6)


# --- Encoder against CTranslate2 ------------------------------------------------------------------


@pytest.mark.parametrize('mel_frames', [3000, 1000])
def test_encoder_matches_ctranslate2(tiny_encoder, mel_frames):
  ctranslate2 = pytest.importorskip('ctranslate2')
  audio = synthetic_utterance(30.0)
  audio[12 * 16000 :] = 0.0  # 12 s of "speech" in the 30 s window, as Whisper usually sees it
  log_mel = np.asarray(whisper.whisper_log_mel(audio[None], 80))[:, :, :mel_frames].copy()
  reference_model = ctranslate2.models.Whisper(TINY_EN, device='cpu', compute_type='float32')
  reference = np.asarray(
    reference_model.encode(ctranslate2.StorageView.from_array(log_mel), to_cpu=True)
  )
  ours = np.asarray(tiny_encoder(log_mel))
  assert ours.shape == reference.shape == (1, mel_frames // 2, 384)
  error = np.abs(ours - reference)
  # Measured: max 2.6e-5 (3000 frames) and 2.0e-4 (1000 frames) on features whose max is ~10-12
  # and std ~1.06; mean 1.3e-6 and 1.7e-6.
  assert error.max() < 5e-5 * np.abs(reference).max()
  assert error.mean() < 5e-6


# --- Loader errors --------------------------------------------------------------------------------


def test_loader_error_for_missing_path(tmp_path):
  with pytest.raises(whisper.WhisperCheckpointError, match='no such file.*CTranslate2'):
    whisper.load_whisper_encoder(tmp_path / 'absent')


def test_loader_error_for_truncated_model_bin(tmp_path):
  shutil.copy(os.path.join(TINY_EN, 'config.json'), tmp_path)
  with open(os.path.join(TINY_EN, 'model.bin'), 'rb') as f:
    (tmp_path / 'model.bin').write_bytes(f.read(1_000_000))
  with pytest.raises(whisper.WhisperCheckpointError, match=f'{tmp_path}.*truncated'):
    whisper.load_whisper_encoder(tmp_path)


def test_loader_error_for_another_model(tmp_path):
  (tmp_path / 'config.json').write_text('{}')
  write_ct2_file(tmp_path / 'model.bin', 'TransformerSpec', {'w': np.ones(3, np.float32)})
  with pytest.raises(
    whisper.WhisperCheckpointError, match='TransformerSpec, expected a WhisperSpec'
  ):
    whisper.load_whisper_encoder(tmp_path)


def test_loader_error_for_unrecognized_directory(tmp_path):
  (tmp_path / 'weights.npz').write_bytes(b'')
  with pytest.raises(whisper.WhisperCheckpointError, match='not a recognized Whisper checkpoint'):
    whisper.load_whisper_encoder(tmp_path)


# --- Teacher --------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def tiny_teacher(tiny_encoder):
  return whisper.WhisperTeacher(tiny_encoder)


def test_registry_loads_bundled_whisper_and_rejects_unknown_names():
  teacher = load_teacher('whisper')
  assert teacher.spec == base.TeacherSpec('whisper-tiny.en', 384, 16000, 50.0, max_seconds=30.0)
  with pytest.raises(ValueError, match="unknown teacher 'hubert'.*beats, whisper"):
    load_teacher('hubert')


def test_teacher_shapes_and_mask(tiny_teacher):
  audio = np.zeros((2, 16000), np.float32)
  audio[0] = synthetic_utterance(1.0)
  audio[1, :8000] = synthetic_utterance(0.5, seed=3)
  frames, mask = tiny_teacher.features(audio, np.array([16000, 8000]))
  assert frames.shape == (2, 50, 384) and frames.dtype == np.float32
  assert mask.sum(1).tolist() == [50, 25]
  # A clip of 8001 samples reaches one sample into frame 25.
  assert whisper.encoder_frames_with_audio(np.array([8001, 319, 0]), 50).sum(1).tolist() == [
    26,
    1,
    0,
  ]


def test_teacher_features_equal_encoder_on_log_mel(tiny_encoder, tiny_teacher):
  audio = synthetic_utterance(1.0)[None]
  frames, _ = tiny_teacher.features(audio, np.array([16000]))
  direct = np.asarray(tiny_encoder(whisper.whisper_log_mel(audio, 80)))
  np.testing.assert_allclose(frames, direct, atol=1e-4)


def test_teacher_pads_odd_lengths_and_reuses_compilation(tiny_teacher):
  audio = synthetic_utterance(0.7)[None]  # 11200 samples = 35 encoder frames exactly
  frames, mask = tiny_teacher.features(audio[:, :11000], np.array([11000]))
  assert frames.shape == (1, 35, 384) and mask.sum() == 35
  compiled = whisper.encode_audio._cache_size()
  tiny_teacher.features(audio[:, :11100], np.array([11100]))
  assert whisper.encode_audio._cache_size() == compiled


def utterance_mean(teacher, clip: np.ndarray, padded_length: int) -> np.ndarray:
  audio = np.zeros((1, padded_length), np.float32)
  audio[0, : clip.size] = clip
  frames, mask = teacher.features(audio, np.array([clip.size]))
  assert mask.sum() == -(-clip.size // 320) and frames.shape[1] == -(-padded_length // 320)
  return base.masked_mean(frames, mask)[0]


def cosine(a, b):
  return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


def test_zero_padding_barely_moves_the_utterance_mean(tiny_encoder, tiny_teacher):
  clip = synthetic_utterance(3.0, seed=4)
  alone = utterance_mean(tiny_teacher, clip, clip.size)
  padded = utterance_mean(tiny_teacher, clip, 5 * 16000)
  # Measured: cosine 0.999997, relative distance 0.0024 (the last frame's STFT sees zeros, not a
  # reflection). A different clip is at relative distance 0.16.
  assert cosine(alone, padded) > 0.99999
  assert np.linalg.norm(alone - padded) < 0.01 * np.linalg.norm(alone)
  # Whisper itself does not mask attention: the same padding then moves the mean a lot (0.989).
  unmasked = whisper.WhisperTeacher(tiny_encoder, mask_padding=False)
  assert (
    cosine(utterance_mean(unmasked, clip, clip.size), utterance_mean(unmasked, clip, 5 * 16000))
    < 0.995
  )


def test_teacher_in_30s_window_is_whisper_on_padded_audio(tiny_encoder):
  teacher = whisper.WhisperTeacher(tiny_encoder, pad_to_30s=True)
  clip = synthetic_utterance(2.0)
  frames, mask = teacher.features(clip[None], np.array([clip.size]))
  assert frames.shape == (1, 1500, 384) and mask.sum() == 100
  window = np.zeros((1, 30 * 16000), np.float32)
  window[0, : clip.size] = clip
  direct = np.asarray(tiny_encoder(whisper.whisper_log_mel(window, 80)))
  np.testing.assert_allclose(frames, direct, atol=1e-4)
  with pytest.raises(ValueError, match='exceed the Whisper window'):
    teacher.features(np.zeros((1, 30 * 16000 + 1), np.float32), np.array([1]))


def test_registry_beats_entry_needs_its_module_and_a_checkpoint():
  if importlib.util.find_spec('agrepa_jax.teachers.beats') is None:
    with pytest.raises(ValueError, match='beats.py is missing'):
      load_teacher('beats', '/nonexistent/beats.pt')
  else:
    with pytest.raises(ValueError, match="'beats' needs a checkpoint"):
      load_teacher('beats')


# --- Front end against transformers ---


@pytest.mark.parametrize('n_mels', [80, 128])
def test_log_mel_matches_transformers_feature_extractor(n_mels):
  transformers = pytest.importorskip('transformers')
  clip = synthetic_utterance(5.0, seed=5)
  extractor = transformers.WhisperFeatureExtractor(feature_size=n_mels)
  reference = extractor(clip, sampling_rate=16000, return_tensors='np')['input_features']
  window = np.zeros((1, 30 * 16000), np.float32)
  window[0, : clip.size] = clip
  ours = np.asarray(whisper.whisper_log_mel(window, n_mels))
  assert ours.shape == reference.shape == (1, n_mels, 3000)
  # Values span about -0.7 to 1.3. Measured max difference with jax 0.10.2: 80 mels 2.7e-6,
  # 128 mels 3.0e-5, the same with transformers 4.45.2, 4.57.6, 5.20.2, 5.23.0, 5.24.0 and 5.25.0
  # (pinned in the test extra); an earlier jax gave 5.2e-6 for both. The spread comes from the
  # float32 FFT, not the reference.
  assert np.abs(ours - reference).max() < 4e-5


# --- Encoder against transformers, and the openai / Hugging Face loaders ---

# (Hugging Face name inside the encoder, openai-whisper name) for the parameters of block i.
HF_OPENAI_BLOCK_NAMES = [
  ('self_attn_layer_norm.weight', 'attn_ln.weight'),
  ('self_attn_layer_norm.bias', 'attn_ln.bias'),
  ('self_attn.q_proj.weight', 'attn.query.weight'),
  ('self_attn.q_proj.bias', 'attn.query.bias'),
  ('self_attn.k_proj.weight', 'attn.key.weight'),
  ('self_attn.v_proj.weight', 'attn.value.weight'),
  ('self_attn.v_proj.bias', 'attn.value.bias'),
  ('self_attn.out_proj.weight', 'attn.out.weight'),
  ('self_attn.out_proj.bias', 'attn.out.bias'),
  ('final_layer_norm.weight', 'mlp_ln.weight'),
  ('final_layer_norm.bias', 'mlp_ln.bias'),
  ('fc1.weight', 'mlp.0.weight'),
  ('fc1.bias', 'mlp.0.bias'),
  ('fc2.weight', 'mlp.2.weight'),
  ('fc2.bias', 'mlp.2.bias'),
]
HF_OPENAI_TOP_NAMES = [
  ('conv1.weight', 'conv1.weight'),
  ('conv1.bias', 'conv1.bias'),
  ('conv2.weight', 'conv2.weight'),
  ('conv2.bias', 'conv2.bias'),
  ('embed_positions.weight', 'positional_embedding'),
  ('layer_norm.weight', 'ln_post.weight'),
  ('layer_norm.bias', 'ln_post.bias'),
]


def hf_openai_name_pairs(num_layers: int):
  return HF_OPENAI_TOP_NAMES + [
    (f'layers.{i}.{hf}', f'blocks.{i}.{openai}')
    for i in range(num_layers)
    for hf, openai in HF_OPENAI_BLOCK_NAMES
  ]


def hf_whisper_config(transformers, dims: whisper.WhisperDims):
  return transformers.WhisperConfig(
    num_mel_bins=dims.n_mels,
    max_source_positions=dims.n_audio_ctx,
    d_model=dims.n_audio_state,
    encoder_attention_heads=dims.n_audio_head,
    encoder_layers=dims.n_audio_layer,
    encoder_ffn_dim=4 * dims.n_audio_state,
    vocab_size=dims.n_vocab,
    max_target_positions=dims.n_text_ctx,
    decoder_attention_heads=dims.n_text_head,
    decoder_layers=dims.n_text_layer,
    decoder_ffn_dim=4 * dims.n_audio_state,
    activation_function='gelu',
  )


def hf_encoder_output(hf_encoder, log_mel: np.ndarray) -> np.ndarray:
  import torch

  dtype = next(hf_encoder.parameters()).dtype
  with torch.no_grad():
    return (
      hf_encoder(torch.from_numpy(np.array(log_mel)).to(dtype)).last_hidden_state.float().numpy()
    )


def relative_l2(a: np.ndarray, reference: np.ndarray) -> float:
  return float(np.linalg.norm(a - reference) / np.linalg.norm(reference))


@pytest.mark.slow
def test_encoder_matches_transformers_with_tiny_en_weights(tiny_encoder):
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  from transformers.models.whisper import modeling_whisper

  dims, openai_params = whisper.read_ct2_whisper(TINY_EN)
  # The reference runs in float64, so the comparison measures our float32 rounding alone.
  hf_encoder = (
    modeling_whisper.WhisperEncoder(hf_whisper_config(transformers, dims)).eval().double()
  )
  hf_encoder.load_state_dict(
    {
      hf: torch.from_numpy(openai_params[openai].astype(np.float64))
      for hf, openai in hf_openai_name_pairs(dims.n_audio_layer)
    }
  )
  audio = synthetic_utterance(30.0, seed=6)
  audio[10 * 16000 :] = 0.0
  log_mel = np.asarray(whisper.whisper_log_mel(audio[None], 80))
  reference = hf_encoder_output(hf_encoder, log_mel)
  ours = np.asarray(tiny_encoder(log_mel))
  # Measured: relative L2 1.3e-6, max 2.7e-4 on values up to 12 (transformers itself in float32:
  # 1.5e-6 and 5.5e-4; CTranslate2 in float32: 2.0e-6 and 5.7e-5).
  assert relative_l2(ours, reference) < 5e-6
  assert np.abs(ours - reference).max() < 5e-5 * np.abs(reference).max()


NARROW_LARGE_V3 = whisper.WhisperDims(
  n_mels=128,
  n_audio_ctx=200,
  n_audio_state=64,
  n_audio_head=4,
  n_audio_layer=4,
  n_vocab=51866,
  n_text_ctx=32,
  n_text_state=64,
  n_text_head=4,
  n_text_layer=2,
)


@pytest.fixture(scope='module')
def narrow_checkpoints(tmp_path_factory):
  """A random large-v3-shaped (128 mels, 51866 tokens) narrow Whisper saved in every format."""
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  model = transformers.WhisperForConditionalGeneration(
    hf_whisper_config(transformers, NARROW_LARGE_V3)
  )
  with torch.no_grad():  # break the zero-bias, unit-scale init so every parameter is exercised
    for parameter in model.model.encoder.parameters():
      parameter.add_(0.05 * torch.randn_like(parameter))
  model.eval()
  root = tmp_path_factory.mktemp('narrow')
  model.save_pretrained(root / 'hf_safetensors')
  (root / 'hf_bin').mkdir()
  model.config.save_pretrained(root / 'hf_bin')
  torch.save(model.state_dict(), root / 'hf_bin' / 'pytorch_model.bin')
  encoder_state = model.model.encoder.state_dict()
  openai_state = {
    f'encoder.{openai}': encoder_state[hf].half()
    for hf, openai in hf_openai_name_pairs(NARROW_LARGE_V3.n_audio_layer)
  }
  openai_state['decoder.token_embedding.weight'] = torch.zeros(51866, 64, dtype=torch.float16)
  torch.save(
    {'dims': dataclasses.asdict(NARROW_LARGE_V3), 'model_state_dict': openai_state},
    root / 'narrow.pt',
  )
  return root, model.model.encoder


@pytest.mark.parametrize('checkpoint', ['hf_safetensors', 'hf_bin', 'narrow.pt'])
def test_loaders_match_transformers_on_narrow_large_v3(narrow_checkpoints, checkpoint):
  root, hf_encoder = narrow_checkpoints
  assert whisper.checkpoint_format(str(root / checkpoint)) == (
    'openai' if checkpoint.endswith('.pt') else 'hf'
  )
  encoder = whisper.load_whisper_encoder(root / checkpoint)
  assert encoder.dims == NARROW_LARGE_V3
  audio = synthetic_utterance(4.0, seed=7)
  log_mel = np.asarray(whisper.whisper_log_mel(audio[None], 128))
  assert log_mel.shape == (1, 128, 400)
  reference = hf_encoder_output(hf_encoder, log_mel)
  if checkpoint.endswith('.pt'):  # openai checkpoints are float16, like the official ones
    hf_encoder_half = copy.deepcopy(hf_encoder).half().float()
    reference = hf_encoder_output(hf_encoder_half, log_mel)
  ours = np.asarray(encoder(log_mel))
  # Measured for all three: relative L2 2.7e-7, max 1.2e-6 on values up to 3.3.
  assert relative_l2(ours, reference) < 1e-6
  assert np.abs(ours - reference).max() < 1e-5 * np.abs(reference).max()


def test_openai_loader_needs_torch(tmp_path, monkeypatch):
  (tmp_path / 'model.pt').write_bytes(b'not a pickle')
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(whisper.WhisperCheckpointError, match='needs PyTorch.*torch==2.13.0'):
    whisper.load_whisper_encoder(tmp_path / 'model.pt')


def test_openai_loader_rejects_other_pickles(tmp_path):
  torch = pytest.importorskip('torch')
  torch.save({'state_dict': {}}, tmp_path / 'other.pt')
  with pytest.raises(
    whisper.WhisperCheckpointError, match='other.pt: not an openai-whisper checkpoint'
  ):
    whisper.load_whisper_encoder(tmp_path / 'other.pt')
  (tmp_path / 'garbage.pt').write_bytes(b'\x00' * 100)
  with pytest.raises(
    whisper.WhisperCheckpointError, match='garbage.pt: cannot be read as an openai'
  ):
    whisper.load_whisper_encoder(tmp_path / 'garbage.pt')


def test_hf_loader_rejects_other_models_and_truncated_weights(tmp_path, narrow_checkpoints):
  root, _ = narrow_checkpoints
  (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'wav2vec2'}))
  (tmp_path / 'model.safetensors').write_bytes(b'')
  with pytest.raises(
    whisper.WhisperCheckpointError, match="model_type 'wav2vec2', expected 'whisper'"
  ):
    whisper.load_whisper_encoder(tmp_path)
  shutil.copy(root / 'hf_safetensors' / 'config.json', tmp_path)
  data = (root / 'hf_safetensors' / 'model.safetensors').read_bytes()
  (tmp_path / 'model.safetensors').write_bytes(data[: len(data) // 2])
  with pytest.raises(
    whisper.WhisperCheckpointError, match='model.safetensors: cannot read safetensors'
  ):
    whisper.load_whisper_encoder(tmp_path)


def test_loader_reports_missing_and_misshapen_parameters():
  dims, params = whisper.read_ct2_whisper(TINY_EN)
  incomplete = {name: value for name, value in params.items() if name != 'blocks.2.mlp.0.bias'}
  with pytest.raises(
    whisper.WhisperCheckpointError, match=r"src: .*missing: \['blocks.2.mlp.0.bias'\]"
  ):
    whisper.encoder_from_openai_params(dims, incomplete, source='src')
  shorter_context = dataclasses.replace(dims, n_audio_ctx=1000)
  with pytest.raises(
    whisper.WhisperCheckpointError, match=r'positional_embedding.*\(1500, 384\).*\(1000, 384\)'
  ):
    whisper.encoder_from_openai_params(shorter_context, params, source='src')
