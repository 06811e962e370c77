"""BEATs in JAX against a PyTorch reference with random weights, its fbank against
kaldi-native-fbank, and its checkpoint loader's errors."""

import re

import numpy as np
import pytest

torch = pytest.importorskip('torch')
knf = pytest.importorskip('kaldi_native_fbank')

import jax.numpy as jnp  # noqa: E402

from agrepa_jax.teachers import beats, fbank  # noqa: E402
from tests import beats_reference  # noqa: E402

SMALL_CFG = {  # official BEATsConfig fields; narrow and shallow, otherwise as BEATs iter3 AS2M
  'input_patch_size': 16,
  'embed_dim': 64,
  'conv_bias': False,
  'encoder_layers': 3,
  'encoder_embed_dim': 192,
  'encoder_ffn_embed_dim': 384,
  'encoder_attention_heads': 12,
  'activation_fn': 'gelu',
  'layer_norm_first': False,
  'deep_norm': True,
  'conv_pos': 128,
  'conv_pos_groups': 16,
  'relative_position_embedding': True,
  'num_buckets': 320,
  'max_distance': 800,
  'gru_rel_pos': True,
  'dropout': 0.0,
  'finetuned_model': True,
  'predictor_class': 527,
}


def make_wave(seconds: float, seed: int) -> np.ndarray:
  """A tone in noise with a stretch of exact silence, in [-1, 1]."""
  rng = np.random.default_rng(seed)
  t = np.arange(round(seconds * fbank.SAMPLE_RATE)) / fbank.SAMPLE_RATE
  wave = 0.3 * np.sin(2 * np.pi * (220 + 200 * seed) * t) + 0.05 * rng.standard_normal(t.size)
  wave[len(t) // 3 : len(t) // 3 + 1600] = 0.0
  return wave.astype(np.float32)


def relative_error(ours: np.ndarray, reference: np.ndarray) -> float:
  return float(np.abs(ours - reference).max() / np.abs(reference).max())


def knf_options(num_mel_bins: int):
  options = knf.FbankOptions()
  options.frame_opts.dither = 0.0
  options.frame_opts.samp_freq = fbank.SAMPLE_RATE
  options.mel_opts.num_bins = num_mel_bins
  return options


def knf_fbank(wave: np.ndarray, num_mel_bins: int) -> np.ndarray:
  extractor = knf.OnlineFbank(knf_options(num_mel_bins))
  extractor.accept_waveform(fbank.SAMPLE_RATE, wave.tolist())
  extractor.input_finished()
  return np.stack([extractor.get_frame(i) for i in range(extractor.num_frames_ready)])


def random_reference(cfg: dict, seed: int) -> 'beats_reference.BEATs':
  """Reference model with random weights, norms, biases, gates and weight-norm magnitudes."""
  torch.manual_seed(seed)
  model = beats_reference.BEATs(cfg).eval()
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name or name.endswith(('bias', 'grep_a', 'weight_g')):
        param.add_(0.1 * torch.randn_like(param))
  return model


def save_checkpoint(path, cfg: dict, model) -> str:
  torch.save({'cfg': cfg, 'model': model.state_dict()}, path)
  return str(path)


def fbank_tensor(audio: np.ndarray):
  return torch.from_numpy(np.array(fbank.beats_fbank(jnp.asarray(audio))))


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
  model = random_reference(SMALL_CFG, seed=0)
  return save_checkpoint(tmp_path_factory.mktemp('beats') / 'small.pt', SMALL_CFG, model), model


# ------------------------------------------------------------------------------------------ fbank


@pytest.mark.parametrize('num_mel_bins', [23, 80])
def test_kaldi_fbank_matches_kaldi_native_fbank(num_mel_bins):
  wave = make_wave(2.01, seed=num_mel_bins // 40) * fbank.WAVE_SCALE
  reference = knf_fbank(wave, num_mel_bins)
  ours = np.asarray(fbank.kaldi_fbank(jnp.asarray(wave), num_mel_bins))
  assert ours.shape == reference.shape == (fbank.num_fbank_frames(wave.size), num_mel_bins)
  # Log energies up to ~25; float32 FFTs differ in the last bits. Measured: 1.4e-4.
  np.testing.assert_allclose(ours, reference, atol=5e-4)


def test_mel_filters_match_kaldi_native_fbank():
  options = knf_options(80)
  reference = knf.MelBanks(options.mel_opts, options.frame_opts).get_matrix()  # (bins, fft bins)
  ours = fbank.kaldi_mel_filterbank(80).T
  np.testing.assert_allclose(ours[:, : reference.shape[1]], reference, atol=2e-5)
  assert not ours[:, reference.shape[1] :].any()


def test_beats_fbank_matches_transformers_kaldi_mode():
  """kaldi-native-fbank refuses BEATs' 128 bins (bin 3 holds no FFT bin; torchaudio, and so BEATs,
  keeps it all zero), so the 128-bin features are checked against transformers' kaldi mode."""
  with pytest.raises(ValueError, match='num_mel_bins'):
    knf.OnlineFbank(knf_options(128))
  audio_utils = pytest.importorskip('transformers.audio_utils')
  wave = make_wave(3.0, seed=1)
  with pytest.warns(UserWarning, match='all zero'):
    filters = audio_utils.mel_filter_bank(
      257, 128, 20, 8000, 16000, norm=None, mel_scale='kaldi', triangularize_in_mel_space=True
    )
  povey = audio_utils.window_function(400, 'hann', periodic=False) ** 0.85
  log_mel = audio_utils.spectrogram(
    wave * fbank.WAVE_SCALE,
    povey,
    frame_length=400,
    hop_length=160,
    fft_length=512,
    power=2.0,
    center=False,
    preemphasis=0.97,
    mel_filters=filters,
    log_mel='log',
    mel_floor=fbank.LOG_FLOOR,
    remove_dc_offset=True,
  ).T
  reference = (log_mel - 15.41663) / (2 * 6.55582)
  ours = np.asarray(fbank.beats_fbank(jnp.asarray(wave)))
  assert ours.shape == reference.shape == (298, 128)
  np.testing.assert_allclose(ours, reference, atol=5e-5)  # measured 1.6e-5
  np.testing.assert_allclose(ours[:, 3], (np.log(fbank.LOG_FLOOR) - 15.41663) / (2 * 6.55582))


# ------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize('max_distance', [800, 1280])
def test_relative_position_buckets_match_reference(max_distance):
  offsets = np.arange(-3000, 3001)
  reference = beats_reference.relative_position_bucket(torch.from_numpy(offsets), 320, max_distance)
  np.testing.assert_array_equal(
    beats.relative_position_bucket(offsets, 320, max_distance), reference.numpy()
  )


def test_encoder_matches_reference_at_every_layer(small_checkpoint):
  path, reference = small_checkpoint
  model = beats.load_beats(path)
  fbank_image = torch.randn(2, 300, 128, generator=torch.Generator().manual_seed(1))
  for output_layer in (None, 0, 1, 2, 3):
    with torch.no_grad():
      if output_layer == 0:  # the layers' input: the official encoder has no layer index for it
        x = reference.layer_norm(
          reference.patch_embedding(fbank_image.unsqueeze(1)).flatten(2).transpose(1, 2)
        )
        x = reference.post_extract_proj(x)
        encoder = reference.encoder
        expected = encoder.layer_norm(x + encoder.pos_conv(x.transpose(1, 2)).transpose(1, 2))
      else:
        tgt_layer = None if output_layer is None else output_layer - 1
        expected = reference.extract_features(fbank_image, tgt_layer)
    ours = np.asarray(model(jnp.asarray(fbank_image.numpy()), output_layer=output_layer))
    assert ours.shape == (2, 18 * 8, 192)
    assert relative_error(ours, expected.numpy()) < 1e-5, output_layer  # measured ~4e-7


def test_self_supervised_checkpoint_with_parametrized_weight_norm(tmp_path):
  """No predictor, no projection (embed_dim == encoder_embed_dim), a patch bias, no deep norm, and
  the torch.nn.utils.parametrizations names for the positional convolution's weight norm."""
  cfg = SMALL_CFG | {
    'embed_dim': 192,
    'conv_bias': True,
    'encoder_layers': 2,
    'deep_norm': False,
    'finetuned_model': False,
  }
  reference = random_reference(cfg, seed=2)
  renames = {
    'weight_g': 'parametrizations.weight.original0',
    'weight_v': 'parametrizations.weight.original1',
  }
  state_dict = {}
  for name, tensor in reference.state_dict().items():
    prefix, _, leaf = name.rpartition('.')
    state_dict[f'{prefix}.{renames[leaf]}' if leaf in renames else name] = tensor
  path = tmp_path / 'ssl.pt'
  torch.save({'cfg': cfg, 'model': state_dict}, path)
  model = beats.load_beats(str(path))
  assert model.post_extract_proj is None
  fbank_image = torch.randn(1, 260, 128, generator=torch.Generator().manual_seed(3))
  with torch.no_grad():
    expected = reference.extract_features(fbank_image).numpy()
  ours = np.asarray(model(jnp.asarray(fbank_image.numpy())))
  assert relative_error(ours, expected) < 1e-5


def test_teacher_matches_reference_on_each_clip_of_a_padded_batch(small_checkpoint):
  path, reference = small_checkpoint
  teacher = beats.load_beats_teacher(path)
  assert teacher.spec == beats.TeacherSpec('beats', 192, 16000, 6.25)
  lengths = np.array([48000, 30000])
  audio = np.zeros((2, 48000), np.float32)
  for row, length in enumerate(lengths):
    audio[row, :length] = make_wave(length / 16000, seed=row)
  features, mask = teacher.features(audio, lengths)
  # 48000 samples: 298 fbank frames, 18 time steps; 30000: 186 frames, 11 whole steps.
  assert features.shape == (2, 18, 192) and features.dtype == np.float32
  np.testing.assert_array_equal(mask.sum(1), [18, 11])
  assert mask[:, 0].all() and not mask[1, 11:].any()
  for row, length in enumerate(lengths):
    with torch.no_grad():
      tokens = reference.extract_features(fbank_tensor(audio[row : row + 1, :length])).numpy()
    expected = tokens.reshape(1, -1, 8, 192).mean(2)[0]
    assert relative_error(features[row, mask[row]], expected) < 1e-5  # measured ~4e-7


def test_teacher_layer_choice_and_short_audio(small_checkpoint):
  path, reference = small_checkpoint
  audio = make_wave(1.0, seed=3)[None]
  first_layer, _ = beats.load_beats_teacher(path, output_layer=1).features(audio, np.array([16000]))
  with torch.no_grad():
    tokens = reference.extract_features(fbank_tensor(audio), tgt_layer=0).numpy()
  assert relative_error(first_layer, tokens.reshape(1, -1, 8, 192).mean(2)) < 1e-5
  with pytest.raises(ValueError, match='output_layer 4 outside 0..3'):
    beats.load_beats_teacher(path, output_layer=4)
  with pytest.raises(ValueError, match='at least one patch'):
    beats.load_beats_teacher(path).features(audio[:, :2799], np.array([2799]))


# ------------------------------------------------------------------------------------------ loader


def test_loader_names_the_path_and_format_on_bad_files(small_checkpoint, tmp_path):
  missing = tmp_path / 'missing.pt'
  with pytest.raises(
    FileNotFoundError, match=re.escape(f'{missing}: no such file; expected an official BEATs')
  ):
    beats.load_beats(str(missing))

  truncated = tmp_path / 'truncated.pt'
  with open(small_checkpoint[0], 'rb') as source:
    truncated.write_bytes(source.read()[:5000])
  message = re.escape(f'{truncated}: cannot read as a torch checkpoint (')
  with pytest.raises(
    beats.BeatsCheckpointError, match=message + r'.*\); expected an official BEATs \.pt checkpoint'
  ):
    beats.load_beats(str(truncated))

  whisper = tmp_path / 'whisper.pt'  # the layout of openai-whisper's checkpoints
  torch.save(
    {
      'dims': {'n_mels': 80, 'n_audio_state': 384},
      'model_state_dict': {'encoder.conv1.weight': torch.zeros(384, 80, 3)},
    },
    whisper,
  )
  with pytest.raises(
    beats.BeatsCheckpointError,
    match=re.escape(
      f"{whisper}: not a BEATs checkpoint (top-level keys ['dims', 'model_state_dict'])"
    ),
  ):
    beats.load_beats(str(whisper))

  bare_state_dict = tmp_path / 'pytorch_model.bin'  # transformers' layout: a bare state_dict
  torch.save(
    {f'model.layers.{i}.fc1.weight': torch.zeros(2, 2) for i in range(32)}, bare_state_dict
  )
  with pytest.raises(
    beats.BeatsCheckpointError,
    match=re.escape(
      f'{bare_state_dict}: not a BEATs checkpoint (32 top-level keys, first '
      "['model.layers.0.fc1.weight', 'model.layers.1.fc1.weight', 'model.layers.10.fc1.weight'])"
    ),
  ):
    beats.load_beats(str(bare_state_dict))


def test_loader_rejects_mismatched_state_dicts_and_unsupported_settings(tmp_path):
  reference = random_reference(SMALL_CFG, seed=4)
  wrong_depth = tmp_path / 'depth.pt'
  save_checkpoint(wrong_depth, SMALL_CFG | {'encoder_layers': 4}, reference)
  with pytest.raises(
    beats.BeatsCheckpointError, match=r'19 missing \(e\.g\. \[.encoder\.layers\.3\.'
  ):
    beats.load_beats(str(wrong_depth))

  wrong_width = tmp_path / 'width.pt'
  save_checkpoint(wrong_width, SMALL_CFG | {'encoder_ffn_embed_dim': 512}, reference)
  with pytest.raises(
    beats.BeatsCheckpointError,
    match=r'fc1/bias has shape \(3, 384\), the cfg '
    r'implies \(3, 512\)',
  ):
    beats.load_beats(str(wrong_width))

  pre_ln = tmp_path / 'pre_ln.pt'
  save_checkpoint(pre_ln, SMALL_CFG | {'layer_norm_first': True}, reference)
  with pytest.raises(
    beats.BeatsCheckpointError, match='unsupported BEATs setting layer_norm_first=True'
  ):
    beats.load_beats(str(pre_ln))


def test_full_width_encoder_matches_reference_on_ten_seconds(tmp_path):
  cfg = SMALL_CFG | {
    'embed_dim': 512,
    'encoder_embed_dim': 768,
    'encoder_ffn_embed_dim': 3072,
    'encoder_layers': 2,
  }
  reference = random_reference(cfg, seed=5)
  model = beats.load_beats(save_checkpoint(tmp_path / 'wide.pt', cfg, reference))
  fbank_image = fbank_tensor(make_wave(10.0, seed=5)[None])  # 998 frames, 62 time steps
  with torch.no_grad():
    expected = reference.extract_features(fbank_image).numpy()
  ours = np.asarray(model(jnp.asarray(fbank_image.numpy())))
  assert ours.shape == (1, 62 * 8, 768)
  assert relative_error(ours, expected) < 1e-5
