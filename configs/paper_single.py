"""The paper's single-codebook experiment: 24 blocks × 1024 (≈ 474 M backbone parameters),
LibriSpeech 960 h + AudioSet under a 1:1 sampler, Whisper large-v3 and BEATs teachers, REPA on the
paper's FoG-A layers with its λ.

  python -m agrepa_jax.main --config configs/paper_single.py --workdir /shared/runs/single \
    --config.data.speech_dir=... --config.data.audio_dir=... \
    --config.teachers.speech.checkpoint=large-v3.pt \
    --config.teachers.audio.checkpoint=BEATs_iter3_plus_AS2M.pt

Multi-host: launch/tpu_pod.sh or launch/slurm.sbatch. `--mode aot` needs no data or checkpoint and
compiles the step for 8 devices in about a minute on a CPU.

`configs/paper_single.py:official` is the official code's training step exactly
(fidelity='official', docs/fidelity.md): frozen token conditioning, padding attended and counted,
the prompt in L_FM, β1 cycling, float32, the official FoG-A schedule, Whisper's 30 s window, the
16 kHz detour. It is the one that reproduces the paper's numbers; the plain config is the one we
recommend.
"""

from agrepa_jax import config_base

LIBRISPEECH_UTTERANCES = 281_241  # LibriSpeech 960 h; the 1:1 sampler adds as many AudioSet clips
EPOCHS = 3


def get_config(variant: str = ''):
  """variant '' (ours) or 'official' (fidelity='official')."""
  config = config_base.base_config()
  config.batch_size = 64
  config.num_steps = EPOCHS * 2 * LIBRISPEECH_UTTERANCES // config.batch_size
  config.log_every = 100
  config.eval_every = 5000
  config.checkpoint_every = 5000

  # Model: 24 blocks of width 1024, 16 heads, one codebook of 4096 tokens; bf16, full remat; the
  # official code's forms (docs/fidelity.md): a token table per domain, its time embedding, dropout
  # positions and modulation init.
  config.model.update(
    num_layers=24,
    width=1024,
    num_heads=16,
    token_dim=1024,
    vocab_size=4096,
    num_codebooks=1,
    dropout=0.2,
    remat='full',
    dtype='bfloat16',
    token_tables='per_domain',
    time_embedding='official',
    dropout_positions='official',
    modulation_init='normal',
  )
  # Schedule: AdamW 1e-4, β (0.9, 0.999), wd 0.1, clip 1.0; the official one-cycle over 3 epochs.
  config.optim.update(
    learning_rate=1e-4,
    weight_decay=0.1,
    grad_clip=1.0,
    schedule='onecycle',
    pct_start=0.1,
    div_factor=10.0,
    final_div_factor=100.0,
  )

  # Data: LibriSpeech (speech) and AudioSet (audio) stored whole up to 35 s (LibriSpeech's longest
  # utterance); each epoch trains a fresh random 10 s crop of each; tokens at 25 Hz.
  config.data.update(
    source='directories', clip_seconds=10.0, max_seconds=35.0, token_rate=25.0, chunk_size=32
  )
  # Teachers: Whisper large-v3 encoder (1280-d) and BEATs iter3+ AS2M (768-d).
  config.teachers.speech.update(name='whisper', checkpoint='', dim=1280)
  config.teachers.audio.update(name='beats', checkpoint='', dim=768)

  # Alignment: BiT-C (official form), and utterance-level REPA on the paper's FoG-A layers and λ.
  config.bitc.form = 'official'
  config.repa.update(selection='fixed', preset='paper_single', granularity='utterance')

  config.mesh.update(data=-1, fsdp=8)
  return config_base.with_fidelity(config, variant)
