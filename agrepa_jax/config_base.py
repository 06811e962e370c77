"""Every config key, its default and a one-line meaning; configs/*.py override what defines them.

Reference-code quirks (docs/method.md, "Reference quirks") are switches that default to the
sound choice: model.frozen_token_conditioning, model.mask_padding, flow.loss_on_prompt,
repa.quirks. Where the official code's architecture differs from ours, a key names both forms
(docs/fidelity.md). `fidelity='official'` sets every one of these keys to the official code's
value (OFFICIAL_FORMS, applied by `resolve_fidelity`), so that one key reproduces its training step.
This module only builds ConfigDicts: it imports nothing that runs.
"""

import importlib.util
import pathlib

import ml_collections


def _section(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.fidelity = 'ours'  # ours: the keys as set | official: OFFICIAL_FORMS (docs/fidelity.md)
  config.workflow = 'single'  # single: one run | compare: probe-then-intervene (compare.py)
  config.seed = 0  # parameter initialization and the per-step random draws
  config.num_steps = 1000  # optimization steps of the run
  config.batch_size = 32  # global batch, over all hosts and devices
  config.log_every = 50  # steps between metrics.jsonl rows
  config.eval_every = 500  # steps between held-out evaluations; 0 = none
  config.eval_batches = 8  # at most this many held-out batches per evaluation
  config.checkpoint_every = 1000  # steps between checkpoints (and one at the end)
  config.keep_checkpoints = 3  # checkpoints kept on disk
  config.async_checkpointing = True  # write checkpoints in the background
  config.stop_check_every = 10  # steps between checks for SIGTERM/Ctrl-C (all processes agree)

  config.model = _section(
    num_layers=24,  # DiT blocks L
    width=1024,  # hidden width
    num_heads=16,  # attention heads
    mlp_ratio=4,  # MLP hidden width / width
    dropout=0.2,  # dropout rate inside the blocks
    n_mels=100,  # mel bands of the target (fixed by the audio front end)
    token_dim=1024,  # token embedding width
    vocab_size=4096,  # token vocabulary per codebook
    num_codebooks=1,  # token streams: 1 (single) or 2 (dual codebook)
    time_freq_dim=256,  # sinusoidal features of the time embedding
    remat='none',  # none | full | dots: activation rematerialization in the depth scan
    dtype='float32',  # activation dtype inside the blocks (bfloat16 on accelerators)
    attention='',  # attention kernel: '' = XLA's choice | xla | cudnn (flash, GPU, bf16/fp16)
    token_tables='per_domain',  # per_domain: one embedding table per domain (official) | shared
    codebook_fusion='merge',  # dual: merge (P_d, interpolate, Linear) | concat (official, docs)
    second_vocab_size=0,  # vocabulary of codebook 2 (official: 1024 BEATs labels); 0 = vocab_size
    time_embedding='dit',  # dit: 1000·t, time_freq_dim features, d→d | official: t, width, d→4d→d
    dropout_positions='branch',  # branch outputs | official: attention probs, after GELU and MLP
    modulation_init='xavier',  # adaLN modulation kernel: xavier | normal (official: N(0, 0.02))
    frozen_token_conditioning=False,  # quirk: tables and P_d never train; P_d identity-initialized
    mask_padding=True,  # padding frames out of attention keys, time means, L_FM | False: official
    dropout_rng='threefry',  # threefry | rbg (XLA's, for TPU) | hash (fused; fastest on CPU)
    scan_unroll=False,  # unroll the depth scan: faster on CPU, compile time grows with depth
  )
  config.flow = _section(
    noise_std=0.5,  # σ of the source noise x0
    max_prompt_fraction=0.3,  # the reference prompt covers up to this share of the frames
    token_drop_prob=0.1,  # CFG dropout of the tokens
    reference_drop_prob=0.1,  # CFG dropout of the reference prompt
    loss_on_prompt=False,  # quirk: the reference-prompt frames also count in L_FM
  )
  config.optim = _section(
    learning_rate=1e-4,  # peak learning rate of AdamW
    b1=0.9,  # AdamW β1
    b2=0.999,  # AdamW β2
    weight_decay=0.1,  # AdamW decoupled weight decay
    grad_clip=1.0,  # global gradient-norm clip
    schedule='onecycle',  # onecycle (PyTorch's OneCycleLR, cosine) | constant
    schedule_steps=-1,  # length of the one-cycle schedule; -1 = num_steps
    pct_start=0.3,  # one-cycle: share of the steps spent warming up
    div_factor=25.0,  # one-cycle: peak / initial learning rate
    final_div_factor=1e4,  # one-cycle: initial / final learning rate
    cycle_momentum=False,  # one-cycle: β1 max_momentum -> base_momentum -> back (b1 unused)
    base_momentum=0.85,  # cycle_momentum: β1 at the peak learning rate
    max_momentum=0.95,  # cycle_momentum: β1 at the start and the end
    ema_decay=0.0,  # > 0: moving average of the parameters for eval, probe, sample (paper: none)
  )
  config.bitc = _section(
    enabled=True,  # BiT-C: align the time-mean token embedding with the teacher
    weights={'speech': 0.5, 'audio': 1.0},  # BiT-C loss weight w_d per domain
    form='affine',  # affine: all clips | official: no affine or bias, skips dropped-token clips
  )
  config.repa = _section(
    selection='none',  # none | fixed | fog_a (AG-REPA: λ from FoG-A)
    preset='',  # fixed: paper_single | paper_dual, the paper's FoG-A layers and λ
    layers={'speech': [8], 'audio': [8]},  # fixed without a preset: 1-based layers per domain
    lambdas={'speech': [0.5], 'audio': [0.5]},  # fixed: one λ per layer, or one for all
    granularity='utterance',  # utterance (paper: time-pooled) | frame (original REPA)
    selection_file='',  # fog_a: λ from a probe's selection.json; '' = re-measure online
    probe_every=200,  # fog_a online: steps between FoG-A measurements (λ = 0 before the first)
    score_ema=0.9,  # fog_a online: decay of the moving average of the scores
    measure_only=False,  # none/fixed: also measure FoG-A every probe_every steps, λ unchanged
    quirks=False,  # quirk: the official FoG-A schedule, raw λ, cumulative mean (docs/fidelity.md)
    max_layers=3,  # static K: at most this many layers per domain run their REPA heads per step
    all_layer_heads=False,  # keep a REPA head on every layer, not only the selectable ones
  )
  config.teachers = _section(
    # name: whisper | beats; checkpoint: '' = the teacher's bundled default (Whisper tiny.en);
    # dim: C_d, checked against the loaded teacher; 0 = take it from the teacher
    speech=_section(name='whisper', checkpoint='', dim=0),
    audio=_section(name='whisper', checkpoint='', dim=0),
    online=False,  # teachers run in the train step on each crop's stored audio; docs/data.md
    # official: Whisper on its 30 s window, BEATs on the clip_seconds crop, no padding mask, the
    # utterance target averaged over every frame (padding too) | masked: audio frames only
    padding='masked',
  )
  config.data = _section(
    source='embedded',  # embedded (generated, no download) | directories (real corpora)
    cache_dir='~/.cache/agrepa_jax',  # feature stores and the embedded corpus (local or gs://)
    domains=('speech', 'audio'),  # the domains trained; order of λ columns and heads
    domain_weights=(1.0, 1.0),  # sampling ratio of the domains (paper: 1:1)
    speech_dir='',  # directories: the speech corpus root (LibriSpeech, or any folder of speech)
    audio_dir='',  # directories: the general-audio corpus root (AudioSet, or a folder of audio)
    datasets={'speech': 'librispeech', 'audio': 'audioset'},  # librispeech | audioset | folder
    train_splits={  # directories: tfds splits trained on, joined by '+'
      'speech': 'train_clean_100+train_clean_360+train_other_500',
      'audio': 'balanced_train+unbalanced_train',
    },
    heldout_splits={'speech': 'dev_clean', 'audio': 'eval'},  # '' or absent: heldout_fraction
    token_dir='',  # external tokens <token_dir>/<domain>/<clip id>.npy at token_rate
    num_speech=300,  # embedded: speech clips generated
    num_audio=300,  # embedded: sound-event clips generated
    clip_seconds=10.0,  # crop length of a batch row (paper: 10 s); shorter clips are padded
    max_seconds=0.0,  # clips are stored up to this long (longer ones cut); 0 = clip_seconds
    crop='random',  # random: a uniform crop start per clip and epoch | start: from the start
    heldout_fraction=0.1,  # share of clips held out (by a hash of the clip id) without a split
    token_rate=25.0,  # tokens per second (built-in tokenizer and external token files)
    tokenizer_clips=2000,  # built-in tokenizer: fitted on at most this many clips per domain
    seed=0,  # data order, crops, tokenizer and embedded corpus
    order_seed=-1,  # training data order only; -1 = data.seed (compare.py: one per seed)
    chunk_size=64,  # clips per teacher batch while building the feature store
    shard_clips=256,  # about this many clips per feature-store shard
    num_workers=0,  # grain worker processes reading training batches; 0 = in the trainer
    teacher_frames=False,  # also store teacher frame features (repa.granularity='frame')
    claim_timeout=600.0,  # s without a heartbeat before another builder takes a claim over
    mel_via_rate=0,  # > 0: audio passes through this rate before the 24 kHz mel (official: 16000)
  )
  config.mesh = _section(
    data=-1,  # data-parallel axis size; -1 = all remaining devices
    fsdp=1,  # FSDP axis size (parameters and optimizer state sharded over it, batch too)
    tensor=1,  # tensor-parallel axis size (attention heads and MLP hidden units split over it)
    fsdp_min_size=2**14,  # parameters with fewer elements are replicated, not sharded
    # logical axis -> mesh axes, first fitting rule wins (docs/scaling.md); unnamed = replicated
    rules=(
      ('batch', ('data', 'fsdp')),  # activations and inputs: batch over data and fsdp
      ('layers', None),  # stacked layers: the depth scan gathers one layer at a time
      ('embed', 'fsdp'),  # FSDP: every weight is split along its width axis
      ('hidden', 'fsdp'),  # (width, width) kernels whose width axis is taken; head outputs
      ('teacher', 'fsdp'),  # alignment-head outputs C_d when their input axis is taken
      ('vocab', 'fsdp'),  # token embeddings when their width axis is taken
      ('heads', 'tensor'),  # tensor parallelism: attention (q, k, v and output) by heads
      ('mlp', 'tensor'),  # tensor parallelism: MLP hidden units
    ),
    # GPU targets --mode aot estimates on as many fake CPU devices (docs/scaling.md); a chip's
    # memory and peak come from agrepa_jax/flops.py:CHIPS. TPUs compile for real: --topology.
    presets=_section(
      h100x8=_section(devices=8, data=1, fsdp=8, tensor=1, device_kind='NVIDIA H100'),
      h200x8=_section(devices=8, data=1, fsdp=8, tensor=1, device_kind='NVIDIA H200'),
    ),
    aot_presets=(),  # presets --mode aot also compiles for, e.g. ('h100x8',)
  )
  config.probe = _section(
    checkpoint_step=-1,  # checkpoint to probe; -1 = the latest
    num_clips=32,  # held-out clips, balanced over domains
    batch_size=16,  # clips per probe forward
    t_values=(0.1, 0.3, 0.5, 0.7, 0.9),  # flow times FoG-A measures
    prompt_fraction=0.15,  # fixed prompt: the first ⌊f·valid frames⌋ of x1; 0 = no prompt
    chunk_size=1,  # FoG-A lanes per device side by side; > 1 helps where one lane idles a chip
    top_k=3,  # layers selected per domain
    selection_t=-1.0,  # t whose FoG-A scores select layers; -1 = the mean over t_values
    lambda_rule='normalized',  # normalized (Σλ = lambda_total) | softmax | raw (paper's code)
    lambda_total=0.5,  # Σλ per domain for normalized and softmax
    softmax_temperature=0.1,  # temperature of the softmax rule
    seed=0,  # probe noise and dropout draws
    lasp_t=0.5,  # t of the hidden states the storage probes read
    ridge_alpha=1.0,  # L2 penalty of the ridge storage probe
    ridge_fit_fraction=0.5,  # share of each domain's clips the ridge probe is fitted on
    storage_measure='centered',  # LASP score SCD ranks: centered (training mean removed) | cosine
  )
  config.sample = _section(
    step=-1,  # checkpoint to sample; -1 = the latest
    num_points=32,  # time points of the Euler grid (num_points − 1 steps, 2 passes each)
    sway=-1.0,  # sway coefficient s; 0 = uniform grid, −1 = the paper's
    cfg_weight=3.0,  # classifier-free guidance weight w
    cfg_form='official',  # official: v_u + w·(v_c − v_u) | f5 (F5-TTS): v_c + w·(v_c − v_u)
    prompt_seconds=0.5,  # reference prompt: each clip's own first seconds of mel
    prompt_fraction=0.0,  # > 0: the prompt is this fraction of the clip's audio frames instead
    seed=0,  # noise of batch b is drawn from fold_in(key(seed), b)
    num_clips=8,  # held-out clips written by the sample mode, balanced over domains
    clip_list='',  # file of held-out clip ids, one per line; overrides num_clips
    batch_size=8,  # clips per sampler call; rounded up to a multiple of the device count
  )
  config.eval = _section(
    step=-1,  # checkpoint to evaluate; -1 = the latest
    num_clips=64,  # held-out clips generated for the metrics, balanced over domains
    embeddings=(),  # FAD embedding teachers (keys of config.teachers); () = each domain's once
    batch_size=8,  # clips per teacher or transcriber call
    whisper_checkpoint='',  # transcriber for WER (CTranslate2 dir); '' = bundled tiny.en
    fad_inf_points=15,  # FAD∞: subset sizes the line in 1/n is fitted to
  )
  config.vocoder = _section(
    checkpoint='',  # Vocos mel-24khz directory (config.yaml, pytorch_model.bin); '' = Griffin-Lim
  )
  return config


FIDELITIES = ('ours', 'official')

# fidelity='official': the value of every key whose form the official code fixes (docs/fidelity.md).
OFFICIAL_FORMS = {
  'model.token_tables': 'per_domain',
  'model.time_embedding': 'official',
  'model.dropout_positions': 'official',
  'model.modulation_init': 'normal',
  'model.frozen_token_conditioning': True,
  'model.mask_padding': False,
  'model.dtype': 'float32',
  'flow.loss_on_prompt': True,
  'optim.schedule': 'onecycle',
  'optim.cycle_momentum': True,
  'bitc.form': 'official',
  'repa.quirks': True,
  'teachers.padding': 'official',
  'data.mel_via_rate': 16000,
  'data.crop': 'start',
  'data.max_seconds': 0.0,  # clips cut or padded to clip_seconds, as the official loader does
  'sample.cfg_form': 'official',
}
# ... and with two codebooks, the official dual-codebook conditioning (which trains no BiT-C).
OFFICIAL_DUAL_FORMS = {'model.codebook_fusion': 'concat', 'bitc.enabled': False}


def resolve_fidelity(config) -> tuple[ml_collections.ConfigDict, dict]:
  """(config with `config.fidelity` applied, {key: (old, new)} of the values it changed).

  'ours' changes nothing; 'official' sets OFFICIAL_FORMS (and OFFICIAL_DUAL_FORMS with two
  codebooks), whatever those keys held. Idempotent.
  """
  if config.fidelity not in FIDELITIES:
    raise ValueError(f'fidelity={config.fidelity!r}: expected one of {FIDELITIES}')
  config = config.copy_and_resolve_references()
  if config.fidelity == 'ours':
    return config, {}
  forms = dict(OFFICIAL_FORMS)
  if config.model.num_codebooks == 2:
    forms.update(OFFICIAL_DUAL_FORMS)
  changed = {}
  for key, value in forms.items():
    section, name = key.split('.')
    if config[section][name] != value:
      changed[key] = (config[section][name], value)
      config[section][name] = value
  return config, changed


def with_fidelity(config, variant: str) -> ml_collections.ConfigDict:
  """A config file's fidelity variant: '' the config as it is, 'official' with fidelity='official'
  applied (`--config configs/X.py:official`)."""
  if variant not in ('', 'official'):
    raise ValueError(f"config variant {variant!r}: expected '' or 'official'")
  if not variant:
    return config
  config.fidelity = 'official'
  return resolve_fidelity(config)[0]


def config_from_file(path: str | pathlib.Path, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file, so a config file can start from another."""
  spec = importlib.util.spec_from_file_location(pathlib.Path(path).stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


COMPARE_VARIANT_HELP = "'none', 'fixed:<layer>' or 'fog_a'"


def variant_config(config, variant: str, selection_file: str = '') -> ml_collections.ConfigDict:
  """A copy of a compare `config` that trains one variant on its own.

  none: no hidden-state alignment (Phase I); fixed:<l>: REPA on layer l in every domain with
  λ = compare.fixed_lambda; fog_a: AG-REPA on the layers and λ in `selection_file` (or FoG-A
  re-measured during training when it is empty).
  """
  config = config.copy_and_resolve_references()
  config.unlock()
  config.workflow = 'single'
  domains = tuple(config.data.domains)
  if variant == 'none':
    # The reference code's Phase I measures FoG-A as it trains, and its λ average all measurements.
    config.repa.update(selection='none', measure_only=bool(config.repa.quirks))
  elif variant.startswith('fixed:'):
    layer = int(variant.split(':')[1])
    config.repa.update(
      selection='fixed',
      preset='',
      layers={d: [layer] for d in domains},
      lambdas={d: [config.compare.fixed_lambda] for d in domains},
    )
  elif variant == 'fog_a':
    config.repa.update(selection='fog_a', selection_file=selection_file)
  else:
    raise ValueError(f'compare variant {variant!r}: expected {COMPARE_VARIANT_HELP}')
  config.lock()
  return config
