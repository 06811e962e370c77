"""The JAX Vocos against a PyTorch reference through an official-layout checkpoint, its ISTFT, the
Griffin-Lim fallback and the loader's errors."""

import pathlib
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from agrepa_jax import audio
from agrepa_jax.generation import vocos

torch = pytest.importorskip('torch')
from tests import vocos_reference  # noqa: E402  (needs torch)

SMALL = dict(
  input_channels=100, dim=64, intermediate_dim=96, num_layers=3, n_fft=1024, hop_length=256
)
MEL_24KHZ = dict(
  input_channels=100, dim=512, intermediate_dim=1536, num_layers=8, n_fft=1024, hop_length=256
)


def official_config(input_channels, dim, intermediate_dim, num_layers, n_fft, hop_length):
  """config.yaml contents in the layout of the published Vocos checkpoints."""
  return {
    'feature_extractor': {
      'class_path': 'vocos.feature_extractors.MelSpectrogramFeatures',
      'init_args': {
        'sample_rate': 24000,
        'n_fft': n_fft,
        'hop_length': hop_length,
        'n_mels': input_channels,
        'padding': 'center',
      },
    },
    'backbone': {
      'class_path': 'vocos.models.VocosBackbone',
      'init_args': {
        'input_channels': input_channels,
        'dim': dim,
        'intermediate_dim': intermediate_dim,
        'num_layers': num_layers,
      },
    },
    'head': {
      'class_path': 'vocos.heads.ISTFTHead',
      'init_args': {'dim': dim, 'n_fft': n_fft, 'hop_length': hop_length, 'padding': 'same'},
    },
  }


def random_reference(seed: int, **sizes) -> vocos_reference.Vocos:
  """A reference Vocos with every parameter random (norms and gammas too, so a wrong mapping shows)
  and log-magnitude biases from -4 to 5, so that the highest bins exceed the clip at exp(4.6)."""
  torch.manual_seed(seed)
  model = vocos_reference.Vocos(**sizes)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if 'norm' in name and name.endswith('weight'):
        param.copy_(1 + 0.2 * torch.randn_like(param))
      elif name.endswith('gamma'):
        param.copy_(0.3 * torch.randn_like(param))
      elif name.endswith('bias'):
        param.copy_(0.1 * torch.randn_like(param))
    num_bins = sizes['n_fft'] // 2 + 1
    model.head.out.bias[:num_bins] = torch.linspace(-4, 5, num_bins)
  return model.eval()


