"""fidelity='official' against the PyTorch re-implementation of the official code (tests/reference).

A config with fidelity='official' builds our model, losses, optimizer and FoG-A probe in the
official forms; on a batch whose clips are zero-padded (as the official loader pads them), several
AdamW steps with the official OneCycleLR (β1 cycling) and the official probe then agree with the
reference to ≤ 1e-5 relative; so do the official front end's resamplers and teacher targets.
Dropout is off: the two frameworks draw different masks.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from agrepa_jax import audio, config_base, losses, selection, train
from agrepa_jax import state as state_lib
from agrepa_jax.model import ModelConfig
from agrepa_jax.probe import fog_a
from tests.reference import official
from tests.reference.export import export_weights
from tests.test_bench import official_inputs
from tests.test_reference import (
  BATCH,
  FRAMES,
  SINGLE,
  TOLERANCE,
  make_batch,
  mels,
  official_fog_a,
  official_lambdas,
  official_tokens,
  official_twin,
  random_model,
  relative_error,
  to_torch,
)

VALID_FRAMES = (FRAMES, FRAMES - 5, FRAMES - 3, FRAMES - 7)  # clips 2-4 end in zero padding
NUM_STEPS = 5


def official_config() -> config_base.ml_collections.ConfigDict:
  """A small config with fidelity='official' applied, dimensions as tests/test_reference.py's."""
  config = config_base.base_config()
  config.fidelity = 'official'
  config.num_steps = NUM_STEPS
  config.model.update(
    num_layers=SINGLE.num_layers,
    width=SINGLE.width,
    num_heads=SINGLE.num_heads,
    token_dim=SINGLE.token_dim,
    vocab_size=SINGLE.vocab_size,
    dropout=0.0,
  )
  config.optim.update(learning_rate=1e-3, pct_start=0.4, div_factor=10.0, final_div_factor=100.0)
  config.repa.update(selection='fixed', layers={'speech': [1, 3], 'audio': [1]}, lambdas={
    'speech': [0.334, 0.1176], 'audio': [0.278]})  # fmt: skip
  return config_base.resolve_fidelity(config)[0]


@functools.cache
def official_model_config() -> ModelConfig:
  config = official_config()
  fields = {
    **config.model,
    'num_domains': 2,
    'bitc_form': config.bitc.form,
    'n_mels': SINGLE.n_mels,
  }
  return ModelConfig.from_config(fields)


def padded_batch(cfg: ModelConfig) -> dict:
  """make_batch's clips with `VALID_FRAMES` frames of audio, zero mel samples after them."""
  batch = make_batch(cfg)
  valid = np.asarray(VALID_FRAMES)
  # the samples that make a centred frame count as audio (losses.frame_mask): up to its centre
  num_samples = (valid - 1) * audio.HOP_LENGTH + 1
  mel = np.where(np.arange(FRAMES)[None, :, None] < valid[:, None, None], batch['mel'], -2.49)
  return {**batch, 'mel': jnp.asarray(mel, jnp.float32), 'num_samples': jnp.asarray(num_samples)}


def test_official_fidelity_sets_every_official_form():
  config = official_config()
  assert config.model.mask_padding is False and config.flow.loss_on_prompt
  assert config.model.frozen_token_conditioning and config.optim.cycle_momentum
  assert config.repa.quirks and config.model.dtype == 'float32'
  assert config.teachers.padding == 'official' and config.data.mel_via_rate == 16000
  assert config.data.crop == 'start'
  again, changed = config_base.resolve_fidelity(config)
  assert changed == {} and again == config  # idempotent
  dual = config_base.config_from_file('configs/paper_dual.py', 'official')
  assert dual.model.codebook_fusion == 'concat' and not dual.bitc.enabled
  ours = config_base.config_from_file('configs/paper_single.py')
  assert ours.fidelity == 'ours' and ours.model.mask_padding and ours.model.dtype == 'bfloat16'


def test_paper_presets_are_the_official_lambdas_unrounded():
  single, dual = selection.PAPER_PRESETS['paper_single'], selection.PAPER_PRESETS['paper_dual']
  assert single == {
    'speech': {1: 0.334, 9: 0.139, 5: 0.1176},
    'audio': {1: 0.278, 21: 0.12, 9: 0.1122},
  }
  assert dual == {
    'speech': {1: 0.506, 3: 0.1308, 23: 0.1082},
    'audio': {1: 0.388, 3: 0.1026, 7: 0.0856},
  }


