"""Config sections of the sample and eval modes, attached as config.sample, config.eval, config.vocoder.

The sampler settings in config.sample serve both modes; the noise scale σ is the training one,
config.flow.noise_std.
"""

import ml_collections


def sample_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      step=-1,  # checkpoint to restore; -1 = the latest
      num_points=32,  # time points of the Euler grid (num_points − 1 steps, 2 passes each)
      sway=-1.0,  # sway coefficient s; 0 = uniform grid, −1 = the paper's
      cfg_weight=3.0,  # classifier-free guidance weight w; 0 = conditional velocity only
      prompt_seconds=0.5,  # reference prompt: each clip's own first seconds of mel
      prompt_fraction=0.0,  # > 0: the prompt is this fraction of the clip's audio frames instead
      seed=0,  # noise of batch b is drawn from fold_in(key(seed), b)
      num_clips=8,  # held-out clips written by the sample mode, balanced over domains
      clip_list='',  # file of held-out clip ids, one per line; overrides num_clips
      batch_size=8,  # clips per sampler call; rounded up to a multiple of the device count
    )
  )


def eval_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      step=-1,  # checkpoint to evaluate; -1 = the latest
      num_clips=64,  # held-out clips generated for the metrics, balanced over domains
      embeddings=(),  # FAD embedding teachers: keys of config.teachers (or teacher names);
      # () = every domain's configured teacher, each distinct one once
      batch_size=8,  # clips per teacher or transcriber call
      whisper_checkpoint='',  # transcriber for WER; '' = the bundled Whisper tiny.en
      fad_inf_points=15,  # FAD∞: subset sizes the line in 1/n is fitted to
    )
  )


def vocoder_config() -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      checkpoint='',  # Vocos mel-24khz directory (config.yaml, pytorch_model.bin); '' = Griffin-Lim
    )
  )