def save_official_checkpoint(directory: pathlib.Path, model: vocos_reference.Vocos, sizes: dict):
  """config.yaml + pytorch_model.bin, with the feature-extractor buffers official files carry."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.yaml').write_text(yaml.safe_dump(official_config(**sizes)))
  state_dict = model.state_dict()
  state_dict['feature_extractor.mel_spec.spectrogram.window'] = torch.hann_window(sizes['n_fft'])
  state_dict['feature_extractor.mel_spec.mel_scale.fb'] = torch.rand(sizes['n_fft'] // 2 + 1, 100)
  torch.save(state_dict, directory / 'pytorch_model.bin')


def speech_like_mel(batch: int, seconds: float, seed: int) -> np.ndarray:
  """Normalized log-mel (B, T, 100) of decaying harmonic tones in noise, as the model makes."""
  rng = np.random.default_rng(seed)
  t = np.arange(int(seconds * audio.SAMPLE_RATE)) / audio.SAMPLE_RATE
  waves = [
    sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * np.exp(-t)
    + 0.05 * rng.standard_normal(t.size)
    for f0 in rng.uniform(100, 300, batch)
  ]
  return np.asarray(audio.log_mel(jnp.asarray(np.stack(waves), jnp.float32)))


def reference_waveform(model, normalized_mel: np.ndarray) -> np.ndarray:
  log_mel = np.asarray(audio.denormalize(normalized_mel), np.float32).swapaxes(1, 2)
  with torch.no_grad():
    return model(torch.from_numpy(log_mel)).numpy()


def same_padded_stft(signal: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
  """The forward transform `istft` inverts: reflect-pad (n_fft - hop) / 2 per side, Hann, rfft.

  (..., T·hop) -> (..., n_fft // 2 + 1, T).
  """
  trim = (n_fft - hop) // 2
  padded = np.pad(signal, [(0, 0)] * (signal.ndim - 1) + [(trim, trim)], mode='reflect')
  num_frames = 1 + (padded.shape[-1] - n_fft) // hop
  index = np.arange(num_frames)[:, None] * hop + np.arange(n_fft)
  return np.swapaxes(np.fft.rfft(padded[..., index] * vocos.hann_window(n_fft), axis=-1), -1, -2)


@pytest.fixture(scope='module')
def small_checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp('vocos-small')
  model = random_reference(0, **SMALL)
  save_official_checkpoint(directory, model, SMALL)
  return directory, model


@pytest.mark.parametrize('n_fft,hop', [(1024, 256), (64, 16), (48, 8)])
def test_istft_inverts_same_padded_stft(n_fft, hop):
  signal = np.random.default_rng(1).standard_normal((2, 40 * hop))
  spec = same_padded_stft(signal, n_fft, hop)
  assert spec.shape == (2, n_fft // 2 + 1, 40)
  recovered = np.asarray(vocos.istft(jnp.asarray(spec, jnp.complex64), n_fft, hop, n_fft))
  np.testing.assert_allclose(recovered, signal, atol=5e-6)


def test_istft_matches_reference_on_arbitrary_spectra():
  """Spectra that are no STFT of any signal, as the head predicts, get the same least squares."""
  rng = np.random.default_rng(2)
  spec = rng.standard_normal((2, 513, 30)) + 1j * rng.standard_normal((2, 513, 30))
  spec = spec.astype(np.complex64)
  ours = np.asarray(vocos.istft(jnp.asarray(spec), 1024, 256, 1024))
  with torch.no_grad():
    theirs = vocos_reference.SameISTFT(1024, 256)(torch.from_numpy(spec)).numpy()
  assert ours.shape == (2, 30 * 256)
  np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_istft_rejects_window_shorter_than_fft():
  with pytest.raises(ValueError, match='win_length'):
    vocos.istft(jnp.zeros((1, 513, 4), jnp.complex64), 1024, 256, 800)


def test_loaded_small_vocos_matches_reference(small_checkpoint):
  directory, reference = small_checkpoint
  mel = speech_like_mel(batch=2, seconds=0.5, seed=3)
  want = reference_waveform(reference, mel)
  log_mel = jnp.swapaxes(audio.denormalize(jnp.asarray(mel)), 1, 2)
  got = np.asarray(vocos.load_vocos(directory)(log_mel))
  assert got.shape == want.shape == (2, mel.shape[1] * 256)
  assert np.abs(want).max() > 0.1  # the comparison is not between two near-silent signals
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_vocoder_vocodes_normalized_mels_like_reference(small_checkpoint):
  directory, reference = small_checkpoint
  vocoder = vocos.load_vocoder(str(directory))
  mel = speech_like_mel(batch=2, seconds=0.3, seed=4)
  wave = vocoder.vocode(mel)
  assert 'vocos' in vocoder.name and str(directory) in vocoder.name
  assert wave.dtype == np.float32 and wave.shape == (2, mel.shape[1] * audio.HOP_LENGTH)
  np.testing.assert_allclose(wave, reference_waveform(reference, mel), atol=1e-5)


def test_full_size_mel_24khz_vocos_matches_reference(tmp_path):
  reference = random_reference(5, **MEL_24KHZ)
  save_official_checkpoint(tmp_path, reference, MEL_24KHZ)
  mel = speech_like_mel(batch=1, seconds=1.0, seed=6)
  want = reference_waveform(reference, mel)
  got = vocos.load_vocoder(str(tmp_path)).vocode(mel)
  assert np.abs(want).max() > 0.1
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_griffin_lim_fallback_recovers_a_tone():
  vocoder = vocos.load_vocoder(None)
  assert vocoder.name == 'griffin-lim (no Vocos checkpoint)'
  t = np.arange(audio.SAMPLE_RATE // 2) / audio.SAMPLE_RATE
  mel = np.asarray(audio.log_mel(jnp.asarray(np.sin(2 * np.pi * 440 * t)[None], jnp.float32)))
  wave = vocoder.vocode(mel)
  assert wave.dtype == np.float32 and wave.shape == (1, mel.shape[1] * audio.HOP_LENGTH)
  spectrum = np.abs(np.fft.rfft(wave[0]))
  peak_hz = np.argmax(spectrum) * audio.SAMPLE_RATE / wave.shape[1]
  assert abs(peak_hz - 440) < 10
  np.testing.assert_array_equal(vocoder.vocode(mel), wave)


def write_config(directory: pathlib.Path, config: dict):
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'config.yaml').write_text(yaml.safe_dump(config))


def test_loader_names_a_missing_directory(tmp_path):
  with pytest.raises(vocos.CheckpointError, match='checkpoint directory not found') as e:
    vocos.load_vocos(tmp_path / 'absent')
  assert str(tmp_path / 'absent') in str(e.value)


def test_loader_names_a_missing_config(tmp_path):
  with pytest.raises(vocos.CheckpointError, match='config not found') as e:
    vocos.load_vocos(tmp_path)
  assert str(tmp_path / 'config.yaml') in str(e.value)


def test_loader_names_missing_weights(tmp_path):
  write_config(tmp_path, official_config(**SMALL))
  with pytest.raises(vocos.CheckpointError, match='weights not found') as e:
    vocos.load_vocos(tmp_path)
  assert str(tmp_path / 'pytorch_model.bin') in str(e.value)


def test_loader_names_a_truncated_weights_file(tmp_path, small_checkpoint):
  directory, _ = small_checkpoint
  write_config(tmp_path, official_config(**SMALL))
  data = (directory / 'pytorch_model.bin').read_bytes()
  (tmp_path / 'pytorch_model.bin').write_bytes(data[: len(data) // 2])
  with pytest.raises(vocos.CheckpointError, match='cannot read the torch state dict') as e:
    vocos.load_vocos(tmp_path)
  assert str(tmp_path / 'pytorch_model.bin') in str(e.value)


def test_loader_rejects_an_encodec_vocos(tmp_path):
  config = official_config(**SMALL)
  config['feature_extractor']['class_path'] = 'vocos.feature_extractors.EncodecFeatures'
  write_config(tmp_path, config)
  with pytest.raises(vocos.CheckpointError, match='EncodecFeatures') as e:
    vocos.load_vocos(tmp_path)
  assert str(tmp_path / 'config.yaml') in str(e.value)


def test_loader_rejects_a_file_that_is_no_vocos_config(tmp_path):
  (tmp_path / 'config.yaml').write_text('model: whisper\n')
  with pytest.raises(vocos.CheckpointError, match='not a Vocos config'):
    vocos.load_vocos(tmp_path)


def test_loader_names_a_missing_parameter(tmp_path, small_checkpoint):
  _, reference = small_checkpoint
  save_official_checkpoint(tmp_path, reference, SMALL)
  state_dict = torch.load(tmp_path / 'pytorch_model.bin')
  del state_dict['backbone.convnext.2.gamma']
  torch.save(state_dict, tmp_path / 'pytorch_model.bin')
  with pytest.raises(vocos.CheckpointError, match='backbone.convnext.2.gamma') as e:
    vocos.load_vocos(tmp_path)
  assert str(tmp_path / 'pytorch_model.bin') in str(e.value)


def test_loader_names_weights_of_another_size(tmp_path, small_checkpoint):
  _, reference = small_checkpoint
  save_official_checkpoint(tmp_path, reference, SMALL)
  write_config(tmp_path, official_config(**{**SMALL, 'intermediate_dim': 128}))
  with pytest.raises(vocos.CheckpointError, match=r'pwconv1.*\(3, 64, 96\).*\(3, 64, 128\)'):
    vocos.load_vocos(tmp_path)


def test_vocoder_rejects_a_vocos_for_other_mels(tmp_path):
  sizes = {**SMALL, 'input_channels': 80}
  save_official_checkpoint(tmp_path, random_reference(7, **sizes), sizes)
  vocos.load_vocos(tmp_path)  # a valid Vocos ...
  with pytest.raises(vocos.CheckpointError, match='100 bands'):
    vocos.load_vocoder(str(tmp_path))  # ... but not one for this project's mels


def test_loader_says_torch_is_needed(tmp_path, small_checkpoint, monkeypatch):
  directory, _ = small_checkpoint
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(ImportError, match='needs PyTorch'):
    vocos.load_vocos(directory)