def test_official_one_cycle_and_beta1_follow_torch_onecyclelr():
  config = official_config()
  config.num_steps = 23  # a warm-up that ends between two steps
  tx, _ = state_lib.make_optimizer(config)
  optimizer, torch_schedule = official.make_optimizer(
    torch.nn.Linear(1, 1), config.optim.learning_rate, 0.1, (0.9, 0.999), 23, 0.4
  )
  params = {'w': jnp.zeros(3)}
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  ours, theirs = [], []
  for _ in range(23):
    theirs.append(
      [optimizer.param_groups[0][k] for k in ('lr',)] + [optimizer.param_groups[0]['betas'][0]]
    )
    optimizer.step()
    torch_schedule.step()
    _, opt_state = update({'w': jnp.ones(3)}, opt_state, params)
    injected = opt_state[1].hyperparams  # what AdamW used at this step
    ours.append([float(injected['learning_rate']), float(injected['b1'])])
  ours, theirs = np.array(ours), np.array(theirs)
  assert relative_error(ours[:, 0], theirs[:, 0]) <= TOLERANCE
  assert relative_error(ours[:, 1], theirs[:, 1]) <= TOLERANCE
  assert theirs[0, 1] == pytest.approx(0.95) and 0.85 < theirs[:, 1].min() < 0.851


def our_steps(config, model, batch):
  """NUM_STEPS train steps of `model` on `batch`: (losses per step, gradient norms, final model)."""
  tx, schedule = state_lib.make_optimizer(config)
  graphdef, state = state_lib.model_state(config, model, tx, jax.random.key(3))
  step_cfg = train.StepConfig(losses.LossConfig.from_config(config))
  step = jax.jit(
    functools.partial(
      train.train_step, graphdef=graphdef, tx=tx, schedule=schedule, step_cfg=step_cfg
    )
  )
  history = []
  for _ in range(NUM_STEPS):
    state, parts = step(state, batch)
    history.append(parts)
  return history, nnx.merge(graphdef, state.params, state.frozen), step_cfg, state.rng


def drawn_inputs(batch, rng, step: int, flow_cfg) -> dict:
  """The draws of our train step `step` (losses.compute_losses) in the official layout."""
  key = jax.random.fold_in(jax.random.wrap_key_data(rng), step)
  valid = losses.frame_mask(batch['num_samples'], FRAMES, audio.HOP_LENGTH).sum(1)
  inputs = losses.flow_matching_inputs(jax.random.split(key)[0], batch['mel'], valid, flow_cfg)
  return official_inputs(batch, inputs)


def test_official_training_steps_on_a_padded_batch_match():
  """Five official steps (frozen conditioning, every frame counted, one-cycle with β1 cycling)."""
  config = official_config()
  cfg = official_model_config()
  model = random_model(cfg)
  reference = official_twin(model, cfg)
  before = {k: v.clone() for k, v in reference.state_dict().items()}
  batch = padded_batch(cfg)
  history, trained, step_cfg, rng = our_steps(config, model, batch)

  optim = config.optim
  optimizer, schedule = official.make_optimizer(
    reference,
    optim.learning_rate,
    optim.weight_decay,
    (optim.b1, optim.b2),
    NUM_STEPS,
    optim.pct_start,
    optim.div_factor,
    optim.final_div_factor,
  )
  lambdas = official_lambdas(selection.lambdas_from_config(config))
  weights = tuple(config.bitc.weights[d] for d in step_cfg.loss.domains)
  for step in range(NUM_STEPS):
    official_batch = {
      'mel': mels(batch['mel']),
      'tokens': official_tokens(batch['tokens']),
      'domain': torch.from_numpy(np.array(batch['domain'])).long(),
      'teachers': [to_torch(batch['teacher'][d]) for d in step_cfg.loss.domains],
      'draws': drawn_inputs(batch, rng, step, step_cfg.loss.flow),
    }
    expected, grad_norm = official.train_step(
      reference, optimizer, schedule, official_batch, lambdas, weights, None, optim.grad_clip
    )
    ours = history[step]
    for key, theirs in (('loss_fm', 'fm'), ('loss_bitc', 'bitc'), ('loss_repa', 'repa')):
      assert relative_error(ours[key], expected[theirs]) <= TOLERANCE, (step, key)
    assert relative_error(ours['grad_norm'], grad_norm) <= TOLERANCE, step

  updated = official.FlowModel(reference.cfg)
  export_weights(trained, updated)
  ours_after = updated.state_dict()
  width = cfg.width
  compared = 0
  for name, parameter in reference.named_parameters():
    if parameter.grad is None:  # frozen conditioning, unselected REPA heads: never stepped
      continue
    theirs, mine = parameter.detach().numpy(), ours_after[name].numpy()
    if name.endswith('in_proj_bias'):
      # The key bias shifts every logit of a query equally: softmax ignores it, its gradient is
      # rounding noise, and Adam's first steps normalize that noise to full-size updates.
      keep = np.r_[0:width, 2 * width : 3 * width]
      theirs, mine = theirs[keep], mine[keep]
    assert relative_error(mine, theirs) <= TOLERANCE, name
    assert not np.array_equal(theirs, before[name].numpy()), name  # it did train
    compared += 1
  assert compared > 40


@pytest.mark.parametrize('clean_input', [True, False], ids=['clean_mel_at_0.8', 'noisy_x_t'])
def test_official_fog_a_on_a_padded_batch_matches(clean_input):
  """FoG-A with every frame attended and scored (model.mask_padding off)."""
  cfg = dataclasses.replace(official_model_config(), dropout=0.2)
  ours = random_model(cfg)
  reference = official_twin(ours, cfg).eval()
  batch = padded_batch(cfg)
  key = jax.random.key(7)
  table, _ = fog_a.fog_a_table(
    ours.backbone,
    batch,
    (0.8,),
    key,
    num_domains=2,
    batch_size=BATCH,
    clean_input=clean_input,
    mask_padding=False,
  )
  expected = official_fog_a(reference, batch, key, clean_input)
  assert relative_error(table[:, 0], expected) <= TOLERANCE
  masked, _ = fog_a.fog_a_table(
    ours.backbone, batch, (0.8,), key, num_domains=2, batch_size=BATCH, clean_input=clean_input
  )
  assert relative_error(masked[:, 0], expected) > 1e-3  # the padding does matter here


def test_official_front_end_detour_matches_the_reference_resamplers():
  """44.1 kHz audio through 16 kHz (Hann sinc) to 24 kHz (Kaiser sinc), as the official code."""
  rng = np.random.default_rng(0)
  wave = rng.uniform(-1, 1, 2205).astype(np.float32)  # 50 ms at 44.1 kHz
  ours = audio.official_detour(wave, 44100, 16000, audio.SAMPLE_RATE)
  via = official.resample(torch.from_numpy(wave), 44100, 16000, 'hann')
  expected = official.resample(via, 16000, audio.SAMPLE_RATE, 'kaiser').numpy()
  assert ours.shape == expected.shape == (1200,)
  assert relative_error(ours, expected) <= TOLERANCE
  direct = audio.sinc_resample(wave, 44100, audio.SAMPLE_RATE)  # no detour: content above 8 kHz
  assert relative_error(direct, expected) > 0.1


def test_decode_audio_via_16k_is_the_detour_of_the_normalized_file():
  rng = np.random.default_rng(1)
  wave = 0.5 * rng.uniform(-1, 1, 4410).astype(np.float32)
  data = audio.wav_bytes(wave, 44100)
  decoded = audio.decode_audio(data, 'clip.wav', audio.SAMPLE_RATE, via_rate=16000)
  pcm = audio.peak_normalize(audio.decode_audio(data, 'clip.wav', 44100))  # the file's samples
  expected = official.resample(official.resample(torch.from_numpy(pcm), 44100, 16000, 'hann'),
    16000, audio.SAMPLE_RATE, 'kaiser').numpy()  # fmt: skip
  assert relative_error(decoded, expected) <= TOLERANCE


@pytest.mark.slow
def test_official_whisper_target_is_the_mean_of_the_30s_window():
  """Whisper tiny.en (real weights): our teacher with teachers.padding='official' on 10 s clips
  against WhisperFeatureExtractor + the transformers encoder averaged over all 1 500 frames."""
  transformers = pytest.importorskip('transformers')
  from transformers.models.whisper import modeling_whisper

  from agrepa_jax.teachers import base, whisper
  from tests.test_whisper import (
    TINY_EN,
    hf_openai_name_pairs,
    hf_whisper_config,
    synthetic_utterance,
  )

  teacher = whisper.load(TINY_EN, padding='official')
  clips = np.zeros((2, 10 * 16000), np.float32)  # the official loader's 10 s at 16 kHz
  num_samples = np.array([10 * 16000, 3 * 16000])
  for i, n in enumerate(num_samples):
    clips[i, :n] = synthetic_utterance(n / 16000, seed=i)
  frames, mask = teacher.features(clips, num_samples)
  ours = base.masked_mean(frames, mask)

  dims, params = whisper.read_ct2_whisper(TINY_EN)
  encoder = modeling_whisper.WhisperEncoder(hf_whisper_config(transformers, dims)).eval()
  encoder.load_state_dict(
    {hf: torch.from_numpy(params[name]) for hf, name in hf_openai_name_pairs(dims.n_audio_layer)}
  )
  extractor = transformers.WhisperFeatureExtractor(feature_size=dims.n_mels)
  expected = official.whisper_target(extractor, encoder, clips).numpy()
  assert mask.shape == (2, 1500) and mask.all()
  assert relative_error(ours, expected) <= TOLERANCE
